// JSON over fetch with the page's CSRF token; errors carry the server's sentence.

const csrfToken = () => document.querySelector('meta[name="csrf-token"]')?.getAttribute("content") || null;

/** The server's explanation of a failed response, or a generic sentence. */
export async function errorDetail(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail) && body.detail.length) {
      const first = body.detail[0];
      const where = (first.loc || []).filter((part) => part !== "body").join(".");
      return where ? `${where}: ${first.msg}` : String(first.msg);
    }
  } catch {
    // not JSON: fall through
  }
  return `The server answered ${response.status} ${response.statusText}.`;
}

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

/** GET ``url`` as JSON. */
export async function getJSON(url, { signal } = {}) {
  const response = await fetch(url, { headers: { Accept: "application/json" }, signal, credentials: "same-origin" });
  if (!response.ok) throw new ApiError(await errorDetail(response), response.status);
  return response.json();
}

/** POST ``body`` as JSON to ``url``; the answer as JSON. */
export async function postJSON(url, body, { signal } = {}) {
  const headers = { "Content-Type": "application/json", Accept: "application/json" };
  const token = csrfToken();
  if (token) headers["X-CSRF-Token"] = token;
  const response = await fetch(url, {
    method: "POST",
    headers,
    body: JSON.stringify(body),
    signal,
    credentials: "same-origin",
  });
  if (!response.ok) throw new ApiError(await errorDetail(response), response.status);
  return response.json();
}
