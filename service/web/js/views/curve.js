// Micro-batch and sequence curves: several POST /v1/memory calls, the peak (plus the allocator
// reserve, what the fit compares with the GPU) against each size, the largest fitting point marked.
import { gib, lineChart } from "../svg.js";
import { el } from "../form.js";
import { bytesCell, table } from "./common.js";

const clone = (o) => JSON.parse(JSON.stringify(o));
const need = (r) => r.breakdown.total + r.allocator_reserve_bytes;

async function sweep(api, request, key, values, stale) {
  const points = [];
  for (const v of values) {
    const body = clone(request);
    body.training = { ...(body.training || {}), [key]: v };
    let r;
    try { r = await api.memory(body); } catch (error) { points.push({ x: v, error }); break; }
    if (stale()) return points;
    points.push({ x: v, r });
  }
  return points;
}

function pow2(lo, hi, max = 12) {
  const out = [];
  for (let v = lo; v <= hi && out.length < max; v *= 2) out.push(v);
  return out;
}

function chart(points, capacity, xLabel, fitsLabel, marked) {
  const ok = points.filter((p) => p.r);
  if (!ok.length) return el("p", { text: "No point could be estimated." });
  const mark = marked && ok.find((p) => p.x === marked);
  return lineChart([{ label: "peak + reserve", color: "#1f5fa8", points: ok.map((p) => [p.x, need(p.r)]) }], {
    xLabel, title: `Peak plus allocator reserve against ${xLabel}`,
    hline: capacity ? { bytes: capacity, label: `capacity ${gib(capacity)}` } : null,
    mark: mark ? { x: mark.x, y: need(mark.r), label: `${fitsLabel} ${mark.x}` } : null,
  });
}

function pointsTable(caption, points, key) {
  return table(caption, [key, "peak (total)", "allocator reserve", "fits"], points.map((p) => p.r
    ? [String(p.x), bytesCell(p.r.breakdown.total, `${key}=${p.x}.breakdown.total`),
       bytesCell(p.r.allocator_reserve_bytes, `${key}=${p.x}.allocator_reserve_bytes`),
       el("td", { text: p.r.fit ? (p.r.fit.fits ? "yes" : "no") : "–" })]
    : [String(p.x), el("td", { colspan: "3", text: p.error.message })]));
}

export default {
  id: "curve",
  title: "Micro-batch / sequence",
  async render({ request, out, api, stale }) {
    const base = await api.memory(request);
    if (stale()) return;
    const fit = base.fit;
    const maxMbs = fit ? fit.max_micro_batch_size : null;
    const mbsNow = (request.training && request.training.micro_batch_size) || 1;
    const top = Math.min(1024, Math.max(16, 2 * (maxMbs || 0), 2 * mbsNow));
    const mbsValues = [...new Set([...pow2(1, top), ...(maxMbs ? [maxMbs, maxMbs + 1] : [])])].sort((a, b) => a - b);
    const mbs = await sweep(api, request, "micro_batch_size", mbsValues, stale);
    if (stale()) return;
    const maxSeq = (base.model && base.model.max_sequence_length) || 8192;
    const seqValues = pow2(128, Math.min(maxSeq, 131072), 11);
    const seq = await sweep(api, request, "sequence_length", seqValues, stale);
    if (stale()) return;
    const capacity = fit ? fit.memory_bytes : null;
    const fitSeq = capacity ? seq.filter((p) => p.r && p.r.fit && p.r.fit.fits).map((p) => p.x).pop() : null;
    out.replaceChildren(
      el("h2", { text: maxMbs ? `Largest micro-batch that fits: ${maxMbs}` : fit ? "Not even micro-batch 1 fits" : "No device given: no fit to mark" }),
      el("p", { class: "lede", text: "Each point is a POST /v1/memory of this setup at that size; the largest micro-batch that fits is the API's fit.max_micro_batch_size." }),
      chart(mbs, capacity, "micro-batch size", "largest fitting:", maxMbs),
      el("h3", { text: fitSeq ? `Sequence length: the longest sampled that fits is ${fitSeq}` : "Sequence length" }),
      chart(seq, capacity, "sequence length", "longest fitting:", fitSeq),
      el("div", { class: "two" }, pointsTable("Peak by micro-batch size", mbs, "micro_batch_size"),
         pointsTable(`Peak by sequence length (micro-batch ${mbsNow})`, seq, "sequence_length")),
    );
  },
};
