// The model given as a Hugging Face config.json: a file read in the browser (FileReader) or JSON
// pasted into the text area, sent as model.hf_config. Invalid JSON is reported here by the page;
// the API's 422s about the config (body.model.hf_config...) are shown next to it too.
import { fieldSchema } from "./schema.js";
import { el } from "./form.js";

const PATH = "model.hf_config";
const MAX_BYTES = 1 << 20;  // a config.json is a few KiB; anything this large is not one

/** The parsed config, or an Error saying why the text is not a JSON object. */
export function parseConfig(text) {
  if (!text.trim()) return new Error("paste the contents of a config.json or choose the file");
  let value;
  try { value = JSON.parse(text); } catch (error) { return new Error(`not valid JSON: ${error.message}`); }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    return new Error("a config.json is a JSON object ({...})");
  }
  return value;
}

/** One field, with the interface showProblem expects of a FieldSet (place, showError). */
export class ConfigField {
  constructor(doc) {
    this.schema = fieldSchema(doc, "MemoryRequest", PATH) || {};
    this.id = "f-model-hf_config";
  }

  render(container) {
    const hintId = `${this.id}-hint`, errId = `${this.id}-error`;
    this.file = el("input", { type: "file", id: `${this.id}-file`, accept: ".json,application/json",
                              "aria-describedby": `${hintId} ${errId}` });
    this.input = el("textarea", { id: this.id, name: PATH, rows: "12", spellcheck: "false",
                                  autocomplete: "off", "aria-describedby": `${hintId} ${errId}`,
                                  placeholder: '{"model_type": "llama", "hidden_size": 4096, ...}' });
    this.error = el("span", { id: errId, class: "error", role: "alert", "data-error-for": PATH });
    this.loaded = el("output", { for: this.file.id, class: "readback", "aria-live": "polite" });
    this.row = el("div", { class: "config-field", "data-path": PATH, "data-group": "hf_config" },
      el("label", { for: this.file.id, text: "config.json file" }), this.file, this.loaded,
      el("label", { for: this.id, text: "config.json contents" }), this.input,
      el("small", { id: hintId, class: "hint", text: this.schema.description || "" }), this.error);
    this.file.addEventListener("change", () => this.load(this.file.files[0]));
    this.input.addEventListener("input", () => this.check());  // invalid JSON said as it is typed
    container.append(this.row);
  }

  /** Reads a chosen file into the text area (pretty-printed when it is JSON). */
  load(file) {
    if (!file) return;
    this.clearErrors();
    if (file.size > MAX_BYTES) {
      this.showError(this, `${file.name} is ${file.size} bytes; a config.json is at most ${MAX_BYTES} bytes here`);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      const text = String(reader.result);
      const value = parseConfig(text);
      this.input.value = value instanceof Error ? text : JSON.stringify(value, null, 2);
      this.loaded.textContent = `${file.name} read (${file.size} bytes)`;
      this.check();
    };
    reader.onerror = () => this.showError(this, `${file.name} could not be read: ${reader.error}`);
    reader.readAsText(file);
  }

  /** Shows the page's own message when the text is not a JSON object; true when it is. */
  check() {
    this.clearErrors();
    const value = parseConfig(this.input.value);
    if (value instanceof Error) { this.showError(this, value.message); return false; }
    return true;
  }

  show(on) { this.row.hidden = !on; }

  /** Adds model.hf_config to a request; an Error (shown next to the field) when it is not JSON. */
  read(into) {
    if (this.row.hidden) return into;
    const value = parseConfig(this.input.value);
    if (value instanceof Error) { this.clearErrors(); this.showError(this, value.message); return value; }
    into.model = { ...(into.model || {}), hf_config: value };
    return into;
  }

  write(request) {
    const cfg = request.model && request.model.hf_config;
    this.input.value = cfg ? JSON.stringify(cfg, null, 2) : "";
    this.loaded.textContent = "";
  }

  clearErrors() { this.error.textContent = ""; this.input.removeAttribute("aria-invalid"); }

  /** This field for the API's names of the config (model.hf_config, model.hf_config.<key>). */
  place(name) {
    if (this.row.hidden) return null;
    return name === PATH || name.startsWith(`${PATH}.`) || name === "model" ? this : null;
  }

  showError(field, reason) {
    this.error.textContent = this.error.textContent ? `${this.error.textContent}; ${reason}` : reason;
    this.input.setAttribute("aria-invalid", "true");
  }
}
