// The page: one form (built from /openapi.json), views fed by the public API, state in the URL.
import { api, ApiError, token, setToken } from "./api.js";
import { FieldSet, showProblem, el } from "./form.js";
import { ConfigField } from "./hfconfig.js";
import { VIEWS } from "./views/index.js";

const MODEL_GROUPS = { preset: "a preset", architecture: "architecture fields", parameters: "a parameter count",
                       hf_config: "a Hugging Face config.json" };
const SECTIONS = [
  ["Model", [
    { path: "model.preset", group: "preset", list: "presets" },
    ...["family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size",
        "vocab_size", "max_sequence_length", "tie_embeddings"].map((k) => ({ path: `model.${k}`, group: "architecture" })),
    { path: "model.num_parameters", group: "parameters" },
  ]],
  ["Training", ["precision", "optimizer", "micro_batch_size", "sequence_length",
                "gradient_accumulation_steps", "activation_checkpointing.strategy",
                "activation_checkpointing.every_k", "activation_checkpointing.budget_bytes",
                "optimizer_implementation", "attention", "implementation", "dropout",
                "loss.kind", "loss.chunks", "transformers.use_cache", "transformers.use_reentrant"]
    .map((k) => ({ path: `training.${k}`, label: k.replace("activation_checkpointing.", "checkpointing ").replace(".", " ").replace(/_/g, " ") }))],
  ["Parallelism", ["data_parallel", "zero_stage", "offload_optimizer", "offload_parameters",
                   "tensor_parallel", "sequence_parallel", "pipeline_parallel", "pipeline_schedule",
                   "virtual_pipeline_stages", "expert_parallel", "fsdp_mixed_precision"]
    .map((k) => ({ path: `parallelism.${k}` }))],
  ["GPU", [{ path: "hardware.gpu", label: "gpu", list: "gpus" }, { path: "hardware.memory_bytes" },
           { path: "hardware.allocator", label: "allocator reserve" }]],
];
const DEFAULT_REQUEST = { model: { preset: "gpt2-xl" }, training: { micro_batch_size: 4 }, hardware: { gpu: "a100-80gb" } };

const $ = (sel) => document.querySelector(sel);
const state = { view: VIEWS[0].id, request: DEFAULT_REQUEST, job: null, plan: null };
let fieldset, config, doc, running = 0;

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (p.get("view") && VIEWS.some((v) => v.id === p.get("view"))) state.view = p.get("view");
  if (p.get("req")) { try { state.request = JSON.parse(p.get("req")); } catch { /* keep */ } }
  state.job = p.get("job");
  state.plan = null;
  if (p.get("plan")) { try { state.plan = JSON.parse(p.get("plan")); } catch { /* keep none */ } }
}

function writeHash() {
  const p = new URLSearchParams({ view: state.view, req: JSON.stringify(state.request) });
  if (state.job) p.set("job", state.job);
  if (state.plan) p.set("plan", JSON.stringify(state.plan));
  history.replaceState(null, "", `#${p.toString()}`);
}

function modelGroup(request) {
  const m = request.model || {};
  if (m.hf_config) return "hf_config";
  return m.preset ? "preset" : m.num_parameters && !m.family ? "parameters" : m.family || m.num_layers ? "architecture" : "preset";
}

function buildForm() {
  const form = $("#setup");
  const groupBox = el("fieldset", { class: "model-source" }, el("legend", { text: "Model given as" }));
  for (const [value, text] of Object.entries(MODEL_GROUPS)) {
    const id = `source-${value}`;
    const radio = el("input", { type: "radio", name: "model-source", id, value });
    radio.addEventListener("change", () => showGroup(value));
    groupBox.append(el("span", { class: "radio" }, radio, el("label", { for: id, text })));
  }
  fieldset = new FieldSet(doc, "MemoryRequest", SECTIONS.flatMap(([, f]) => f), "f");
  const holder = el("div");
  fieldset.render(holder);
  config = new ConfigField(doc);
  config.render(holder);
  for (const [title, fields] of SECTIONS) {
    const box = el("fieldset", {}, el("legend", { text: title }));
    if (title === "Model") box.append(groupBox, config.row);
    for (const f of fields) box.append(holder.querySelector(`[data-path="${f.path}"]`));
    form.insertBefore(box, $("#form-actions"));
  }
  form.addEventListener("submit", (e) => { e.preventDefault(); run(); });
}

