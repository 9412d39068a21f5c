// Plan: POST /v1/plan for the model on the left and the cluster given here: the ranked layouts
// (fastest first) with their peak per device and step time, the memory/time Pareto front as a
// scatter, where the candidates fell out and how large the search was. Its own fields are built
// from the API's PlanRequest schema; the request is in the URL (plan=...).
import { fieldSchema } from "../schema.js";
import { exact, gib, pct, scatter, legend } from "../svg.js";
import { FieldSet, el } from "../form.js";
import { table, notes, summary } from "./common.js";

const SECTIONS = [
  ["Cluster", ["cluster.gpu", "cluster.num_gpus", "cluster.min_gpus", "cluster.max_gpus", "cluster.gpus_per_node",
               "cluster.intra_node_bytes_per_s", "cluster.inter_node_bytes_per_s", "cluster.model_flops_utilization",
               "cluster.price_per_gpu_hour"]],
  ["Batch and training", ["training.global_batch_sequences", "training.global_batch_tokens", "training.train_tokens",
                          "training.sequence_length", "training.precision", "training.optimizer",
                          "training.checkpoint_strategies", "training.max_micro_batch_size"]],
  ["Constraints", ["constraints.tensor_parallel_within_node", "constraints.max_tensor_parallel",
                   "constraints.max_pipeline_parallel", "constraints.zero_stages", "constraints.allow_offload",
                   "constraints.pipeline_schedules", "constraints.max_virtual_stages", "constraints.top_k",
                   "constraints.max_cost"]],
];
const COMM = ["tensor_parallel_s", "data_parallel_s", "pipeline_p2p_s", "expert_parallel_s", "offload_s"];

let fields = null, form = null, pending = null;

/** Exposed communication of a step: every collective and transfer left on the critical path. */
export const exposed = (t) => COMM.reduce((a, k) => a + t[k], 0);

function defaults(request, doc) {
  const tr = request.training || {};
  const seq = tr.sequence_length || fieldSchema(doc, "MemoryRequest", "training.sequence_length").default;
  const training = { global_batch_sequences: 64, sequence_length: seq };
  if (tr.precision) training.precision = tr.precision;
  if (tr.optimizer) training.optimizer = tr.optimizer;
  return { training, cluster: { gpu: (request.hardware && request.hardware.gpu) || "h100-80gb", num_gpus: 8 } };
}

function buildForm(ctx) {
  fields = new FieldSet(ctx.doc, "PlanRequest", SECTIONS.flatMap(([, paths]) => paths.map((path) => (
    { path, list: path === "cluster.gpu" ? "gpus" : undefined }))), "p");
  const holder = el("div");
  fields.render(holder);
  form = el("form", { id: "plan-form", novalidate: true, "aria-label": "Cluster to plan" });
  for (const [title, paths] of SECTIONS) {
    const box = el("fieldset", {}, el("legend", { text: title }));
    for (const p of paths) box.append(holder.querySelector(`[data-path="${p}"]`));
    form.append(box);
  }
  form.append(el("button", { type: "submit", id: "plan-search", text: "Search layouts" }));
  form.addEventListener("submit", (e) => { e.preventDefault(); ctx.rerun(); });
}

const num = (value, field, text) => el("td", { class: "num", "data-field": field, "data-value": String(value), text });
const secs = (s) => (s >= 100 ? s.toFixed(1) : s.toPrecision(4));
function duration(s) {
  if (s == null) return "–";
  return s >= 86400 ? `${(s / 86400).toFixed(1)} d` : s >= 3600 ? `${(s / 3600).toFixed(1)} h` : `${secs(s)} s`;
}
const shape = (x) => `${x.data_parallel}×${x.tensor_parallel}×${x.pipeline_parallel}`;
const offload = (x) => [x.offload_optimizer && "optimizer", x.offload_parameters && "parameters"].filter(Boolean).join(", ") || "–";
const key = (x) => JSON.stringify([x.data_parallel, x.tensor_parallel, x.pipeline_parallel, x.virtual_pipeline_stages, x.pipeline_schedule,
  x.zero_stage, x.offload_optimizer, x.offload_parameters, x.activation_checkpointing, x.micro_batch_size, x.gradient_accumulation_steps]);

