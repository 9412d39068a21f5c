"""The routes' planners: one module per API route (``memory``, ``zero``, ``checkpointing``,
``pipeline``, ``plan_search``) with the parts they are built of (e.g. ``memory_reference``,
``memory_allocator``, ``checkpoint_specs``, ``plan_space``) and what they explain
(``memory_notes``, ``micro_batch``, ``pipeline_svg``, ``checkpoint_solvers``). The top layer:
imports any other package, nothing imports it but the service."""
