"""The live-memory meter (``planner/hf/meter.py``): shared by the validation runner and the
transformers implementation's traced estimate, so estimate and measurement count alike."""

from planner.hf.meter import (  # noqa: F401
    CATEGORIES, LiveMemoryMeter, Peak, Record, _flat_tensors, _storages)
