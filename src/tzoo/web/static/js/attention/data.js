// Where the views get their numbers: the page's API (one layer per request, cached), or
// the data embedded in a standalone export (<script type="application/json"
// id="tzoo-embedded">). The views never know which.

import { base64ToBytes, decodeFloat16 } from "tzoo/attention/float16.js";

/**
 * One layer's attention: `value(h, i, j)` is how much query i attends to key j in head h.
 * @typedef {{ heads: number, tq: number, tk: number, data: Float32Array,
 *             value: (h: number, i: number, j: number) => number,
 *             row: (h: number, i: number) => Float32Array }} AttentionLayer
 * A position bias (T5) has the same shape and accessors: `value(h, i, j)` is added to the
 * score of query i and key j in head h, in every layer of the stack.
 * Query and key vectors of one layer: `query(h, i)` and `key(h, j)` are d-vectors.
 * @typedef {{ heads: number, t: number, d: number, data: Float32Array,
 *             query: (h: number, i: number) => Float32Array,
 *             key: (h: number, j: number) => Float32Array }} NeuronLayer
 */

/** An error whose message is fit to show to the reader. */
export class DataError extends Error {}

/** @returns {AttentionLayer} */
export function attentionLayer(shape, data) {
  const [heads, tq, tk] = shape;
  checkSize(shape, data);
  return {
    heads, tq, tk, data,
    value: (h, i, j) => data[(h * tq + i) * tk + j],
    row: (h, i) => data.subarray((h * tq + i) * tk, (h * tq + i + 1) * tk),
  };
}

/** @returns {NeuronLayer} */
export function neuronLayer(shape, data) {
  const [two, heads, t, d] = shape;
  if (two !== 2) throw new DataError(`Neuron data must have shape (2, heads, T, d), got (${shape})`);
  checkSize(shape, data);
  const at = (which, h, i) => data.subarray(((which * heads + h) * t + i) * d, ((which * heads + h) * t + i + 1) * d);
  return { heads, t, d, data, query: (h, i) => at(0, h, i), key: (h, j) => at(1, h, j) };
}

function checkSize(shape, data) {
  const expected = shape.reduce((a, b) => a * b, 1);
  if (data.length !== expected) {
    throw new DataError(`Expected ${expected} values for shape (${shape}), got ${data.length}.`);
  }
}

/** The embedded export payload, or null on a served page. */
export function readEmbedded(doc = document) {
  const node = doc.getElementById("tzoo-embedded");
  return node ? JSON.parse(node.textContent) : null;
}

/**
 * The visualization metadata: embedded, inlined by the page template (#tzoo-meta), or
 * fetched from `/api/visualizations/{slug}`.
 * @param {HTMLElement} [root] the explorer's root element (data-slug, data-api)
 */
export async function loadMeta(root = document.getElementById("tzoo-attention")) {
  const embedded = readEmbedded();
  if (embedded) return embedded.meta;
  const inline = document.getElementById("tzoo-meta");
  if (inline) return JSON.parse(inline.textContent);
  const response = await fetch(`${apiBase(root)}/visualizations/${encodeURIComponent(root.dataset.slug)}`);
  if (!response.ok) throw new DataError(await errorDetail(response));
  return response.json();
}

function apiBase(root) {
  return (root?.dataset.api || "/api").replace(/\/$/, "");
}

/** The `detail` of a JSON error response, or the status line. */
export async function errorDetail(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || String(d)).join("; ");
  } catch {
    /* not JSON */
  }
  return `The server answered ${response.status} ${response.statusText}`.trim();
}

/**
 * A source of attention and neuron layers, and of each stack's position bias, with a cache.
 * @param {object} meta
 * @param {{ root?: HTMLElement }} [options]
 */
export function createSource(meta, { root = document.getElementById("tzoo-attention") } = {}) {
  const embedded = readEmbedded();
  const cache = new Map();
  const slug = meta.slug || root?.dataset.slug;

  async function fetchBlock(kind, stack, layer) {
    const where = layer == null ? "" : `layer=${layer}&`;
    const url = `${apiBase(root)}/visualizations/${encodeURIComponent(slug)}/${kind}?${where}stack=${encodeURIComponent(stack)}`;
    const response = await fetch(url);
    if (!response.ok) throw new DataError(await errorDetail(response));
    const shape = (response.headers.get("X-Tzoo-Shape") || "").split(",").map(Number);
    const dtype = response.headers.get("X-Tzoo-Dtype") || "float16";
    if (dtype !== "float16") throw new DataError(`Unexpected data type ${dtype}`);
    return { shape, data: decodeFloat16(await response.arrayBuffer()) };
  }

  /** An embedded block: a layer's (`stack.layer`), or a stack's own when `layer` is null. */
  function embeddedBlock(kind, stack, layer) {
    const entry = embedded[kind]?.[layer == null ? stack : `${stack}.${layer}`];
    if (!entry) {
      const what = { neurons: "query/key vectors", position_bias: "position bias" }[kind] || "attention";
      throw new DataError(`This export does not include the ${what} of ${stack}${layer == null ? "" : ` layer ${layer}`}.`);
    }
    return { shape: entry.shape, data: decodeFloat16(base64ToBytes(entry.data)) };
  }

  function load(kind, stack, layer, build) {
    const key = `${kind}:${stack}:${layer}`;
    if (!cache.has(key)) {
      const promise = (async () => {
        const raw = embedded ? embeddedBlock(kind, stack, layer) : await fetchBlock(kind, stack, layer);
        return build(raw.shape, raw.data);
      })();
      promise.catch(() => cache.delete(key)); // a failed load may be retried
      cache.set(key, promise);
    }
    return cache.get(key);
  }

  return {
    meta,
    embedded: Boolean(embedded),
    /** @returns {Promise<AttentionLayer>} */
    attention: (stack, layer) => load("attention", stack, layer, attentionLayer),
    /** @returns {Promise<NeuronLayer>} */
    neurons: (stack, layer) => load("neurons", stack, layer, neuronLayer),
    /** The stack's position bias (T5; `meta.stacks[stack].has_position_bias`), loaded once
     *  for all its layers. @returns {Promise<AttentionLayer>} */
    positionBias: (stack) => load("position_bias", stack, null, attentionLayer),
  };
}
