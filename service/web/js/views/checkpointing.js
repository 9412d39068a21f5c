// Checkpointing: POST /v1/checkpointing for the setup's own plan (which blocks), and for the
// named strategies beside it: memory saved against recompute time.
import { gib, pct, stackedBars, svg } from "../svg.js";
import { el } from "../form.js";
import { bytesCell, table, notes, summary } from "./common.js";

function blockStrip(r) {
  const n = r.num_blocks || 0, on = new Set(r.checkpointed_blocks);
  const size = Math.max(6, Math.min(22, Math.floor(740 / Math.max(1, n))));
  const root = svg("svg", { viewBox: `0 0 ${Math.max(760, n * size + 20)} ${size + 30}`, width: "100%", role: "img", class: "chart",
                            "aria-label": `${on.size} of ${n} blocks checkpointed: ${r.checkpointed_blocks.join(", ") || "none"}` });
  for (let i = 0; i < n; i++) {
    const rect = svg("rect", { x: 10 + i * size, y: 4, width: size - 2, height: size, "data-block": i,
                               "data-checkpointed": String(on.has(i)), fill: on.has(i) ? "#7b3fa0" : "#e3e6ea", stroke: "#555" });
    rect.append(svg("title", {}, `block ${i}: ${on.has(i) ? "checkpointed" : "kept"}`));
    root.append(rect);
  }
  root.append(svg("text", { x: 10, y: size + 24, class: "small" }, `blocks 0…${n - 1}; filled = checkpointed (recomputed in backward)`));
  return root;
}

const STRATEGIES = [["none", {}], ["every-k (k=2)", { strategy: "every-k", every_k: 2 }], ["sqrt", { strategy: "sqrt" }],
                    ["full", { strategy: "full" }]];

export default {
  id: "checkpointing",
  title: "Checkpointing",
  async render({ request, out, api, stale }) {
    const own = await api.checkpointing(request);
    if (stale()) return;
    const compare = [...STRATEGIES];
    const ac = (request.training && request.training.activation_checkpointing) || {};
    if (request.hardware || ac.budget_bytes) compare.push([ac.budget_bytes ? "budget (the form's)" : "budget (GPU memory)", { strategy: "budget" }]);
    const results = [];
    for (const [label, extra] of compare) {
      try { results.push([label, await api.checkpointing({ ...request, strategy: "none", ...extra })]); }
      catch (error) { results.push([label, null, error]); }
      if (stale()) return;
    }
    const none = results[0][1];
    const ok = results.filter(([, r]) => r && r.total_peak_bytes != null);
    out.replaceChildren(
      el("h2", { text: `${own.strategy}: ${own.checkpointed_blocks.length} of ${own.num_blocks} blocks checkpointed, peak ${gib(own.total_peak_bytes)}` }),
      summary([
        ["recompute time", own.recompute_time_s == null ? "–" : `${own.recompute_time_s.toPrecision(3)} s (${pct(own.recompute_time_fraction)} of the step)`, "recompute_time_fraction"],
        ["fits", own.fits == null ? "–" : own.fits ? "yes" : "no", "fits"],
        ["solver", own.solver || "–", "solver"],
        ["segments", own.segments.map((s) => `${s[0]}–${s[1]}`).join(", ") || "–", "segments"],
      ]),
      blockStrip(own),
      el("h3", { text: "Memory saved against recompute time" }),
      stackedBars(ok.map(([label, r]) => ({ label, note: `recompute +${pct(r.recompute_time_fraction)}`,
        segments: [{ key: "peak", bytes: r.total_peak_bytes, color: "#7b3fa0" }] })),
        own.allocator_reserve_bytes != null && request.hardware && own.budget_bytes ? [{ key: "budget", bytes: own.budget_bytes, label: `budget ${gib(own.budget_bytes)}` }] : [],
        { title: "Peak per strategy, recompute time beside it" }),
      table("Strategies compared (same setup)", ["strategy", "checkpointed blocks", "peak", "saved vs none", "recompute time fraction"],
        results.map(([label, r, error]) => r ? [label, el("td", { text: String(r.checkpointed_blocks.length) }),
          bytesCell(r.total_peak_bytes, `${label}.total_peak_bytes`),
          bytesCell(none && none.total_peak_bytes != null ? none.total_peak_bytes - r.total_peak_bytes : null, `${label}.saved`),
          el("td", { text: pct(r.recompute_time_fraction) })] : [label, el("td", { colspan: "4", text: error.message })])),
      notes("Notes", own.notes), notes("Assumptions", own.assumptions),
    );
  },
};
