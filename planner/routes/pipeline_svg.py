"""The pipeline timeline as an SVG picture: one row per rank, F / B / I / W coloured, idle blank.

Pure string building; ``render_svg(result)`` takes a ``PipelineResult`` with its timeline.
"""

from __future__ import annotations

from html import escape

from planner.routes.pipeline import PipelineResult

COLOURS = {"F": "#4c78a8", "B": "#e45756", "I": "#f58518", "W": "#54a24b"}
NAMES = {"F": "forward", "B": "backward", "I": "backward (inputs)", "W": "backward (weights)"}
WIDTH_PX = 1200
ROW_PX = 26
LEFT_PX = 70
TOP_PX = 44


def render_svg(result: PipelineResult) -> str:
    """SVG timeline of ``result`` (needs ``result.timeline``)."""
    if result.timeline is None:
        raise ValueError("the result has no timeline: " + (result.timeline_omitted or "omitted"))
    p = result.stages
    span = result.makespan_s or 1.0
    plot_w = WIDTH_PX - LEFT_PX - 20
    scale = plot_w / span
    height = TOP_PX + p * ROW_PX + 56
    title = (f"{result.schedule}: p={p}, m={result.microbatches}, v={result.virtual_stages} — "
             f"makespan {result.makespan_s:.4g} s, bubble {100 * result.bubble_fraction:.1f}%")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH_PX}" height="{height}" '
           f'viewBox="0 0 {WIDTH_PX} {height}" font-family="sans-serif" font-size="11">',
           f"<title>{escape(title)}</title>",
           f'<rect width="{WIDTH_PX}" height="{height}" fill="white"/>',
           f'<text x="{LEFT_PX}" y="18" font-size="13">{escape(title)}</text>']
    show_labels = len(result.timeline) <= 400
    for r in range(p):
        y = TOP_PX + r * ROW_PX
        # idle background: every gap between actions shows through as light grey
        out.append(f'<rect x="{LEFT_PX}" y="{y}" width="{plot_w:.2f}" height="{ROW_PX - 4}" '
                   f'fill="#eeeeee"/>')
        out.append(f'<text x="4" y="{y + ROW_PX / 2 + 2:.1f}">rank {r}</text>')
    for e in result.timeline:
        x = LEFT_PX + e.start_s * scale
        w = max((e.end_s - e.start_s) * scale, 0.5)
        y = TOP_PX + e.rank * ROW_PX
        out.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW_PX - 4}" '
                   f'fill="{COLOURS[e.kind]}" stroke="white" stroke-width="0.5">'
                   f"<title>{e.kind} stage {e.stage} micro-batch {e.microbatch}: "
                   f"{e.start_s:.4g}–{e.end_s:.4g} s</title></rect>")
        if show_labels and w > 14:
            out.append(f'<text x="{x + w / 2:.2f}" y="{y + ROW_PX / 2 + 2:.1f}" '
                       f'text-anchor="middle" fill="white" font-size="9">{e.microbatch}</text>')
    ly = TOP_PX + p * ROW_PX + 18
    lx = LEFT_PX
    kinds = sorted({e.kind for e in result.timeline}, key="FBIW".index)
    for k in kinds + ["idle"]:
        colour = "#eeeeee" if k == "idle" else COLOURS[k]
        label = "idle" if k == "idle" else f"{k}: {NAMES[k]}"
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{colour}" '
                   f'stroke="#999" stroke-width="0.5"/>')
        out.append(f'<text x="{lx + 16}" y="{ly + 10}">{escape(label)}</text>')
        lx += 24 + 7 * len(label)
    out.append(f'<text x="{LEFT_PX}" y="{ly + 32}" fill="#555">time 0 – {span:.4g} s; '
               f"per-rank idle: " + ", ".join(f"{100 * rf.idle_s / span:.0f}%"
                                               for rf in result.ranks[:16])
               + (" …" if p > 16 else "") + "</text>")
    out.append("</svg>")
    return "\n".join(x for x in out if x)
