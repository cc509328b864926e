// The token-wheel REST API (/api/sessions/..., /api/wheel-replays/...). Every write sends
// the page's CSRF token (<meta name="csrf-token">) as X-CSRF-Token. Failures become an
// ApiError carrying the HTTP status and the server's `detail` sentence. A session's key
// needs no code here: it is an HttpOnly cookie scoped to /api/sessions/<id>, sent by fetch
// (same-origin credentials); scripts elsewhere send it as X-Wheel-Session-Key.

/** A failed API call: `status` (0 when the server could not be reached) and `detail`. */
export class ApiError extends Error {
  /** @param {number} status @param {string} detail */
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

/** The `detail` of an error response (a sentence, or FastAPI's validation list). */
export async function errorDetail(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail
        .map((d) => {
          const field = Array.isArray(d.loc) ? d.loc[d.loc.length - 1] : null;
          return field && typeof field === "string" ? `${field}: ${d.msg}` : d.msg || String(d);
        })
        .join("; ");
    }
  } catch {
    /* not JSON */
  }
  return `The server answered ${response.status} ${response.statusText || ""}`.trim();
}

/** The page's CSRF token, or null. */
export function pageCsrfToken(doc = document) {
  return doc.querySelector('meta[name="csrf-token"]')?.getAttribute("content") || null;
}

/**
 * Sampling controls as query/body fields, leaving out what is off (top-k/top-p blank,
 * temperature 1).
 * @param {{threshold: number, temperature?: number|null, top_k?: number|null, top_p?: number|null}} c
 * @returns {Record<string, number>}
 */
export function samplingFields(c) {
  const out = { threshold: c.threshold };
  if (c.temperature != null && c.temperature !== 1) out.temperature = c.temperature;
  if (c.top_k != null) out.top_k = c.top_k;
  if (c.top_p != null) out.top_p = c.top_p;
  return out;
}

/**
 * A client of the wheel API.
 * @param {{ base?: string, csrf?: string | null }} [options]
 */
export function createApi({ base = "/api", csrf = pageCsrfToken() } = {}) {
  const root = base.replace(/\/$/, "");

  /** @returns {Promise<any>} the JSON body, or null for 204 */
  async function call(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (csrf && method !== "GET") headers["X-CSRF-Token"] = csrf;
    let response;
    try {
      response = await fetch(root + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin",
      });
    } catch {
      throw new ApiError(0, "Could not reach the server. Check that it is still running.");
    }
    if (!response.ok) throw new ApiError(response.status, await errorDetail(response));
    return response.status === 204 ? null : response.json();
  }

  const session = (id) => `/sessions/${encodeURIComponent(id)}`;

  return {
    /** @param {string} modelName */
    createSession: (modelName) => call("POST", "/sessions", { model_name: modelName }),
    getSession: (id) => call("GET", session(id)),
    setPrompt: (id, prompt) => call("POST", `${session(id)}/set-prompt`, { prompt }),
    /** @param {Record<string, number>} fields from `samplingFields` */
    nextTokenProbs: (id, fields) => {
      const query = new URLSearchParams(Object.entries(fields).map(([k, v]) => [k, String(v)]));
      return call("GET", `${session(id)}/next-token-probs?${query}`);
    },
    /** @param {object} body {token_id, ...fields} or {choice: "other", ...fields} */
    appendToken: (id, body) => call("POST", `${session(id)}/append-token`, body),
    undo: (id) => call("POST", `${session(id)}/undo`),
    deleteSession: (id) => call("DELETE", session(id)),
    /** @param {"public"|"unlisted"|"private"} visibility */
    save: (id, visibility) => call("POST", `${session(id)}/save`, { visibility }),
    replay: (slug) => call("GET", `/wheel-replays/${encodeURIComponent(slug)}`),
  };
}
