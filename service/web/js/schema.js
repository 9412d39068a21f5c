// Field descriptions, limits and choices, read from the app's own /openapi.json.

function deref(doc, node) {
  let n = node;
  for (let i = 0; n && n.$ref && i < 20; i++) {
    n = n.$ref.replace(/^#\//, "").split("/").reduce((o, k) => o[k], doc);
  }
  return n;
}

/** The non-null alternative of an Optional (anyOf [X, null]). */
function nonNull(doc, node) {
  const n = deref(doc, node);
  if (n && n.anyOf) {
    const alts = n.anyOf.filter((a) => a.type !== "null");
    if (alts.length === 1) return { ...n, ...deref(doc, alts[0]), anyOf: undefined };
  }
  return n;
}

/** The schema of a dotted path below a component ('training.micro_batch_size' of MemoryRequest),
 *  with the property's own description and default kept. */
export function fieldSchema(doc, component, path) {
  let node = deref(doc, { $ref: `#/components/schemas/${component}` });
  let prop = node;
  for (const key of path.split(".")) {
    node = nonNull(doc, node);
    const raw = node && node.properties ? node.properties[key] : undefined;
    if (!raw) return null;
    prop = { ...nonNull(doc, raw), description: raw.description || nonNull(doc, raw).description,
             default: raw.default !== undefined ? raw.default : nonNull(doc, raw).default };
    node = raw;
  }
  return prop;
}

/** A bound as written: a power of two from 2^32 up as 2^k (beyond a double's exact digits). */
export function bound(v) {
  const k = Math.log2(v);
  return v >= 2 ** 32 && Number.isInteger(k) ? `2^${k}` : String(v);
}

/** "≥ 1, ≤ 65536", "≥ 0, < 1" as the schema's bounds say. */
export function limitsText(s) {
  if (!s) return "";
  if (s.type === "array") {  // a list: its choices and how many
    const choices = s.items && s.items.enum ? `one or more of ${s.items.enum.join(", ")}, comma-separated` : "comma-separated";
    const n = s.minItems !== undefined && s.maxItems !== undefined ? `; ${s.minItems} to ${s.maxItems} items` : "";
    return `${choices}${n}; empty: the API's default`;
  }
  const lo = s.minimum !== undefined ? `≥ ${bound(s.minimum)}` : s.exclusiveMinimum !== undefined ? `> ${bound(s.exclusiveMinimum)}` : "";
  const hi = s.maximum !== undefined ? `≤ ${bound(s.maximum)}` : s.exclusiveMaximum !== undefined ? `< ${bound(s.exclusiveMaximum)}` : "";
  return [lo, hi].filter(Boolean).join(", ");
}
