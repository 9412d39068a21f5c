"""The schedule memo (planner/layouts/pipeline_schedules.py: ``schedule_of``,
``rank_stages``) gives the schedule ``build_schedule`` builds and each rank's stages in order."""

from __future__ import annotations

import pytest

from planner.layouts import pipeline_schedules as schedules
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 4, 8, 1), ("1f1b", 8, 16, 1),
                                        ("interleaved-1f1b", 4, 8, 2), ("zb-h1", 4, 8, 1),
                                        ("zb-v", 4, 8, 2), ("dualpipe-v", 4, 8, 2)])
def test_memoised_schedule_equals_a_fresh_build(name: str, p: int, m: int, v: int) -> None:
    got = schedules.schedule_of(name, p, m, v)
    assert schedules.schedule_of(name, p, m, v) is got  # memoised
    want = build_schedule(name, p, m, v)
    assert got == want
    stages = schedules.rank_stages(got)
    assert stages == [[s for s in range(want.num_stages) if want.stage_to_rank[s] == r]
                      for r in range(want.num_ranks)]
    # a schedule built elsewhere gets the same stages
    assert schedules.rank_stages(want) == stages


def test_a_constraint_error_is_raised_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ScheduleConstraintError):
            schedules.schedule_of("dualpipe-v", 4, 3, 2)
