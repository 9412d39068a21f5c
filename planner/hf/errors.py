"""What the service answers when the ``memplan[hf]`` extra is not installed."""

from __future__ import annotations


class ExtraMissing(Exception):
    """transformers (or torch) is not importable here: the route answers 503 saying so."""

    def __init__(self, missing: str) -> None:
        super().__init__(
            f"implementation 'transformers' needs the {missing} package, which this service "
            "does not have: install memplan[hf] (pip install 'memplan[hf]')")
        self.detail = str(self)


def require_transformers(model_type: str | None = None) -> None:
    """Import torch, transformers and (given ``model_type``) that family's modeling module.

    A process imports them once (seconds on a busy CPU); that time is not the request's work, so
    it does not count against the request's work limit: without this the first estimate of a
    freshly started service could run past its limit on the import alone."""
    from planner.machine.deadline import not_counted

    with not_counted():
        for name in ("torch", "transformers"):
            try:
                __import__(name)
            except ImportError:
                raise ExtraMissing(name) from None
        if model_type is not None:
            import transformers
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
            if name is not None:
                getattr(transformers, name, None)  # the lazy module's import of the family
