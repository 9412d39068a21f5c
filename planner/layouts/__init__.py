"""How ranks and stages compose: per-rank model states and shards (``sharding``, the reference
model's tensors per stage in ``parameter_tensors``), one data-parallel rank's replay
(``data_parallel``, FSDP2's groups in ``fsdp_groups``), pipeline schedules (``pipeline_orders``,
``pipeline_schedules``, ``pipeline_vshaped``), their simulation and each pipeline rank's replay
(``pipeline_memory``, its backward in ``pipeline_stage_backward``), the periodic runs of a rank's
action list (``pipeline_runs``, ``pipeline_periods``) and its structure templates
(``pipeline_structure*``), a known pipelined setup's worst rank in one generated function
(``pipeline_fused``), tensor/pipeline composition (``compose``) and Megatron's activation
formula (``megatron``). Imports ``catalog``, ``machine`` and ``step``."""
