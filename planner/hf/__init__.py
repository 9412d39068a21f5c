"""The transformers implementation: the Hugging Face model code in a trainer-style step, traced
under FakeTensorMode for estimates (``step``; what a trace changes to take the real run's path in
``tracing``) and run for validation (torch and transformers imported lazily: the ``memplan[hf]``
extra)."""
