"""The planner's one error type: a well-formed request that cannot be planned."""


class PlanningError(ValueError):
    """``field`` names the input at fault (dotted, e.g. ``parallelism.tensor_parallel``)."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.field = detail, field
