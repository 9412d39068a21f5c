"""What is asked: the request and response types (``specs``; a validation job's report and record
in ``validation_specs``), the model presets and GPU catalog (``presets``, ``data/``), and the
arithmetic every layer shares — parameter counts, dtype sizes, optimizer states. Imports nothing
else from the planner."""
