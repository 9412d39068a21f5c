"""What is replayed: the reference training step — its ops (``ops``, the matmuls in
``matmul_ops``), the model's parameters and forward (``model``), the step with checkpointing
(``checkpoint``), backward and optimizer (``program``), which blocks it simulates (``plans``) and
its peaks (``peaks``) — its closed forms in the micro-batch size and sequence length
(``template``) and in the model's dimensions too (``structure``, served by ``structures``), and
the memoised single-device answer (``simulate``). Imports ``planner.catalog`` and
``planner.machine``."""
