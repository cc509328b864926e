// The arithmetic the neuron view shows: how one query and every key combine into the
// attention row. Pure functions, no DOM.

/**
 * Scores and softmax of one query against every key, as the model computes them:
 * softmax over keys of `scale * q·k + bias`, with keys after the query masked in a causal
 * stack. `bias` is T5's learned relative-position bias for this head and query (null: none).
 * @param {Float32Array} q            (d,)
 * @param {(j: number) => Float32Array} key  the key vector of position j, (d,)
 * @param {number} count              number of keys
 * @param {number} scale              the model's score scale (usually 1/sqrt(d), 1 for T5)
 * @param {number | null} causalQuery the query position when keys after it are masked
 * @param {((j: number) => number) | null} [bias] the bias added to the score of key j
 * @returns {{ products: Float32Array[], dots: Float64Array, biases: Float64Array | null,
 *             scores: Float64Array, softmax: Float64Array, masked: boolean[] }}
 */
export function attentionRow(q, key, count, scale, causalQuery, bias = null) {
  const products = [];
  const dots = new Float64Array(count);
  const biases = bias ? Float64Array.from({ length: count }, (_, j) => bias(j)) : null;
  const scores = new Float64Array(count);
  const masked = [];
  for (let j = 0; j < count; j++) {
    const k = key(j);
    const product = new Float32Array(q.length);
    let dot = 0;
    for (let d = 0; d < q.length; d++) {
      product[d] = q[d] * k[d];
      dot += q[d] * k[d];
    }
    products.push(product);
    dots[j] = dot;
    scores[j] = scale * dot + (biases ? biases[j] : 0);
    masked.push(causalQuery != null && j > causalQuery);
  }
  return { products, dots, biases, scores, softmax: softmax(scores, masked), masked };
}

/**
 * Numerically stable softmax; masked entries get probability 0.
 * @param {ArrayLike<number>} scores
 * @param {boolean[]} masked
 */
export function softmax(scores, masked = []) {
  let max = -Infinity;
  for (let j = 0; j < scores.length; j++) if (!masked[j] && scores[j] > max) max = scores[j];
  const out = new Float64Array(scores.length);
  let total = 0;
  for (let j = 0; j < scores.length; j++) {
    out[j] = masked[j] ? 0 : Math.exp(scores[j] - max);
    total += out[j];
  }
  for (let j = 0; j < out.length; j++) out[j] = total > 0 ? out[j] / total : 0;
  return out;
}

/** The largest absolute difference between two rows. */
export function maxAbsDiff(a, b) {
  let worst = 0;
  for (let j = 0; j < a.length; j++) worst = Math.max(worst, Math.abs(a[j] - b[j]));
  return worst;
}
