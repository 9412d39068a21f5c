"""What the service answers when the ``memplan[hf]`` extra is not installed."""

from __future__ import annotations


class ExtraMissing(Exception):
    """transformers (or torch) is not importable here: the route answers 503 saying so."""

    def __init__(self, missing: str) -> None:
        super().__init__(
            f"implementation 'transformers' needs the {missing} package, which this service "
            "does not have: install memplan[hf] (pip install 'memplan[hf]')")
        self.detail = str(self)


def require_transformers() -> None:
    for name in ("torch", "transformers"):
        try:
            __import__(name)
        except ImportError:
            raise ExtraMissing(name) from None