/** The POST /v1/memory request of a layout (as the planner builds it): opened in Breakdown. */
function memoryRequest(body, x, eff) {
  return {
    model: body.model,
    training: { precision: eff("training.precision"), optimizer: eff("training.optimizer"), micro_batch_size: x.micro_batch_size,
                sequence_length: eff("training.sequence_length"), gradient_accumulation_steps: x.gradient_accumulation_steps,
                activation_checkpointing: { strategy: x.activation_checkpointing } },
    parallelism: { data_parallel: x.data_parallel, tensor_parallel: x.tensor_parallel, pipeline_parallel: x.pipeline_parallel,
                   virtual_pipeline_stages: x.virtual_pipeline_stages, pipeline_schedule: x.pipeline_schedule, zero_stage: x.zero_stage,
                   offload_optimizer: x.offload_optimizer, offload_parameters: x.offload_parameters },
    hardware: { gpu: body.cluster.gpu },
  };
}

function layoutTable(caption, layouts, prefix, link) {
  const head = ["#", "dp×tp×pp", "schedule, virtual stages", "ZeRO", "offload", "checkpointing", "micro-batch × accum.",
    "peak / device", "headroom", "compute (s)", "exposed comm. (s)", "bubble (s)", "step (s)", "tokens/s", "MFU", "time to train",
    "cost to train", ""];
  const t = table(caption, head, layouts.map((x, j) => {
    const f = `${prefix}.${j}`, t = x.time;
    const comm = num(exposed(t), `${f}.time.exposed_communication_s`, secs(exposed(t)));
    comm.title = COMM.map((k) => `${k.replace(/_s$/, "").replace(/_/g, " ")}: ${secs(t[k])} s`).join("\n");
    return [String(j + 1), el("td", { "data-field": `${f}.shape`, text: shape(x) }), `${x.pipeline_schedule}, v=${x.virtual_pipeline_stages}`,
      String(x.zero_stage), offload(x), x.activation_checkpointing,
      el("td", { "data-field": `${f}.batch`, text: `${x.micro_batch_size} × ${x.gradient_accumulation_steps}` }),
      el("td", { class: "num", "data-field": `${f}.peak_bytes`, "data-value": String(x.peak_bytes), title: exact(x.peak_bytes), text: gib(x.peak_bytes) }),
      el("td", { class: "num", text: x.fits ? gib(x.headroom_bytes) : `does not fit: ${gib(x.headroom_bytes)}` }),
      num(t.compute_s, `${f}.time.compute_s`, secs(t.compute_s)), comm, num(t.bubble_s, `${f}.time.bubble_s`, secs(t.bubble_s)),
      num(t.step_s, `${f}.time.step_s`, secs(t.step_s)),
      num(x.tokens_per_s, `${f}.tokens_per_s`, Math.round(x.tokens_per_s).toLocaleString("en-US")),
      num(x.model_flops_utilization, `${f}.model_flops_utilization`, pct(x.model_flops_utilization)),
      x.time_to_train_s == null ? el("td", { text: "–" }) : num(x.time_to_train_s, `${f}.time_to_train_s`, duration(x.time_to_train_s)),
      x.cost_to_train == null ? el("td", { text: "–" })
        : num(x.cost_to_train, `${f}.cost_to_train`, Math.round(x.cost_to_train).toLocaleString("en-US")),
      el("td", {}, el("a", { href: link(x), class: "open-layout", text: "open", "aria-label": `open layout ${j + 1} in Breakdown` }))];
  }));
  t.className = "layouts";
  return t;
}

