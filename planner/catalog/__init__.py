"""What is asked: the request and response types (``specs``), the model presets and GPU catalog
(``presets``, ``data/``), and the arithmetic every layer shares — parameter counts, dtype sizes,
optimizer states. Imports nothing else from the planner."""
