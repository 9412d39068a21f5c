"""The base of every contract model: frozen (hashable, safe to cache on) and strict (an unknown
field is a 422, not silently ignored)."""

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
