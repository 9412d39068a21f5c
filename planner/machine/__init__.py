"""How a step is replayed and compiled: the byte-exact step simulator (``stepsim``), sizes as
polynomials (``symbolic``), the recording machine that turns a symbolic replay into peak
candidates (``recording``; their pruning ``peak_pruning``, their evaluation
``peak_candidates``), the memoisation of replays and templates (``cache``) and the per-request
work limit (``deadline``). Imports only ``planner.catalog``."""
