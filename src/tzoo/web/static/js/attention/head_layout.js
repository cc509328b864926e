// Geometry and words of the head view: token rows, column widths, the lines as SVG path
// data grouped by (head, opacity), and the readout that says in words what the lines show.

import { clear, el, fmt } from "tzoo/attention/dom.js";
import { displayToken, filterPositions, shortToken } from "tzoo/attention/tokens.js";

export const ROW = 20; // px per token row
const TOP = 30; // px above the first row (column headings)
const GAP = 260; // px between the columns, where the lines run
const FONT = '13px system-ui, -apple-system, "Segoe UI", sans-serif';
const BUCKETS = 10; // opacity levels per head

/** Width in px of the widest label, measured with the font the SVG uses. */
export function labelWidth(labels, font = FONT) {
  const context = document.createElement("canvas").getContext("2d");
  context.font = font;
  return labels.reduce((w, text) => Math.max(w, context.measureText(text).width), 0);
}

/** Column headings: what the two columns hold. */
export function headings(stack) {
  return stack === "cross" ? ["Decoder (queries)", "Encoder (keys)"] : ["Queries", "Keys"];
}

/** Width of a heading (11 px bold, uppercase, spaced letters). */
function headingWidth(text) {
  return labelWidth([text.toUpperCase()], '700 11px system-ui, -apple-system, "Segoe UI", sans-serif') + text.length * 0.7 + 12;
}

/**
 * Lines of the selected heads as path data grouped by (head, opacity bucket).
 * @param {import("tzoo/attention/data.js").AttentionLayer} layer
 * @param {number[]} heads
 * @param {number[]} queries  query positions to draw from
 * @param {Set<number>} keys  key positions allowed
 * @param {(i: number) => number} yq
 * @param {(j: number) => number} yk
 * @param {number} x1
 * @param {number} x2
 * @param {number} threshold
 * @returns {{ head: number, opacity: number, d: string, count: number }[]}
 */
export function linePaths(layer, heads, queries, keys, yq, yk, x1, x2, threshold) {
  const groups = [];
  for (const h of heads) {
    const buckets = Array.from({ length: BUCKETS }, () => []);
    for (const i of queries) {
      const row = layer.row(h, i);
      for (let j = 0; j < row.length; j++) {
        const w = row[j];
        if (!(w >= threshold) || !keys.has(j)) continue;
        const b = Math.min(BUCKETS - 1, Math.floor(w * BUCKETS));
        buckets[b].push(`M${x1},${yq(i)}L${x2},${yk(j)}`);
      }
    }
    buckets.forEach((segments, b) => {
      if (segments.length) groups.push({ head: h, opacity: (b + 1) / BUCKETS, d: segments.join(""), count: segments.length });
    });
  }
  return groups;
}

/**
 * Where everything goes: visible positions, column widths, the x of both line ends,
 * and y of each token row.
 * @param {any} meta
 * @param {import("tzoo/attention/state.js").State} state
 * @param {import("tzoo/attention/data.js").AttentionLayer} layer
 * @param {boolean} withMarks  leave room for comment markers on the left
 */
export function headLayout(meta, state, layer, withMarks) {
  const info = meta.stacks[state.stack];
  const { queries, keys } = filterPositions(state.filter, layer.tq, layer.tk, meta.sentence_b_start);
  const qLabels = info.query_tokens.map((t) => shortToken(t, 24));
  const kLabels = info.key_tokens.map((t) => shortToken(t, 24));
  const marks = withMarks ? 18 : 0;
  const [qHeading, kHeading] = headings(state.stack);
  const left = Math.min(220, Math.max(64, headingWidth(qHeading), labelWidth(queries.map((i) => qLabels[i])) + 18));
  const right = Math.min(220, Math.max(64, headingWidth(kHeading), labelWidth(keys.map((j) => kLabels[j])) + 18));
  const x1 = marks + left + 4;
  const x2 = x1 + GAP;
  const qRow = new Map(queries.map((i, r) => [i, r]));
  const kRow = new Map(keys.map((j, r) => [j, r]));
  const rows = Math.max(queries.length, keys.length);
  return {
    info, queries, keys, qLabels, kLabels, marks, left, right, x1, x2,
    keySet: new Set(keys), querySet: new Set(queries),
    yq: (i) => TOP + qRow.get(i) * ROW + ROW / 2,
    yk: (j) => TOP + kRow.get(j) * ROW + ROW / 2,
    width: x2 + 4 + right,
    height: TOP + rows * ROW + 8,
  };
}

/**
 * The reader's summary under the lines: for the focused token, the three strongest
 * partners in each selected head (the same facts as the lines, in words).
 * @param {HTMLElement} readout
 * @param {{ heads: number[], layer: any, geo: any, colors: string[], focus: any }} o
 */
export function renderReadout(readout, { heads, layer, geo, colors, focus: f }) {
  clear(readout);
  if (!heads.length) return readout.append(el("p", {}, "No head selected: click a head above."));
  if (!f) {
    return readout.append(el("p", { class: "tzv-hint" },
      `Each line joins a query (left) to a key (right); its opacity is the attention weight. ${heads.length} of ${layer.heads} heads shown.`));
  }
  const { info } = geo;
  const isQuery = f.side === "q";
  const tokens = isQuery ? info.query_tokens : info.key_tokens;
  const last = f.end ?? f.index;
  const title = isQuery
    ? `Query ${f.index}${last !== f.index ? `–${last}` : ""} “${displayToken(tokens[f.index])}${last !== f.index ? "…" : ""}” attends most to:`
    : `Key ${f.index} “${displayToken(tokens[f.index])}” is attended most by:`;
  const list = el("ul", { class: "tzv-top" });
  for (const h of heads.slice(0, 16)) {
    const other = isQuery ? geo.keys : geo.queries;
    const scored = other.map((p) => {
      let v = 0;
      for (let s = f.index; s <= last; s++) v = Math.max(v, isQuery ? layer.value(h, s, p) : layer.value(h, p, s));
      return [p, v];
    }).sort((a, b) => b[1] - a[1]).slice(0, 3);
    const otherTokens = isQuery ? info.key_tokens : info.query_tokens;
    list.append(el("li", {},
      el("span", { class: "tzv-swatch", style: `background:${colors[h]}` }),
      el("strong", {}, `Head ${h}: `),
      scored.map(([p, v]) => `${p} “${displayToken(otherTokens[p])}” ${fmt(v, 2)}`).join(" · ")));
  }
  readout.append(el("p", {}, title), list);
}
