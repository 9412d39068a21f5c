"""Validation jobs: the store (the queue), executors, and workers."""

from service.jobs.executors import (Execution, Executor, InlineExecutor, Outcome,
                                    SpawnedProcessExecutor, fit_check)
from service.jobs.store import (BadCursor, Claim, JobFinished, JobNotFound, JobStore,
                                Requirements, StoreHolder)

__all__ = ["JobStore", "StoreHolder", "Claim", "Requirements", "JobNotFound", "JobFinished",
           "BadCursor", "Executor", "Execution", "Outcome", "SpawnedProcessExecutor",
           "InlineExecutor", "fit_check"]
