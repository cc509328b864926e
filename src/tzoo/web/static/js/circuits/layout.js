// Where each node sits: layers as rows (token embeddings at the bottom, logits at the
// top), token positions as columns. Nodes sharing a cell sit side by side, the most
// influential first; a column is as wide as its fullest cell.

export const ROW_HEIGHT = 58;
export const NODE_GAP = 18;
export const MIN_COLUMN = 46;
export const COLUMN_PAD = 12;
export const LEFT = 74;
export const TOP = 70;
export const BOTTOM = 58;

/** The row of a node: 0 embeddings, 1..L layers 0..L-1, L+1 logits. */
export function rowOf(node, nLayers) {
  if (node.kind === "token") return 0;
  if (node.kind === "logit") return nLayers + 1;
  return node.layer + 1;
}

function cellOrder(a, b) {
  const rank = (n) => (n.kind === "error" ? 1 : 0);
  if (rank(a) !== rank(b)) return rank(a) - rank(b);
  if (a.kind === "logit") return b.probability - a.probability;
  const ia = a.influence ?? 1;
  const ib = b.influence ?? 1;
  return ia - ib || (a.feature ?? 0) - (b.feature ?? 0);
}

/**
 * @param {any} graph prepared graph
 * @param {boolean[]} keep visible nodes
 * @returns {{ x: Float64Array, y: Float64Array, width: number, height: number,
 *   columns: {x: number, width: number}[], rowY: (row: number) => number, nRows: number }}
 */
export function layout(graph, keep) {
  const nLayers = graph.info.n_layers;
  const nTokens = graph.info.n_tokens;
  const nRows = nLayers + 2;
  const cells = new Map();
  graph.nodes.forEach((node, i) => {
    if (!keep[i]) return;
    const key = `${rowOf(node, nLayers)}:${node.position}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(node);
  });
  const widest = new Array(nTokens).fill(1);
  for (const [key, members] of cells) {
    const position = Number(key.split(":")[1]);
    widest[position] = Math.max(widest[position], members.length);
  }
  const columns = [];
  let x = LEFT;
  for (let p = 0; p < nTokens; p++) {
    const width = Math.max(MIN_COLUMN, widest[p] * NODE_GAP + COLUMN_PAD);
    columns.push({ x, width });
    x += width;
  }
  const rowY = (row) => TOP + (nRows - 1 - row) * ROW_HEIGHT + ROW_HEIGHT / 2;
  const xs = new Float64Array(graph.nodes.length);
  const ys = new Float64Array(graph.nodes.length);
  for (const [key, members] of cells) {
    const [row, position] = key.split(":").map(Number);
    members.sort(cellOrder);
    const column = columns[position];
    const start = column.x + (column.width - members.length * NODE_GAP) / 2 + NODE_GAP / 2;
    members.forEach((node, k) => {
      xs[node.i] = start + k * NODE_GAP;
      ys[node.i] = rowY(row);
    });
  }
  return { x: xs, y: ys, width: x + 16, height: TOP + nRows * ROW_HEIGHT + BOTTOM, columns, rowY, nRows };
}
