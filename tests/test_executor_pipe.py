"""The spawned-process executor reads everything a job wrote before it counts the job's exit as a
failure: a result sent just before the process exits is a result, however the reads were cut."""

from __future__ import annotations

from planner.catalog.specs import ValidationRequest
from service.jobs.executors import SpawnedProcessExecutor


def _request() -> ValidationRequest:
    return ValidationRequest.model_validate({
        "model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "vocab_size": 256, "max_sequence_length": 64},
        "training": {"precision": "fp32", "sequence_length": 32},
        "device": "cpu", "steps": 3, "timeout_s": 60.0,
    })


def test_a_result_behind_progress_in_the_pipe_is_read_after_the_exit():
    execution = SpawnedProcessExecutor("tests.jobtargets:chatty").start(_request(), 0)
    # Let the job send its 200 progress messages and its result, and exit, before any read.
    execution.process.join(60)
    assert execution.process.exitcode == 0
    progress = []
    for _ in range(400):  # each poll with no time left reads at most one message, then looks
        progress += execution.poll(0.0)  # at the process: gone
        if execution.outcome is not None:
            break
    outcome = execution.outcome
    assert outcome is not None and outcome.error is None, outcome
    assert outcome.result is not None and outcome.result.measured.total == 4600
    assert len(progress) == 200


def test_a_process_that_exits_without_a_result_still_fails_with_its_code():
    execution = SpawnedProcessExecutor("tests.jobtargets:crash").start(_request(), 0)
    execution.process.join(60)
    while execution.outcome is None:
        execution.poll(0.0)
    assert execution.outcome.error == "the job process exited with code 3 without a result"
