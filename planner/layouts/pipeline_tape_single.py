"""What a one-stage-per-rank schedule's bookkeeping adds to a taped loop (GPipe, 1F1B).

ScheduleGPipe and Schedule1F1B (``planner/layouts/pipeline_memory.py``: ``step``) hold storages
between actions that a composed action's record does not: the latest forward's output (the
``output`` variable, 1F1B's ``fwd_sends``) until the next forward returns, 1F1B's
second-to-last warm-up output in ``send_work`` until the backward that ends the 1B1F loop, and
1F1B's previous backward's input gradient until the next backward ends. Whether each is freed
where it is dropped, or later by another holder, depends on the order of the rank's actions,
not on their kinds. ``extras`` works it out over the rank's action columns at once: per action,
the bytes that change after its rows (a backward's output still held, a forward's drop of the
previous output, 1F1B's drops), what the loop's end frees (the latest output, a warm-up output
never dropped), and the input gradients the send works still hold when the loop ends.
"""

from __future__ import annotations

import numpy as np

from planner.machine.stepsim import _INDEX

__all__ = ["SINGLE", "extras", "held_records", "held_sizes"]

SINGLE = ("gpipe", "1f1b")


def extras(name: str, stage: int, S: int, m: int, kind, mb, out: tuple,
           grads: tuple) -> tuple:
    """(per action the change of each category's live bytes after its rows, an (n, 5) array;
    the change at the loop's end; the input gradients left to the send works, (bytes,
    category index) pairs) of a rank of schedule ``name`` holding ``stage`` of ``S``, whose
    actions are ``kind`` (0 forward, 1 backward) of micro-batches ``mb``. ``out``: a forward's
    output (bytes, category index); ``grads``: the input gradient of the step's first backward
    and of the others ((bytes, category index) or None: the first stage hands none back)."""
    n = len(kind)
    X = np.zeros((n, 5), dtype=np.int64)
    end = np.zeros(5, dtype=np.int64)
    pos = np.arange(n)
    isF, isB = kind == 0, kind == 1
    if not isB.any():
        return X, end, []
    ob, oc = out
    last = stage == S - 1  # (its outputs are kept by output_chunks too)
    latest = np.maximum.accumulate(np.where(isF, pos, -1))  # the last forward so far
    back = np.full(m, n, dtype=np.int64)  # each micro-batch's backward
    back[mb[isB]] = pos[isB]
    fwd = np.full(m, n, dtype=np.int64)
    fwd[mb[isF]] = pos[isF]
    # 1F1B's warm-up keeps the output of forward warm - 2 until backward m - warm has run
    hold_j = drop_at = None
    if name == "1f1b" and not last:
        warm = min(m, S - stage)
        if 0 <= warm - 2 < m and fwd[warm - 2] < n:
            hold_j = warm - 2
            if 0 <= m - warm < m and back[m - warm] < n:
                drop_at = int(back[m - warm])
    until = n if drop_at is None else drop_at  # the warm-up output held through this action

    def warm_holds(j, k):
        return (j == hold_j) & (k <= until) if hold_j is not None else np.zeros_like(k, bool)

    # a backward's output still held when it ends: its bytes stay (recorded as if freed)
    bk, bj = pos[isB], mb[isB]
    held = last | (mb[np.maximum(latest[bk], 0)] == bj) | warm_holds(bj, bk)
    X[bk[held], oc] += ob
    # a forward drops the previous forward's output: freed where its backward has run
    fk = pos[isF][1:]
    if len(fk):
        jp = mb[latest[fk - 1]]
        freed = (back[jp] < fk) & ~warm_holds(jp, fk - 1) & (not last)
        X[fk[freed], oc] -= ob
    if name == "1f1b" and grads[0] is not None and len(bk) > 1:
        # each backward drops the previous one's input gradient when it ends
        X[bk[1], grads[0][1]] -= grads[0][0]
        X[bk[2:], grads[1][1]] -= grads[1][0]
    if drop_at is not None and back[hold_j] <= drop_at and mb[latest[drop_at]] != hold_j:
        X[drop_at, oc] -= ob  # the warm-up output, dropped after its backward
    # the loop's end drops the latest output and a warm-up output not dropped (their
    # backwards have run)
    if not last:
        left = {int(mb[latest[n - 1]])} | ({hold_j} if hold_j is not None and drop_at is None
                                           else set())
        end[oc] -= ob * sum(1 for j in left if back[j] < n)
    sends: list = []
    if grads[0] is not None:
        if name == "1f1b":
            sends = [grads[0] if len(bk) == 1 else grads[1]]
        else:
            sends = [grads[0]] + [grads[1]] * (len(bk) - 1)
    return X, end, sends


def held_records(memo, st: int, step: int, outs: dict) -> tuple | None:
    """(a forward's output, (bytes, category index); the input gradient of the step's first
    backward and of the others, or None) of a one-stage rank's kinds (``memo``: its
    ``ActionMemo``; ``outs``: each stage's forwards' outputs, (bytes, category)): what
    ``extras`` reads. None where its forwards' outputs differ or its first backward hands no
    gradient back from a stage past the first."""
    if len(outs.get(st, ())) != 1:
        return None
    nbytes, cat = next(iter(outs[st]))
    grads = []
    for name in ("B0", "B"):
        e = memo.entries.get((name, memo.roles.get(st, st), step))
        g = e.rec.grad if e is not None and e.verified else None
        grads.append(None if g is None or len(g) != 3 else (g[0], _INDEX[g[1]]))
    if st > 0 and grads[0] is None:
        return None
    return (nbytes, _INDEX[cat]), (grads[0], grads[1] or grads[0])


def held_sizes(hold: tuple) -> list:
    """``held_records``' answer as the three sizes ``extras`` is linear in, (bytes, category
    index) each: a forward's output, the step's first backward's input gradient, the others'
    ((0, -1) where there is none)."""
    out, grads = hold
    return [out] + [g if g is not None else (0, -1) for g in grads]
