"""The routes' planners: one module per API route (``memory``, ``zero``, ``checkpointing``,
``pipeline``) and what they explain (``memory_notes``, ``micro_batch``, ``pipeline_svg``,
``checkpoint_solvers``). The top layer: imports any other package, nothing imports it but the
service."""