function cluster(c, i, body, link) {
  const box = el("section", { class: "plan-cluster", "data-cluster": String(c.num_gpus) });
  const best = c.layouts[0];
  box.append(el("h3", { text: best
    ? `${c.num_gpus} × ${body.cluster.gpu}: fastest ${shape(best)} (dp × tp × pp), ${secs(best.time.step_s)} s per step, ${gib(best.peak_bytes)} per device`
    : `${c.num_gpus} × ${body.cluster.gpu}: no layout fits`, class: best ? "" : "bad" }));
  const front = new Set(c.pareto_front.map(key));
  const seen = new Map();
  for (const x of [...c.layouts, ...c.pareto_front]) seen.set(key(x), x);
  if (seen.size) {
    box.append(scatter([...seen.values()].map((x) => ({
      x: x.time.step_s, y: x.peak_bytes, front: front.has(key(x)),
      label: `${shape(x)} ZeRO-${x.zero_stage} ${x.activation_checkpointing} b${x.micro_batch_size}×${x.gradient_accumulation_steps}`,
    })), { xLabel: "step time (s)", title: `Peak per device against step time on ${c.num_gpus} GPUs: the Pareto front highlighted` }),
    legend([{ key: "front", label: "on the Pareto front (joined)", color: "#1f5fa8" }, { key: "other", label: "ranked, not on the front", color: "#fff" }]));
  }
  if (c.layouts.length) box.append(layoutTable(`Ranked layouts on ${c.num_gpus} GPUs, fastest first`, c.layouts, `clusters.${i}.layouts`, link));
  if (c.pareto_front.length) box.append(layoutTable("Pareto front: no other fitting layout has both a lower peak and a shorter step (lowest peak first)", c.pareto_front, `clusters.${i}.pareto_front`, link));
  const s = c.search, reasons = Object.entries(s.rejected).sort((a, b) => b[1] - a[1]);
  box.append(el("div", { class: "two" },
    summary([["layouts enumerated", s.space_size.toLocaleString("en-US"), `clusters.${i}.search.space_size`],
             ["pruned by a lower bound (model states; MoE: peak floor)", s.pruned_by_bound.toLocaleString("en-US"), `clusters.${i}.search.pruned_by_bound`],
             ["peaks computed", s.evaluated.toLocaleString("en-US"), `clusters.${i}.search.evaluated`],
             ["search time", `${s.seconds.toFixed(3)} s`, `clusters.${i}.search.seconds`]]),
    table("Rejected candidates, by reason", ["reason", "count"], reasons.map(([r, n]) => [r.replace(/_/g, " "),
      el("td", { class: "num", "data-field": `clusters.${i}.search.rejected.${r}`, "data-value": String(n), text: n.toLocaleString("en-US") })]))));
  return box;
}

export default {
  id: "plan",
  title: "Plan",
  load(state) { pending = state.plan; },
  async render(ctx) {
    const { request, out, api, state, stale } = ctx;
    if (!fields) { buildForm(ctx); pending = state.plan || defaults(request, ctx.doc); }
    if (pending) { fields.write(pending); pending = null; }
    fields.clearErrors();
    state.plan = fields.read({});
    ctx.writeHash();
    const body = { model: request.model, ...state.plan };
    const results = el("div", { id: "plan-results", "aria-live": "polite" });
    out.replaceChildren(el("h2", { text: "Layouts for a cluster: memory and time" }),
      el("p", { class: "lede", text: "POST /v1/plan for the model on the left on the cluster below: every split into data, tensor and pipeline parallelism, ZeRO stage, offload, checkpointing and micro-batch the limits allow, each with the peak POST /v1/memory gives it and a modelled step time." }),
      form, results);
    let r;
    try { r = await api.plan(body); } catch (error) {
      if (!stale()) ctx.reportError(error, ["body."], [fields]);
      return;
    }
    if (stale()) return;
    const eff = (path) => { const v = path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), body);
      return v !== undefined ? v : fieldSchema(ctx.doc, "PlanRequest", path).default; };
    const link = (x) => `#${new URLSearchParams({ view: "breakdown", req: JSON.stringify(memoryRequest(body, x, eff)), plan: JSON.stringify(state.plan) })}`;
    results.replaceChildren(...r.clusters.map((c, i) => cluster(c, i, body, link)),
      notes("Notes", r.notes), notes("Assumptions", r.assumptions));
  },
};
