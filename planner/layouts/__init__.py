"""How ranks and stages compose: per-rank model states and shards (``sharding``), one
data-parallel rank's replay (``data_parallel``), pipeline schedules, their simulation and each
pipeline rank's replay and its structure templates (``pipeline_*``), tensor/pipeline composition (``compose``) and Megatron's
activation formula (``megatron``). Imports ``catalog``, ``machine`` and ``step``."""
