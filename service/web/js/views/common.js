// Pieces the views share: exact-number cells, tables, lists.
import { exact, gib } from "../svg.js";
import { el } from "../form.js";

/** A cell with the exact figure (and GiB beside it); data-field names the API's field. */
export function bytesCell(bytes, field) {
  if (bytes === null || bytes === undefined) return el("td", { "data-field": field, text: "–" });
  return el("td", { "data-field": field, "data-value": String(bytes), class: "num" },
    el("span", { class: "exact", text: exact(bytes) }), el("span", { class: "gib", text: ` ${gib(bytes)}` }));
}

export function table(caption, head, rows) {
  const t = el("table", {}, el("caption", { text: caption }));
  const tr = el("tr");
  for (const h of head) tr.append(el("th", { scope: "col", text: h }));
  t.append(el("thead", {}, tr));
  const body = el("tbody");
  for (const row of rows) {
    const r = el("tr");
    row.forEach((c, i) => r.append(c instanceof Node ? c : el(i === 0 ? "th" : "td", i === 0 ? { scope: "row", text: String(c) } : { text: String(c) })));
    body.append(r);
  }
  t.append(body);
  return t;
}

export function notes(title, items) {
  if (!items || !items.length) return el("div");
  const ul = el("ul", { class: "notes" });
  for (const n of items) ul.append(el("li", { text: typeof n === "string" ? n : `${n.name || n.key || ""}${n.name || n.key ? ": " : ""}${n.value || n.description || n.detail || JSON.stringify(n)}` }));
  return el("details", {}, el("summary", { text: title }), ul);
}

export function summary(pairs) {
  const dl = el("dl", { class: "summary" });
  for (const [k, v, field] of pairs) dl.append(el("dt", { text: k }), el("dd", { text: v, "data-field": field }));
  return dl;
}
