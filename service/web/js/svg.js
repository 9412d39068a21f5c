// Inline SVG charts drawn from API answers (no chart library), and number formats.
const NS = "http://www.w3.org/2000/svg";

export const CATEGORIES = ["parameters", "gradients", "optimizer_states", "activations", "temporaries"];
export const COLORS = { parameters: "#1f5fa8", gradients: "#c4501b", optimizer_states: "#2c7a3f",
                        activations: "#7b3fa0", temporaries: "#8a6d00", reserve: "#9aa0a6" };

/** Bytes in the largest binary unit that keeps the figure at 1 or more (GiB at most). */
export function gib(bytes) {
  const a = Math.abs(bytes);
  const [div, unit] = a >= 2 ** 30 || a === 0 ? [2 ** 30, "GiB"] : a >= 2 ** 20 ? [2 ** 20, "MiB"] : a >= 2 ** 10 ? [2 ** 10, "KiB"] : [1, "B"];
  return `${(bytes / div).toFixed(div === 1 ? 0 : 2)} ${unit}`;
}
export function exact(bytes) { return `${Number(bytes).toLocaleString("en-US")} B`; }
export function pct(x) { return x == null ? "–" : `${(100 * x).toFixed(1)}%`; }

export function svg(tag, attrs = {}, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

/** Horizontal stacked bars. rows: [{label, segments: [{key, bytes, color, hatch?}], note?}];
 *  lines: [{bytes, label, color}] drawn across all rows (e.g. the GPU's capacity). */
export function stackedBars(rows, lines = [], { width = 760, rowHeight = 34, title = "" } = {}) {
  const left = 190, right = 20, top = 28, gap = 16;
  const height = top + rows.length * (rowHeight + gap) + 28;
  const max = Math.max(1, ...rows.map((r) => r.segments.reduce((a, s) => a + s.bytes, 0)),
                       ...lines.map((l) => l.bytes));
  const scale = (width - left - right) / (max * 1.02);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img",
                            "aria-label": title, class: "chart" });
  root.append(svg("title", {}, title));
  const defs = svg("defs");
  const pat = svg("pattern", { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse",
                               patternTransform: "rotate(45)" });
  pat.append(svg("rect", { width: 6, height: 6, fill: "#dfe1e5" }),
             svg("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: COLORS.reserve, "stroke-width": 3 }));
  defs.append(pat); root.append(defs);
  rows.forEach((row, i) => {
    const y = top + i * (rowHeight + gap);
    root.append(svg("text", { x: left - 8, y: y + rowHeight / 2 + 4, "text-anchor": "end", class: "label" }, row.label));
    let x = left;
    for (const s of row.segments) {
      const w = s.bytes * scale;
      const rect = svg("rect", { x, y, width: Math.max(0, w), height: rowHeight,
                                 fill: s.hatch ? "url(#hatch)" : s.color, "data-key": s.key,
                                 "data-bytes": String(s.bytes) });
      rect.append(svg("title", {}, `${s.key}: ${gib(s.bytes)} (${exact(s.bytes)})`));
      root.append(rect);
      x += w;
    }
    if (row.note) {
      const near = x + 6 > width - right - 7 * row.note.length;  // no room on the right: end at the bar
      root.append(svg("text", { x: near ? x : x + 6, y: y + rowHeight + 12, "text-anchor": near ? "end" : "start", class: "small" }, row.note));
    }
  });
  for (const l of lines) {
    const x = left + l.bytes * scale;
    root.append(svg("line", { x1: x, x2: x, y1: top - 10, y2: height - 20, stroke: l.color || "#b00020",
                              "stroke-width": 2, "stroke-dasharray": "6 3", "data-key": l.key,
                              "data-bytes": String(l.bytes) }));
    root.append(svg("text", { x: Math.min(x, width - 4), y: top - 14, "text-anchor": "end", class: "small" }, l.label));
  }
  root.append(svg("text", { x: left, y: height - 4, class: "small" }, `0 … ${gib(max)}`));
  return root;
}

/** A line chart: series [{label, points: [[x, y]], color}], x on a log2 axis, y in bytes;
 *  hline: {bytes, label}; mark: {x, y, label}. */
export function lineChart(series, { hline, mark, xLabel = "", title = "", width = 760, height = 300 } = {}) {
  const left = 80, right = 20, top = 20, bottom = 44;
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1])).concat(hline ? [hline.bytes] : []);
  const x0 = Math.log2(Math.min(...xs)), x1 = Math.log2(Math.max(...xs)) || 1;
  const yMax = Math.max(...ys) * 1.08 || 1;
  const X = (x) => left + ((Math.log2(x) - x0) / Math.max(1e-9, x1 - x0)) * (width - left - right);
  const Y = (y) => top + (1 - y / yMax) * (height - top - bottom);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img",
                            "aria-label": title, class: "chart" });
  root.append(svg("title", {}, title));
  root.append(svg("line", { x1: left, x2: width - right, y1: Y(0), y2: Y(0), stroke: "#333" }));
  root.append(svg("line", { x1: left, x2: left, y1: top, y2: Y(0), stroke: "#333" }));
  for (let k = 0; k <= 4; k++) {
    const v = (yMax / 4) * k;
    root.append(svg("text", { x: left - 6, y: Y(v) + 4, "text-anchor": "end", class: "small" }, gib(v)));
  }
  for (const x of [...new Set(xs)]) {
    root.append(svg("text", { x: X(x), y: Y(0) + 16, "text-anchor": "middle", class: "small" }, String(x)));
  }
  root.append(svg("text", { x: (left + width) / 2, y: height - 6, "text-anchor": "middle", class: "label" }, xLabel));
  if (hline) {
    root.append(svg("line", { x1: left, x2: width - right, y1: Y(hline.bytes), y2: Y(hline.bytes),
                              stroke: "#b00020", "stroke-width": 2, "stroke-dasharray": "6 3" }));
    root.append(svg("text", { x: width - right, y: Y(hline.bytes) - 5, "text-anchor": "end", class: "small" }, hline.label));
  }
  for (const s of series) {
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    root.append(svg("path", { d, fill: "none", stroke: s.color, "stroke-width": 2.5 }));
    for (const p of s.points) {
      const c = svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 4, fill: s.color, "data-x": p[0], "data-bytes": p[1] });
      c.append(svg("title", {}, `${s.label} at ${p[0]}: ${gib(p[1])}`));
      root.append(c);
    }
  }
  if (mark) {
    root.append(svg("circle", { cx: X(mark.x), cy: Y(mark.y), r: 9, fill: "none", stroke: "#111", "stroke-width": 2.5, class: "mark", "data-x": mark.x }));
    root.append(svg("text", { x: X(mark.x) - 14, y: Y(mark.y) + 24, "text-anchor": "end", class: "label" }, mark.label));
  }
  return root;
}

