// Breakdown: POST /v1/memory, a stacked bar per category at the peak, the GPU's capacity line,
// the allocator reserve and the headroom; the forward/backward (activation) peak beside it.
import { CATEGORIES, COLORS, gib, stackedBars, legend } from "../svg.js";
import { el } from "../form.js";
import { bytesCell, table, notes, summary } from "./common.js";

function segments(b, reserve = 0) {
  const s = CATEGORIES.map((key) => ({ key, bytes: b[key], color: COLORS[key] }));
  if (reserve) s.push({ key: "allocator reserve", bytes: reserve, hatch: true });
  return s;
}

export default {
  id: "breakdown",
  title: "Breakdown",
  async render({ request, out, api, stale }) {
    const r = await api.memory(request);
    if (stale()) return;
    const rows = [{ label: "peak (steady state)", segments: segments(r.breakdown, r.allocator_reserve_bytes), note: r.peak_phase }];
    if (r.forward_backward_peak) {
      rows.push({ label: "forward/backward peak", segments: segments(r.forward_backward_peak), note: r.forward_backward_peak_phase });
    }
    if (r.activation_peak_bytes != null) {
      rows.push({ label: "activation peak", note: "highest live activations, forward or backward",
                  segments: [{ key: "activation peak", bytes: r.activation_peak_bytes, color: COLORS.activations }] });
    }
    if (r.first_step) rows.push({ label: "first step", segments: segments(r.first_step) });
    const lines = r.fit ? [{ key: "capacity", bytes: r.fit.memory_bytes, label: `${r.fit.gpu || "device"}: ${gib(r.fit.memory_bytes)}` }] : [];
    const fit = r.fit;
    const verdict = !fit ? "no device given" : fit.fits ? `fits, ${gib(fit.headroom_bytes)} headroom` : `does not fit: ${gib(-fit.headroom_bytes)} over`;
    const cols = [["breakdown", "steady-state peak"], ["forward_backward_peak", "forward/backward peak"], ["first_step", "first step"]]
      .filter(([k]) => r[k]);
    const body = [...CATEGORIES, "total"].map((cat) => [cat.replace(/_/g, " "), ...cols.map(([k]) => bytesCell(r[k][cat], `${k}.${cat}`))]);
    out.replaceChildren(
      el("h2", { text: `${modelName(r.model)}: ${gib(r.breakdown.total)} at the peak — ${verdict}`, class: fit && !fit.fits ? "bad" : "" }),
      summary([
        ["peak falls in", r.peak_phase, "peak_phase"],
        ["activation peak", r.activation_peak_bytes == null ? "–" : gib(r.activation_peak_bytes), "activation_peak_bytes"],
        ["forward/backward peak in", r.forward_backward_peak_phase || "–", "forward_backward_peak_phase"],
        ["allocator reserve", gib(r.allocator_reserve_bytes), "allocator_reserve_bytes"],
        ["headroom", fit ? gib(fit.headroom_bytes) : "–", "fit.headroom_bytes"],
        ["largest micro-batch that fits", fit && fit.max_micro_batch_size != null ? String(fit.max_micro_batch_size) : "–", "fit.max_micro_batch_size"],
      ]),
      stackedBars(rows, lines, { title: `Bytes per device by category at the peak: ${gib(r.breakdown.total)}` }),
      legend([...CATEGORIES.map((key) => ({ key })), { key: "reserve", label: "allocator reserve", hatch: true }]),
      suggestionsTable(request, r),
      table("Bytes per device by category", ["category", ...cols.map(([, t]) => t)], body),
      bytesSummary(r),
      notes("Notes", r.notes), notes("Assumptions", r.assumptions),
    );
  },
};

/** A preset's name, or what a config.json or architecture fields describe. */
function modelName(m) {
  return m.name || (m.model_type ? `${m.model_type} config.json` : "model");
}

/** The request after a suggestion's change (its parallelism and training fields set). */
function applied(request, s) {
  const out = { ...request, training: { ...(request.training || {}) }, parallelism: { ...(request.parallelism || {}) } };
  for (const [k, v] of Object.entries(s.training)) out.training[k] = k === "activation_checkpointing" ? { strategy: v } : v;
  Object.assign(out.parallelism, s.parallelism);
  return out;
}

function suggestionsTable(request, r) {
  if (!r.suggestions || !r.suggestions.length) return el("div");
  const link = (s) => `#${new URLSearchParams({ view: "breakdown", req: JSON.stringify(applied(request, s)) })}`;
  return el("div", { class: "suggestions" },
    el("h3", { text: "It fits with one of these changes" }),
    el("p", { class: "lede", text: "The API's suggestions: the smallest single changes after which the setup fits, each estimated like any request." }),
    table("Changes that make it fit, with the new peak per device", ["change", "peak after the change", "headroom", ""],
      r.suggestions.map((s, i) => [el("td", { "data-field": `suggestions.${i}.change`, text: s.change }),
        bytesCell(s.peak_bytes, `suggestions.${i}.peak_bytes`), bytesCell(s.headroom_bytes, `suggestions.${i}.headroom_bytes`),
        el("td", {}, el("a", { href: link(s), class: "apply-suggestion", text: "apply" }))])));
}

function bytesSummary(r) {
  const rows = [["allocator reserve", bytesCell(r.allocator_reserve_bytes, "allocator_reserve_bytes")],
                ["activation peak", bytesCell(r.activation_peak_bytes, "activation_peak_bytes")]];
  if (r.fit) rows.push(["device memory", bytesCell(r.fit.memory_bytes, "fit.memory_bytes")],
                       ["headroom", bytesCell(r.fit.headroom_bytes, "fit.headroom_bytes")]);
  return table("Reserve, activation peak and headroom", ["figure", "bytes"], rows);
}
