"""A replayed step's peaks (``StepPeaks``), and how the windows' peaks combine into them
(``combine_peaks``: the forward/backward windows, the optimizer step's, the states that live
across steps)."""

from __future__ import annotations

from typing import Callable

from planner.machine.stepsim import PeakSnap

__all__ = ["StepPeaks", "combine_peaks"]


class StepPeaks:
    """A step's peaks. ``steady`` is the step's peak (step 2+), ``first`` that of step 1;
    ``forward_peak`` is the highest total of forward/backward in step 1 and ``fb_steady`` the
    same instant in the steady state (optimizer states live): the step's peak unless the
    optimizer step is higher. ``act_peak`` (highest activations + temporaries in
    forward/backward) and ``act_max`` (highest live activation bytes, ``stepsim.activation_snap``)
    may be given as functions, evaluated when first read; ``act_total``, ``act_max``'s total
    when it is known without building it (``act_max_total``)."""

    __slots__ = ("first", "steady", "forward_peak", "fb_steady", "_act", "_act_max", "notes",
                 "_act_total")

    def __init__(self, first: PeakSnap, steady: PeakSnap, forward_peak: PeakSnap | None = None,
                 act_peak: "PeakSnap | Callable[[], PeakSnap] | None" = None,
                 notes: list[str] | None = None, *, fb_steady: PeakSnap | None = None,
                 act_max: "PeakSnap | Callable[[], PeakSnap] | None" = None,
                 act_total: int | None = None) -> None:
        self.first, self.steady, self.forward_peak = first, steady, forward_peak
        self._act, self.notes = act_peak, notes or []
        self.fb_steady, self._act_max, self._act_total = fb_steady, act_max, act_total

    @property
    def act_peak(self) -> PeakSnap | None:
        if callable(self._act):
            self._act = self._act()
        return self._act

    @property
    def act_max(self) -> PeakSnap | None:
        if callable(self._act_max):
            self._act_max = self._act_max()
        return self._act_max

    @property
    def act_max_total(self) -> int:
        """``act_max.total`` (the memory route's activation peak), without building the
        snapshot where its total was given."""
        if self._act_total is not None:
            return self._act_total
        return self.act_max.total


def _first_highest(peaks: list[PeakSnap]) -> PeakSnap:
    best = peaks[0]
    for p in peaks[1:]:
        if p.total > best.total:
            best = p
    return best


def _plus_states(p: PeakSnap, states: int, scaler: int = 0) -> PeakSnap:
    by = list(p.by_cat)
    by[2] += states
    by[4] += scaler
    return PeakSnap(p.total + states + scaler, by, p.op, p.phase)


def combine_peaks(fb_peaks: list[PeakSnap], step_peaks: list[PeakSnap], act_peak, *,
                  states: int, amp_scaler: bool, act_max=None,
                  act_total: int | None = None) -> StepPeaks:
    """A steady-state step (2+) repeats step 1's forward and backward exactly, with the optimizer
    states (allocated during step 1's ``optimizer.step()``) live throughout; so one simulated
    forward/backward serves both: steady peak = max(fwd/bwd peak + states, step peak).
    ``step_peaks``: the optimizer step's windows in order; all but the last ran before step 1
    made the states, so in a steady step they run with the states live too."""
    first, steady, fwdbwd, shifted = combined(fb_peaks, step_peaks, states, amp_scaler)
    return StepPeaks(first, steady, fwdbwd, act_peak, None, fb_steady=shifted, act_max=act_max,
                     act_total=act_total)


def combined(fb_peaks: list[PeakSnap], step_peaks: list[PeakSnap], states: int,
             amp_scaler: bool) -> tuple[PeakSnap, PeakSnap, PeakSnap, PeakSnap]:
    """``combine_peaks``'s (first, steady, forward peak, steady forward/backward peak)."""
    fwdbwd = _first_highest(fb_peaks)  # the first of the highest
    first = fwdbwd
    for p in step_peaks:  # the first of the highest of [fwdbwd, *step_peaks]
        if p.total > first.total:
            first = p
    # GradScaler's scale and growth tracker are created in step 1's backward and persist.
    scaler = 8 if amp_scaler and fwdbwd.phase == "forward" else 0
    shifted = _plus_states(fwdbwd, states, scaler)
    steady = shifted  # the first of the highest of [shifted, *step_peaks[:-1] + states, last]
    for p in step_peaks[:-1]:
        p = _plus_states(p, states)
        if p.total > steady.total:
            steady = p
    if step_peaks[-1].total > steady.total:
        steady = step_peaks[-1]
    return first, steady, fwdbwd, shifted
