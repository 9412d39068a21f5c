// ZeRO: POST /v1/zero, stages 0-3 and CPU offload side by side, with communication per step.
import { CATEGORIES, COLORS, gib, stackedBars, legend } from "../svg.js";
import { el } from "../form.js";
import { bytesCell, table, notes } from "./common.js";

const name = (s) => `ZeRO-${s.stage}${s.offload_optimizer ? " + offload" : ""}`;

export default {
  id: "zero",
  title: "ZeRO",
  async render({ request, out, api, stale }) {
    const r = await api.zero(request);
    if (stale()) return;
    const capacity = r.stages.map((s) => s.fit && s.fit.memory_bytes).find(Boolean);
    const rows = r.stages.map((s) => ({ label: name(s),
      segments: CATEGORIES.map((key) => ({ key, bytes: s.breakdown[key], color: COLORS[key] })) }));
    const dp = (request.parallelism && request.parallelism.data_parallel) || 1;
    out.replaceChildren(
      el("h2", { text: `ZeRO stages over ${dp} data-parallel rank${dp > 1 ? "s" : ""}` }),
      dp === 1 ? el("p", { class: "lede", text: "With one data-parallel rank every stage holds everything: set parallelism.data_parallel to compare." }) : el("span"),
      stackedBars(rows, capacity ? [{ key: "capacity", bytes: capacity, label: `capacity ${gib(capacity)}` }] : [],
                  { title: "Bytes per rank at the peak, per ZeRO stage" }),
      legend(CATEGORIES.map((key) => ({ key }))),
      table("Per rank, per stage", ["stage", "implementation", ...CATEGORIES.map((c) => c.replace(/_/g, " ")), "total", "communication / step", "fits"],
        r.stages.map((s, i) => [name(s), el("td", { class: "impl", text: s.implementation }),
          ...[...CATEGORIES, "total"].map((c) => bytesCell(s.breakdown[c], `stages.${i}.breakdown.${c}`)),
          bytesCell(s.communication_bytes_per_step, `stages.${i}.communication_bytes_per_step`),
          el("td", { class: "num", text: s.fit ? (s.fit.fits ? `yes, ${gib(s.fit.headroom_bytes)} free` : "no") : "–" })])),
      notes("Notes", r.notes),
    );
  },
};
