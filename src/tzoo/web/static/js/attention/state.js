// The explorer's state, kept in the URL hash so that a link reproduces the view:
//   #view=head&stack=decoder&layer=3&heads=0,2&token=5
// `token` is a query position or range ("5-8"), `key` a pinned key position.

export const VIEWS = ["head", "model", "neuron", "stats"];
export const FILTERS = ["all", "ab", "ba", "aa", "bb"];
export const STATS = ["entropy", "mean_distance", "sink", "previous_token", "induction"];

/**
 * @typedef {object} State
 * @property {string} view       one of VIEWS
 * @property {string} stack      a key of meta.stacks
 * @property {number} layer
 * @property {number[] | null} heads  selected heads in the head view (null: all)
 * @property {number} head       the neuron view's head
 * @property {number | null} token    pinned query position (or range start)
 * @property {number | null} tokenEnd range end (inclusive), null for one token
 * @property {number | null} key      pinned key position
 * @property {string} filter     sentence-pair filter, one of FILTERS
 * @property {string} stat       the statistics view's statistic, one of STATS
 * @property {string} display    the head view's display: "lines" or "matrix" (heat maps)
 */

const int = (text) => (text != null && /^\d+$/.test(text) ? Number(text) : null);

/**
 * Parse a location hash ("#view=head&layer=2") into a partial state.
 * @param {string} hash
 * @returns {Partial<State>}
 */
export function parseHash(hash) {
  const params = new URLSearchParams(String(hash || "").replace(/^#/, ""));
  /** @type {Partial<State>} */
  const state = {};
  if (params.has("view")) state.view = params.get("view");
  if (params.has("stack")) state.stack = params.get("stack");
  if (int(params.get("layer")) != null) state.layer = int(params.get("layer"));
  if (int(params.get("head")) != null) state.head = int(params.get("head"));
  if (params.has("heads")) {
    const raw = params.get("heads");
    state.heads = raw === "all" ? null : raw.split(",").map(int).filter((h) => h != null);
  }
  const token = /^(\d+)(?:-(\d+))?$/.exec(params.get("token") || "");
  if (token) {
    state.token = Number(token[1]);
    state.tokenEnd = token[2] != null ? Number(token[2]) : null;
  }
  if (int(params.get("key")) != null) state.key = int(params.get("key"));
  if (params.has("filter")) state.filter = params.get("filter");
  if (params.has("stat")) state.stat = params.get("stat");
  if (params.has("display")) state.display = params.get("display");
  return state;
}

/**
 * The hash for a state (without "#"), naming only what matters for its view.
 * @param {State} s
 */
export function formatHash(s) {
  const parts = [["view", s.view], ["stack", s.stack]];
  if (s.view === "head" || s.view === "neuron") parts.push(["layer", s.layer]);
  if (s.view === "head" && s.heads) parts.push(["heads", s.heads.join(",")]);
  if (s.view === "neuron") parts.push(["head", s.head]);
  if ((s.view === "head" || s.view === "neuron") && s.token != null) {
    parts.push(["token", s.tokenEnd != null && s.tokenEnd !== s.token ? `${s.token}-${s.tokenEnd}` : s.token]);
  }
  if (s.view === "head" && s.key != null && s.token == null) parts.push(["key", s.key]);
  if (s.view === "head" && s.filter && s.filter !== "all") parts.push(["filter", s.filter]);
  if (s.view === "head" && s.display === "matrix") parts.push(["display", "matrix"]);
  if (s.view === "stats") parts.push(["stat", s.stat]);
  // Commas stay readable (heads=0,2): they need no escaping in a fragment.
  return parts.map(([k, v]) => `${k}=${encodeURIComponent(String(v)).replace(/%2C/g, ",")}`).join("&");
}

/** The first statistic the metadata has values for (entropy when none do). */
function firstStat(meta, stack) {
  const stats = meta.head_stats?.[stack] || {};
  return STATS.find((name) => Array.isArray(stats[name])) || "entropy";
}

/**
 * A complete, valid state: `partial` checked against the metadata, defaults elsewhere.
 * @param {object} meta the visualization metadata
 * @param {Partial<State>} partial
 * @returns {State}
 */
export function normalize(meta, partial) {
  const stacks = Object.keys(meta.stacks || {});
  const stack = stacks.includes(partial.stack) ? partial.stack : stacks[0];
  const info = meta.stacks[stack];
  const clamp = (v, n, d = 0) => (Number.isInteger(v) && v >= 0 && v < n ? v : d);
  const tq = info.query_tokens.length;
  const tk = info.key_tokens.length;
  let heads = Array.isArray(partial.heads) ? [...new Set(partial.heads)].filter((h) => h < info.n_heads).sort((a, b) => a - b) : null;
  if (heads && heads.length === info.n_heads) heads = null;
  const token = clamp(partial.token, tq, null);
  let tokenEnd = token == null ? null : clamp(partial.tokenEnd, tq, null);
  if (tokenEnd != null && tokenEnd < token) tokenEnd = null;
  const view = VIEWS.includes(partial.view) ? partial.view : VIEWS.includes(meta.view_type) ? meta.view_type : "head";
  const stat = STATS.includes(partial.stat) && Array.isArray(meta.head_stats?.[stack]?.[partial.stat]) ? partial.stat : firstStat(meta, stack);
  return {
    view,
    stack,
    layer: clamp(partial.layer, info.n_layers),
    heads,
    head: clamp(partial.head, info.n_heads),
    token,
    tokenEnd,
    key: token == null ? clamp(partial.key, tk, null) : null,
    filter: FILTERS.includes(partial.filter) && meta.sentence_b_start != null ? partial.filter : "all",
    stat,
    display: partial.display === "matrix" ? "matrix" : "lines",
  };
}

/**
 * A minimal observable store; `fix` turns every merged state into a valid one.
 * @param {State} initial
 * @param {(s: State) => State} [fix]
 */
export function createStore(initial, fix = (s) => s) {
  let state = fix(initial);
  const listeners = new Set();
  return {
    /** @returns {State} */
    get: () => state,
    /** Merge `patch` and notify listeners with (state, previous). */
    set(patch) {
      const previous = state;
      state = fix({ ...state, ...patch });
      for (const listener of listeners) listener(state, previous);
    },
    /** @param {(s: State, prev: State) => void} listener */
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
  };
}

/** The heads selected in the head view, as an array. */
export function selectedHeads(state, nHeads) {
  return state.heads ?? Array.from({ length: nHeads }, (_, h) => h);
}

/** The pinned query positions [start, end] (inclusive) or null. */
export function tokenRange(state) {
  if (state.token == null) return null;
  return [state.token, state.tokenEnd ?? state.token];
}
