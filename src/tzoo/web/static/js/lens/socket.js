// The lens WebSocket (/ws): one connection per page, JSON messages with a `type`, and a
// reconnect with growing pauses when it drops. The server's protocol is described in
// routes/lens_service.py; this module only carries messages both ways.

/** Close codes after which reconnecting with the same URL cannot help (a refused key). */
const REFUSED = new Set([1008, 4001, 4003, 4401, 4403]);
/** Pauses (ms) before each reconnect attempt; the last repeats. */
const RETRY_MS = [500, 1000, 2000, 4000, 8000];

/**
 * The socket URL for `path` on this page's host: ws:// for http pages, wss:// for https,
 * with `?api_key=` when a key is given.
 * @param {string} path e.g. "/ws"
 * @param {{ protocol: string, host: string }} [where] defaults to `location`
 * @param {string | null} [apiKey]
 */
export function socketUrl(path, where = location, apiKey = null) {
  const scheme = where.protocol === "https:" ? "wss:" : "ws:";
  const url = new URL(path, `${scheme}//${where.host}`);
  if (apiKey) url.searchParams.set("api_key", apiKey);
  return url.toString();
}

/**
 * A connection that reconnects by itself.
 * @param {{ url: () => string,
 *           onMessage: (message: any) => void,
 *           onState: (state: "connecting" | "open" | "retrying" | "refused" | "closed",
 *                     detail?: { code?: number, reason?: string, delayMs?: number }) => void }} options
 */
export function createConnection({ url, onMessage, onState }) {
  /** @type {WebSocket | null} */
  let socket = null;
  let attempt = 0;
  let timer = null;
  let stopped = false;

  function open() {
    clearTimeout(timer);
    stopped = false;
    onState("connecting");
    const ws = new WebSocket(url());
    socket = ws;
    ws.addEventListener("open", () => {
      if (socket !== ws) return;
      attempt = 0;
      onState("open");
    });
    ws.addEventListener("message", (event) => {
      if (socket !== ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return; // not ours to read
      }
      if (message && typeof message === "object" && typeof message.type === "string") onMessage(message);
    });
    ws.addEventListener("close", (event) => {
      if (socket !== ws) return; // replaced by a reconnect
      socket = null;
      if (stopped) return onState("closed", { code: event.code, reason: event.reason });
      if (REFUSED.has(event.code)) return onState("refused", { code: event.code, reason: event.reason });
      const delayMs = RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)];
      attempt += 1;
      onState("retrying", { code: event.code, reason: event.reason, delayMs });
      timer = setTimeout(open, delayMs);
    });
  }

  return {
    /** Connect (again), dropping the current socket: e.g. after the API key changed. */
    connect() {
      const old = socket;
      socket = null;
      if (old) old.close(1000, "reconnecting");
      attempt = 0;
      open();
    },
    /**
     * Send a message; false when the socket is not open.
     * @param {Record<string, any>} message
     */
    send(message) {
      if (!socket || socket.readyState !== WebSocket.OPEN) return false;
      socket.send(JSON.stringify(message));
      return true;
    },
    /** Close for good (no reconnect). */
    close() {
      stopped = true;
      clearTimeout(timer);
      socket?.close(1000, "page closed");
    },
    get isOpen() {
      return Boolean(socket && socket.readyState === WebSocket.OPEN);
    },
  };
}
