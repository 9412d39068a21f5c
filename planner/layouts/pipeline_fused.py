"""A known pipelined setup's answer as one generated function: the worst rank and its snapshots.

``fused_best`` (planner/machine/peak_candidates.py) evaluates every window of every rank: each
rank's first-step and steady-state snapshots, categories included. POST /v1/memory reports only
the worst rank's two snapshots and, per rank, the steady peak's total, phase and op (its note).
``worst_rank_fn`` generates the function that computes exactly that: every rank's steady total
and the row it comes from, the worst rank (the highest steady total, the lowest rank among
equals, as ``max`` over ``(total, -rank)`` picks it), the note, and the categories and the
first-step window of that rank alone. Same rows, same comparisons, same order as ``best``:
tests/test_known_answers.py holds it equal to ``fused_best`` over random sizes.
"""

from __future__ import annotations

from planner.machine.peak_candidates import Candidates, bt_monomials
from planner.machine.stepsim import PeakSnap

__all__ = ["worst_rank_fn"]


def worst_rank_fn(windows: list[list[Candidates]], heads: list[str]):
    """``f(b, t) -> (worst rank's index, the per-rank note, its first snapshot, its steady
    snapshot)`` for ranks whose windows are ``[first, steady]`` over (b, t) = (B - 2, T - 2);
    ``heads``: each rank's note head. None when a window is over the sizes themselves."""
    if any(len(g) != 2 or g[1].names is not None or g[0].names is not None for g in windows):
        return None
    cands = [c for g in windows for c in g]
    ns: dict = {"P": PeakSnap}
    pro, expr = bt_monomials(cands)

    def total(c: Candidates, v: str, k: str, pad: str) -> list[str]:
        """Lines leaving the window's total in v and its row in k (-1: the empty snapshot)."""
        if not c.key:
            return [f"{pad}{v} = 0; {k} = -1"]
        out = [f"{pad}{v} = {expr(c.exps, c.key[0])}; {k} = 0"]
        for r, vec in enumerate(c.key[1:], 1):
            out += [f"{pad}x = {expr(c.exps, vec)}", f"{pad}if x > {v}:",
                    f"{pad}    {v} = x; {k} = {r}"]
        if c.zero:
            out += [f"{pad}if {v} <= 0:", f"{pad}    {v} = 0; {k} = -1"]
        return out

    def snap(c: Candidates, w: int, v: str, k: str, pad: str, out: str) -> list[str]:
        """Lines leaving window w's snapshot in ``out``, its total and row in v and k."""
        lines = [f"{pad}if {k} < 0:", f"{pad}    {out} = P()"]
        ns[f"o{w}"], ns[f"p{w}"] = c.ops, c.phases
        for r, cats in enumerate(c.cats):
            lines += [f"{pad}elif {k} == {r}:" if r < len(c.cats) - 1 else f"{pad}else:",
                      f"{pad}    {out} = P({v}, [{', '.join(expr(c.exps, x) for x in cats)}], "
                      f"o{w}[{r}], p{w}[{r}])"]
        return lines

    lines = ["def f(b, t):", *pro]
    for r, (_, steady) in enumerate(windows):
        lines += total(steady, f"v{r}", f"k{r}", "    ")
        # the note's text after the total, per row (the last: the empty snapshot's)
        ns[f"n{r}"] = tuple([*(f" B at {ph} {op}" for op, ph in zip(steady.ops, steady.phases)),
                             " B at  "])
    lines.append("    w = 0; wv = v0")
    for r in range(1, len(windows)):
        lines += [f"    if v{r} > wv:", f"        w = {r}; wv = v{r}"]
    ns["H"] = list(heads)
    note = "; ".join(f"{{H[{r}]}}{{v{r}}}{{n{r}[k{r}]}}" for r in range(len(windows)))
    lines.append(f'    note = f"{note}"')
    for r, (first, steady) in enumerate(windows):
        lines.append("    if True:" if len(windows) == 1 else
                     f"    {'if' if r == 0 else 'elif'} w == {r}:" if r < len(windows) - 1
                     else "    else:")
        lines += total(first, "fv", "fk", "        ")
        lines += snap(first, 2 * r, "fv", "fk", "        ", "fs")
        lines += snap(steady, 2 * r + 1, f"v{r}", f"k{r}", "        ", "ss")
    lines.append("    return w, note, fs, ss")
    exec(compile("\n".join(lines) + "\n", "<worst rank>", "exec"), ns)  # noqa: S102
    return ns["f"]
