// The views, in tab order. A view is {id, title, prefixes?, render(ctx)}: it calls the public API
// through ctx.api and draws into ctx.out; adding one is adding it here.
import breakdown from "./breakdown.js";
import curve from "./curve.js";
import zero from "./zero.js";
import checkpointing from "./checkpointing.js";
import pipeline from "./pipeline.js";
import plan from "./plan.js";
import validation from "./validation.js";

export const VIEWS = [breakdown, curve, zero, checkpointing, pipeline, plan, validation];
