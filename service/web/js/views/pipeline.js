// Pipeline: POST /v1/pipeline for the setup's stages and micro-batches: the timeline (the API's
// own SVG), the bubble and each rank's in-flight micro-batches.
import { pct } from "../svg.js";
import { el } from "../form.js";
import { table, summary } from "./common.js";

export default {
  id: "pipeline",
  title: "Pipeline",
  prefixes: ["body.setup.", "body."],
  async render({ request, out, api, stale }) {
    const par = request.parallelism || {};
    const body = { setup: request, stages: (par.pipeline_parallel || 1) > 1 ? par.pipeline_parallel : 4,
                   microbatches: Math.max(1, (request.training && request.training.gradient_accumulation_steps) || 8) };
    if (!request.hardware || !request.hardware.gpu) { delete body.setup; }
    const [r, picture] = await Promise.all([api.pipeline(body), api.pipelineSvg(body)]);
    if (stale()) return;
    const img = el("img", { alt: `Timeline of ${r.schedule} on ${r.stages} ranks with ${r.microbatches} micro-batches`, class: "timeline" });
    img.src = URL.createObjectURL(new Blob([picture], { type: "image/svg+xml" }));
    out.replaceChildren(
      el("h2", { text: `${r.schedule}: ${r.stages} ranks × ${r.microbatches} micro-batches, bubble ${pct(r.bubble_fraction)}` }),
      el("p", { class: "lede", text: (par.pipeline_parallel || 1) < 2 ? "parallelism.pipeline_parallel is 1: shown over 4 stages; the micro-batches are training.gradient_accumulation_steps (8 when left at 1)." : "Stages are parallelism.pipeline_parallel, micro-batches training.gradient_accumulation_steps." }),
      summary([["bubble fraction", pct(r.bubble_fraction), "bubble_fraction"], ["makespan", `${r.makespan_s.toPrecision(4)} s`, "makespan_s"],
               ["bottleneck rank", String(r.bottleneck_rank), "bottleneck_rank"], ["virtual stages", String(r.virtual_stages), "virtual_stages"]]),
      img,
      table("Per rank", ["rank", "busy (s)", "idle (s)", "peak in-flight micro-batches", "in stage-equivalents"],
        r.ranks.map((k) => [String(k.rank), el("td", { class: "num", text: k.busy_s.toPrecision(4) }), el("td", { class: "num", text: k.idle_s.toPrecision(4) }),
          el("td", { class: "num", "data-field": `ranks.${k.rank}.peak_in_flight_microbatches`, text: String(k.peak_in_flight_microbatches) }),
          el("td", { class: "num", text: k.peak_in_flight_stage_equivalents.toFixed(2) })])),
    );
  },
};
