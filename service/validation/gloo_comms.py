"""FSDP2's deterministic gloo collectives: planner/hf/gloo_comms.py, shared with the
transformers rank program."""

from planner.hf.gloo_comms import install_gloo_comms  # noqa: F401
