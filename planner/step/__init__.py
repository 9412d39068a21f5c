"""What is replayed: the reference training step — its ops (``ops``), the model's parameters and
forward (``model``), the step with checkpointing, backward and optimizer (``program``) — its
closed-form templates in the micro-batch size and sequence length (``template``) and the memoised
single-device answer (``simulate``). Imports ``planner.catalog`` and ``planner.machine``."""
