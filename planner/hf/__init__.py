"""The transformers implementation: the Hugging Face model code in a trainer-style step, traced
under FakeTensorMode for estimates and run for validation (torch and transformers imported
lazily: the ``memplan[hf]`` extra)."""
