// The page is a client of the public API: every number it draws comes from these calls.
const TOKEN_KEY = "memplan.token";

export function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
}

/** An answer that is not 2xx: the problem+json document when the API sent one. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem && problem.detail ? problem.detail : `HTTP ${status}`);
    this.status = status;
    this.problem = problem || null;
  }
  /** [{name, reason}] as the API names them (e.g. body.training.micro_batch_size). */
  get invalid() { return (this.problem && this.problem["invalid-params"]) || []; }
}

async function call(method, path, body, accept = "application/json") {
  const headers = { accept };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token()) headers.authorization = `Bearer ${token()}`;
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const type = response.headers.get("content-type") || "";
  if (!response.ok) {
    let problem = null;
    if (type.includes("json")) { try { problem = await response.json(); } catch { /* empty */ } }
    throw new ApiError(response.status, problem);
  }
  if (type.includes("json")) return response.json();
  return response.text();
}

export const api = {
  openapi: () => call("GET", "/openapi.json"),
  models: () => call("GET", "/v1/models"),
  gpus: () => call("GET", "/v1/gpus"),
  memory: (body) => call("POST", "/v1/memory", body),
  zero: (body) => call("POST", "/v1/zero", body),
  checkpointing: (body) => call("POST", "/v1/checkpointing", body),
  pipeline: (body) => call("POST", "/v1/pipeline", body),
  pipelineSvg: (body) => call("POST", "/v1/pipeline", body, "image/svg+xml"),
  plan: (body) => call("POST", "/v1/plan", body),
  submitValidation: (body) => call("POST", "/v1/validations", body),
  validation: (id) => call("GET", `/v1/validations/${encodeURIComponent(id)}`),
  cancelValidation: (id) => call("DELETE", `/v1/validations/${encodeURIComponent(id)}`),
};
