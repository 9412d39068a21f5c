"""The reference step's peaks as closed forms in the micro-batch size and the sequence length.

The step simulator (``planner/machine/stepsim.py``) replays the reference step with concrete sizes. Every
size it sees is a polynomial in the micro-batch ``B`` and the sequence length ``T`` (``B·T·h``,
``B·nh·T²`` of eager attention, ``T·hd`` of the rotary tables, ...), with the model's shape and
dtypes fixed. So one replay with ``B`` and ``T`` kept symbolic records, at every allocation, the
live bytes per category as polynomials; the peak of a window is the largest of those rows, and a
new ``(B, T)`` needs only the rows that can be the largest somewhere. That is the template.

Domains: a size of 1 is its own domain (a batch of one broadcasts like an unbatched tensor), so a
template covers B = 1 or B >= 2 (``B = 2 + b``, b >= 0), and likewise T.

Soundness: every decision the program takes on sizes (``max`` of two gradient sizes, a broadcast
test, ``if retained:``) goes through :class:`Poly`'s comparisons (planner/machine/symbolic.py), which
answer only when the answer holds for *every* size of the domain; otherwise they raise
:class:`Undecided` and the setup is replayed concretely instead. Candidate pruning
(planner/machine/peak_pruning.py) keeps the simulator's tie rule (the first allocation reaching the
peak wins), so a template's answer equals the concrete replay's exactly (tests/test_step_template.py
holds them equal over random architectures, every setting and random sizes).
"""


from __future__ import annotations

from dataclasses import dataclass

from planner.machine.peak_candidates import Candidates, fused_best, fused_totals
from planner.machine.recording import domain_of, record, window_candidates
from planner.machine.stepsim import PeakSnap, activation_snap
from planner.machine.symbolic import Poly, Undecided
from planner.step.peaks import StepPeaks, combine_peaks, combined
from planner.step.program import ReferenceProgram

__all__ = ["StepTemplate", "compile_template", "domain_of"]


@dataclass
class StepTemplate:
    """One configuration's step with B and T free over a domain; ``evaluate(B, T)`` equals
    ``ReferenceProgram.run()`` at those sizes."""

    domain: tuple[int | None, int | None]  # per size: None (>= 2) or the fixed value 1
    exps: tuple[tuple[int, int], ...]
    fb: list[Candidates]
    step: list[Candidates]  # the optimizer step's windows (ReferenceProgram.run_windows)
    act: Candidates
    act_max: Candidates
    combine: dict

    def covers(self, B: int, T: int) -> bool:
        return all(d is None and v >= 2 or d == v for d, v in zip(self.domain, (B, T)))

    def __post_init__(self) -> None:
        # the forward/backward and optimizer windows and the activation-max row (the memory
        # route reads it with every answer) as one generated function (fused_best)
        self._windows = fused_best([self.fb, self.step, [self.act_max]])
        self._states, self._amp_scaler = self.combine["states"], self.combine["amp_scaler"]
        self.act.ready()  # read through its own ``best`` (``act_peak``)
        # the windows' totals and instants alone (``steady``: a note reads a variant's)
        self._totals = fused_totals([*self.fb, *self.step])

    def steady(self, B: int, T: int) -> tuple[int, str, str]:
        """``evaluate(B, T).steady``'s total, op and phase alone (what a note reads), combined
        as ``combine_peaks`` does without the categories."""
        wins = self._totals(B - 2, T - 2)
        n, states = len(self.fb), self._states
        best = wins[0]
        for p in wins[1:n]:  # the first of the highest forward/backward window
            if p[0] > best[0]:
                best = p
        scaler = 8 if self._amp_scaler and best[2] == "forward" else 0
        out = (best[0] + states + scaler, best[1], best[2])
        for p in wins[n:-1]:  # the optimizer step's windows but the last, states live
            if p[0] + states > out[0]:
                out = (p[0] + states, p[1], p[2])
        return wins[-1] if wins[-1][0] > out[0] else out

    def evaluate(self, B: int, T: int) -> StepPeaks:
        b, t = B - 2, T - 2
        fb, step, (act_max,) = self._windows(b, t)
        return combine_peaks(fb, step, lambda: self.act.best(b, t), states=self._states,
                             amp_scaler=self._amp_scaler,
                             act_max=lambda: _activation_snap(act_max),
                             act_total=_activation_total(act_max))

    def answer(self, B: int, T: int) -> tuple[PeakSnap, PeakSnap, PeakSnap, int]:
        """``evaluate(B, T)``'s (first, steady, fb_steady, act_max_total), what POST
        /v1/memory's answer reads (planner/routes/memory_known.py), without the rest."""
        fb, step, (act_max,) = self._windows(B - 2, T - 2)
        first, steady, _, shifted = combined(fb, step, self._states, self._amp_scaler)
        return first, steady, shifted, _activation_total(act_max)


def _activation_snap(p: PeakSnap) -> PeakSnap:
    """A candidate row of the activation-max window as the machine records it
    (``stepsim.activation_snap``): the bytes and the phase only."""
    return PeakSnap() if p.total <= 0 else activation_snap(p.total, p.phase)


def _activation_total(p: PeakSnap) -> int:
    """``_activation_snap(p).total`` without building the snapshot."""
    return p.total if p.total > 0 else 0


def compile_template(model, training, device: str, checkpointed: set[int],
                     domain: tuple[int | None, int | None], make=None) -> StepTemplate:
    """Replay the step once with the sizes of ``domain`` symbolic; raises Undecided (or
    TypeError, from a size the program cannot take symbolically) when the replay depends on
    their values. ``make(machine, sizes)`` builds the program (default: ReferenceProgram; a
    data-parallel rank's ParallelProgram, for instance)."""
    if make is None:
        def make(m, sizes):
            return ReferenceProgram(model, training, device=device, checkpointed=checkpointed,
                                    machine=m, sizes=sizes)
    m, prog = record(make, domain)
    fb, steps, _, combine = prog.run_windows()
    if isinstance(combine["states"], Poly):
        raise Undecided("optimizer states depend on the sizes")
    exps, cands, act, act_max = window_candidates(m, [*fb, *steps], act=True)
    return StepTemplate(domain, exps, cands[:len(fb)], cands[len(fb):], act, act_max, combine)
