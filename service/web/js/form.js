// Inputs built from the API's own schema: each field shows the API's description and limits,
// and the API's problem+json errors are shown next to the field they name.
import { fieldSchema, limitsText } from "./schema.js";

const NUMBER = /^-?\d+(\.\d+)?([eE][+-]?\d+)?$/;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v; else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

function setPath(obj, path, value) {
  const keys = path.split(".");
  let o = obj;
  for (const k of keys.slice(0, -1)) o = o[k] = o[k] || {};
  o[keys[keys.length - 1]] = value;
}

function getPath(obj, path) {
  return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
}

/** A set of fields of one request model. specs: [{path, label?, group?, list?}]. */
export class FieldSet {
  constructor(doc, component, specs, idPrefix) {
    this.fields = specs.map((spec) => {
      const schema = fieldSchema(doc, component, spec.path) || {};
      return { ...spec, schema, id: `${idPrefix}-${spec.path.replace(/\./g, "-")}` };
    });
    this.groups = {};
  }

  render(container) {
    for (const f of this.fields) {
      const s = f.schema;
      const label = f.label || f.path.split(".").pop().replace(/_/g, " ");
      const hintId = `${f.id}-hint`, errId = `${f.id}-error`;
      let input;
      if (s.enum || s.type === "boolean") {
        const choices = s.enum || [true, false];
        input = el("select", { id: f.id, name: f.path });
        if (s.default === undefined || s.default === null) input.append(el("option", { value: "", text: "(default)" }));
        for (const c of choices) input.append(el("option", { value: String(c), text: String(c) }));
        if (s.default !== undefined && s.default !== null) input.value = String(s.default);
      } else {
        input = el("input", { id: f.id, name: f.path, type: "text", autocomplete: "off",
                              inputmode: s.type === "integer" ? "numeric" : s.type === "number" ? "decimal" : undefined,
                              list: f.list, placeholder: s.default != null ? String(s.default) : "" });
        if (s.default !== undefined && s.default !== null) input.value = String(s.default);
      }
      input.setAttribute("aria-describedby", `${hintId} ${errId}`);
      if (s.type === "array") input.setAttribute("data-list", "true");
      const limits = limitsText(s);
      const hint = [s.description, limits && `(${limits})`].filter(Boolean).join(" ");
      const row = el("div", { class: "field", "data-path": f.path, "data-group": f.group },
        el("label", { for: f.id, text: label }), input,
        el("small", { id: hintId, class: "hint", text: hint }),
        el("span", { id: errId, class: "error", role: "alert", "data-error-for": f.path }));
      f.input = input; f.row = row; f.error = row.lastChild;
      if (f.path.endsWith("_bytes")) {  // a byte count read back in GiB as it is typed
        const out = el("output", { for: f.id, class: "readback", "aria-live": "polite" });
        const show = () => { const v = Number(input.value); out.textContent = input.value && Number.isFinite(v) ? `= ${(v / 2 ** 30).toFixed(2)} GiB` : ""; };
        input.addEventListener("input", show); f.show = show;
        row.insertBefore(out, row.lastChild);
      }
      container.append(row);
    }
  }

  /** Show only the fields of the active group ('preset', 'architecture', ...). */
  showGroup(name) {
    this.group = name;
    for (const f of this.fields) if (f.group) f.row.hidden = f.group !== name;
  }

  _value(f) {
    const s = f.schema, raw = f.input.value.trim();
    if (raw === "") return undefined;
    if (s.type === "array") {  // a list typed comma-separated: "none, full", "0, 3"
      const numeric = s.items && (s.items.type === "integer" || s.items.type === "number");
      const list = raw.split(/[,\s]+/).filter(Boolean).map((x) => (numeric && NUMBER.test(x) ? Number(x) : x));
      return s.default !== undefined && JSON.stringify(list) === JSON.stringify(s.default) ? undefined : list;
    }
    let v = raw;
    if (s.type === "boolean" || raw === "true" || raw === "false") v = raw === "true";
    else if ((s.type === "integer" || s.type === "number") && NUMBER.test(raw)) v = Number(raw);
    else if (s.enum && s.enum.some((e) => typeof e === "number") && NUMBER.test(raw)) v = Number(raw);
    if (s.default !== undefined && v === s.default) return undefined;  // the API's own default
    return v;
  }

  /** The request fragment these fields hold (fields left at the API's default are omitted). */
  read(into = {}) {
    for (const f of this.fields) {
      if (f.row.hidden) continue;
      const v = this._value(f);
      if (v !== undefined) setPath(into, f.path, v);
    }
    return into;
  }

  write(obj) {
    for (const f of this.fields) {
      const v = getPath(obj, f.path);
      const d = f.schema.default;
      const text = (x) => (Array.isArray(x) ? x.join(", ") : String(x));
      f.input.value = v !== undefined && v !== null ? text(v) : d !== undefined && d !== null ? text(d) : "";
      if (f.show) f.show();
    }
  }

  clearErrors() {
    for (const f of this.fields) { f.error.textContent = ""; f.input.removeAttribute("aria-invalid"); }
  }

  /** The visible field an error's name (without its 'body.' prefix) is about, if any. */
  place(name) {
    const visible = this.fields.filter((f) => !f.row.hidden);
    const exact = visible.find((f) => f.path === name);
    if (exact) return exact;
    const above = visible.filter((f) => name.startsWith(`${f.path}.`))
      .sort((a, b) => b.path.length - a.path.length)[0];
    return above || visible.find((f) => f.path.startsWith(`${name}.`)) || null;
  }

  showError(field, reason) {
    field.error.textContent = field.error.textContent ? `${field.error.textContent}; ${reason}` : reason;
    field.input.setAttribute("aria-invalid", "true");
  }
}

/** Shows an ApiError's invalid-params next to their fields; returns the ones no field took. */
export function showProblem(error, fieldsets, prefixes = ["body."]) {
  const left = [];
  for (const p of error.invalid) {
    let name = p.name;
    for (const prefix of prefixes) if (name.startsWith(prefix)) { name = name.slice(prefix.length); break; }
    let placed = false;
    for (const fs of fieldsets) {
      const f = fs.place(name);
      if (f) { fs.showError(f, p.reason); placed = true; break; }
    }
    if (!placed) left.push(p);
  }
  return left;
}

export { el };