function showGroup(group) {
  fieldset.showGroup(group);
  config.show(group === "hf_config");
}

function fillForm(request) {
  const group = modelGroup(request);
  document.getElementById(`source-${group}`).checked = true;
  fieldset.write(request);
  config.write(request);
  showGroup(group);
}

export function status(text, kind = "") {
  const s = $("#status");
  s.textContent = text;
  s.className = kind;
}

function clearErrors() {
  fieldset.clearErrors();
  config.clearErrors();
  $("#form-error").textContent = "";
}

/** Shows an API error: next to the fields it names, the rest above the form. */
export function reportError(error, prefixes = ["body."], extra = []) {
  if (!(error instanceof ApiError)) { status(String(error), "bad"); throw error; }
  const left = showProblem(error, [...extra, config, fieldset], prefixes);  // a view's own fields first
  const general = left.map((p) => `${p.name}: ${p.reason}`);
  if (!error.invalid.length) general.push(error.message);
  $("#form-error").textContent = general.join("\n");
  status(`${error.problem ? error.problem.title : "Error"}: ${error.message}`, "bad");
}

async function run() {
  clearErrors();
  const request = config.read(fieldset.read({}));
  if (request instanceof Error) {  // not JSON: the page says so next to the field, nothing is sent
    status(`config.json: ${request.message}`, "bad");
    document.body.dataset.ready = state.view;
    return;
  }
  state.request = request;
  if (!state.request.model) state.request.model = {};
  writeHash();
  const view = VIEWS.find((v) => v.id === state.view);
  const out = $(`#panel-${view.id}`);
  const mine = ++running;
  status(`Computing ${view.title.toLowerCase()}…`);
  document.body.setAttribute("aria-busy", "true");
  try {
    await view.render({ request: state.request, out, doc, api, state, writeHash, reportError, status,
                        rerun: run, stale: () => mine !== running });
    if (mine === running && !$("#status").classList.contains("bad")) status(`${view.title}: done.`, "good");
  } catch (error) {
    if (mine === running) { out.replaceChildren(); reportError(error, view.prefixes || ["body."]); }
  } finally {
    if (mine === running) { document.body.removeAttribute("aria-busy"); document.body.dataset.ready = view.id; }
  }
}

function selectTab(id, focus = false) {
  state.view = id;
  for (const v of VIEWS) {
    const tab = document.getElementById(`tab-${v.id}`), panel = document.getElementById(`panel-${v.id}`);
    const on = v.id === id;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    panel.hidden = !on;
    if (on && focus) tab.focus();
  }
}

function buildTabs() {
  const list = $("#tabs");
  VIEWS.forEach((v, i) => {
    const tab = el("button", { type: "button", role: "tab", id: `tab-${v.id}`, "aria-controls": `panel-${v.id}`, text: v.title });
    tab.addEventListener("click", () => { selectTab(v.id); run(); });
    tab.addEventListener("keydown", (e) => {
      const k = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!k) return;
      const next = VIEWS[(i + k + VIEWS.length) % VIEWS.length];
      selectTab(next.id, true); run();
    });
    list.append(tab);
    $("#panels").append(el("section", { role: "tabpanel", id: `panel-${v.id}`, "aria-labelledby": `tab-${v.id}`, tabindex: "0", class: "panel" }));
  });
}

async function main() {
  readHash();
  [doc] = await Promise.all([api.openapi()]);
  buildTabs();
  buildForm();
  const tokenInput = $("#token");
  tokenInput.value = token();
  tokenInput.addEventListener("change", () => setToken(tokenInput.value.trim()));
  fillForm(state.request);
  selectTab(state.view);
  try {
    const [models, gpus] = await Promise.all([api.models(), api.gpus()]);
    $("#presets").replaceChildren(...models.map((m) => el("option", { value: m.name })));
    $("#gpus").replaceChildren(...gpus.map((g) => el("option", { value: g.name })));
  } catch (error) { status(`catalog unavailable: ${error.message}`, "bad"); }
  window.addEventListener("hashchange", () => {
    const before = JSON.stringify(state);
    readHash();
    if (JSON.stringify(state) !== before) {
      fillForm(state.request);
      for (const v of VIEWS) if (v.load) v.load(state);  // a view's own fields, from the link
      selectTab(state.view); run();
    }
  });
  await run();
}

main().catch((error) => status(`The page could not start: ${error.message}`, "bad"));
