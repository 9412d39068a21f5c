// Validation: POST /v1/validations with this setup, GET /v1/validations/{id} until it ends
// (progress live), then the estimate against the measurement per category.
import { CATEGORIES, COLORS, pct, stackedBars, legend } from "../svg.js";
import { FieldSet, el } from "../form.js";
import { bytesCell, table, summary } from "./common.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
let fields = null, following = 0;

function jobPanel(job) {
  const p = job.progress || {};
  const box = el("div", { class: "job", "data-status": job.status, "data-job": job.id });
  box.append(
    el("h3", { text: `Job ${job.id}: ${job.status}` }),
    el("progress", { max: String(p.total_steps || 1), value: String(p.step || 0), "aria-label": "validation progress" }),
    el("p", { class: "progress-text", "aria-live": "polite", text: `${p.phase || job.status}: step ${p.step || 0} of ${p.total_steps || "?"}${job.waiting_reason ? ` — ${job.waiting_reason}` : ""}` }),
  );
  if (job.error) box.append(el("p", { class: "bad", text: job.error }));
  if (!FINAL.has(job.status)) {
    const cancel = el("button", { type: "button", class: "secondary", id: "cancel-validation", text: "Cancel this job" });
    cancel.addEventListener("click", () => cancelJob(job.id).catch((error) => { cancel.replaceWith(el("p", { class: "bad", text: error.message })); }));
    box.append(cancel);
  }
  const r = job.result;
  if (!r) return box;
  box.append(
    summary([["ran on", r.device, "result.device"], ["mode", r.mode, "result.mode"], ["peak phase", r.peak_phase || "–", "result.peak_phase"],
             ["peak op", r.peak_op || "–", "result.peak_op"], ["step time", r.step_time_s == null ? "–" : `${r.step_time_s.toPrecision(3)} s`, "result.step_time_s"]]),
    stackedBars([["estimate", r.estimate], ["measured", r.measured]].map(([label, b]) => ({
      label, segments: CATEGORIES.map((key) => ({ key, bytes: b[key], color: COLORS[key] })) })), [],
      { title: "Estimated and measured steady-state peak, by category" }),
    legend(CATEGORIES.map((key) => ({ key }))),
    table("Estimate against measurement (steady state)", ["category", "estimate", "measured", "relative error"],
      [...CATEGORIES, "total"].map((c) => [c.replace(/_/g, " "), bytesCell(r.estimate[c], `result.estimate.${c}`),
        bytesCell(r.measured[c], `result.measured.${c}`), el("td", { class: "num", "data-field": `result.relative_error.${c}`, text: pct(r.relative_error[c]) })])),
  );
  return box;
}

let cancelJob = async () => {};

async function follow(id, ctx, area) {
  cancelJob = (job) => ctx.api.cancelValidation(job);
  const mine = ++following;
  for (;;) {
    let job;
    try { job = await ctx.api.validation(id); } catch (error) { area.replaceChildren(el("p", { class: "bad", text: error.message })); return; }
    if (mine !== following) return;
    area.replaceChildren(jobPanel(job));
    if (FINAL.has(job.status)) { ctx.status(`Validation job ${job.status}.`, job.status === "succeeded" ? "good" : "bad"); return; }
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
}

export default {
  id: "validation",
  title: "Validation",
  async render(ctx) {
    const { out, doc, state } = ctx;
    if (!fields) fields = new FieldSet(doc, "ValidationRequest", ["mode", "device", "steps", "timeout_s"].map((path) => ({ path })), "v");
    const kept = fields.fields[0].input ? fields.read({}) : {};  // what was chosen before a re-run
    const form = el("form", { id: "validation-form", novalidate: true, "aria-label": "Validation job" });
    fields.render(form);
    fields.write(kept);
    const area = el("div", { id: "job-area", "aria-live": "polite" });
    form.append(el("button", { type: "submit", id: "submit-validation", text: "Run this setup for real and compare" }));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      fields.clearErrors();
      const body = fields.read({ ...ctx.request });
      try {
        const job = await ctx.api.submitValidation(body);
        state.job = job.id; ctx.writeHash();
        ctx.status(`Validation job ${job.id} queued.`);
        follow(job.id, ctx, area);
      } catch (error) { ctx.reportError(error, ["body."], [fields]); }
    });
    out.replaceChildren(el("h2", { text: "Estimate against a measured training step" }),
      el("p", { class: "lede", text: "Submits the setup on the left as a validation job (the reference step run by a worker) and follows it. Keep the model small for a real run on CPU." }),
      form, area);
    if (state.job) follow(state.job, ctx, area);
  },
};