/** A legend of colour keys (text, so it reads without colour too). */
export function legend(keys) {
  const ul = document.createElement("ul");
  ul.className = "legend";
  for (const k of keys) {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = k.hatch ? "repeating-linear-gradient(45deg,#9aa0a6 0 3px,#dfe1e5 3px 6px)" : COLORS[k.key] || k.color;
    li.append(sw, document.createTextNode(` ${k.label || k.key.replace(/_/g, " ")}`));
    ul.append(li);
  }
  return ul;
}

/** A scatter of points [{x, y, front, label}]: x in seconds (linear), y in bytes; the front's
 *  points filled and joined as a staircase, the others hollow. */
export function scatter(points, { xLabel = "", title = "", width = 760, height = 320 } = {}) {
  const left = 80, right = 20, top = 20, bottom = 44;
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const span = Math.max(...xs) - Math.min(...xs) || Math.max(...xs) || 1;
  const x0 = Math.max(0, Math.min(...xs) - 0.08 * span), x1 = Math.max(...xs) + 0.08 * span;
  const yMax = Math.max(...ys) * 1.08 || 1;
  const X = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const Y = (y) => top + (1 - y / yMax) * (height - top - bottom);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", "aria-label": title, class: "chart scatter" });
  root.append(svg("title", {}, title));
  root.append(svg("line", { x1: left, x2: width - right, y1: Y(0), y2: Y(0), stroke: "#333" }));
  root.append(svg("line", { x1: left, x2: left, y1: top, y2: Y(0), stroke: "#333" }));
  for (let k = 0; k <= 4; k++) {
    const v = (yMax / 4) * k, t = x0 + ((x1 - x0) / 4) * k;
    root.append(svg("text", { x: left - 6, y: Y(v) + 4, "text-anchor": "end", class: "small" }, gib(v)));
    root.append(svg("text", { x: X(t), y: Y(0) + 16, "text-anchor": "middle", class: "small" }, t.toPrecision(3)));
  }
  root.append(svg("text", { x: (left + width) / 2, y: height - 6, "text-anchor": "middle", class: "label" }, xLabel));
  root.append(svg("text", { x: left + 6, y: top + 4, class: "small" }, "peak per device"));
  const front = points.filter((p) => p.front).sort((a, b) => a.x - b.x);
  if (front.length > 1) {
    const d = front.map((p, i) => `${i ? `L${X(p.x).toFixed(1)},${Y(front[i - 1].y).toFixed(1)} L` : "M"}${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join(" ");
    root.append(svg("path", { d, fill: "none", stroke: "#1f5fa8", "stroke-width": 2, class: "front-line" }));
  }
  for (const p of [...points.filter((q) => !q.front), ...front]) {
    const c = svg("circle", { cx: X(p.x), cy: Y(p.y), r: p.front ? 6 : 4.5, class: p.front ? "front" : "other",
                              "data-front": String(Boolean(p.front)), "data-step-s": String(p.x), "data-bytes": String(p.y) });
    c.append(svg("title", {}, `${p.label}: ${p.x.toPrecision(4)} s per step, ${gib(p.y)} peak${p.front ? " (Pareto front)" : ""}`));
    root.append(c);
  }
  return root;
}
