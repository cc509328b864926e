// The head view's heat-map display: one large attention matrix per selected head
// (queries down, keys across), token labels on the axes when the cells are big enough.
// Clearer than lines for long inputs; each matrix is one <image>, so it exports as SVG.

import { attentionRamp, lookupRgb, themeColors } from "tzoo/attention/palette.js";
import { shortToken } from "tzoo/attention/tokens.js";

const d3 = globalThis.d3;
const LABEL_FONT = '11px system-ui, -apple-system, "Segoe UI", sans-serif';

/** A data URL of the (queries x keys) matrix of head `h`, restricted to `rows` x `cols`. */
function matrixImage(layer, h, rows, cols, lut) {
  const canvas = document.createElement("canvas");
  canvas.width = cols.length;
  canvas.height = rows.length;
  const image = new ImageData(cols.length, rows.length);
  rows.forEach((i, r) => {
    const row = layer.row(h, i);
    cols.forEach((j, c) => {
      const t = Math.max(0, Math.min(255, Math.round(row[j] * 255))) * 3;
      const k = (r * cols.length + c) * 4;
      image.data[k] = lut[t];
      image.data[k + 1] = lut[t + 1];
      image.data[k + 2] = lut[t + 2];
      image.data[k + 3] = 255;
    });
  });
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

function widest(labels) {
  const context = document.createElement("canvas").getContext("2d");
  context.font = LABEL_FONT;
  return labels.reduce((w, t) => Math.max(w, context.measureText(t).width), 0);
}

/**
 * Draw the heat maps into `svg` (a d3 selection).
 * @param {any} svg
 * @param {{ layer: import("tzoo/attention/data.js").AttentionLayer, heads: number[], colors: string[],
 *           info: any, queries: number[], keys: number[], pinned: [number, number] | null,
 *           width: number, onHover: (h: number | null, i?: number, j?: number) => void,
 *           onPick: (i: number) => void }} o
 */
export function drawHeadMatrices(svg, o) {
  const { layer, heads, queries, keys } = o;
  const theme = themeColors();
  const lut = lookupRgb(attentionRamp(theme));
  const n = Math.max(queries.length, keys.length);
  const perRow = Math.max(1, Math.min(heads.length, Math.floor(o.width / 360)));
  const budget = Math.min(720, (o.width - 24) / perRow - 24);
  const cell = Math.max(1, Math.min(22, Math.floor(budget / n)));
  const labelled = cell >= 11;
  const qLabels = o.info.query_tokens.map((t) => shortToken(t, 14));
  const kLabels = o.info.key_tokens.map((t) => shortToken(t, 14));
  const left = labelled ? Math.ceil(widest(queries.map((i) => qLabels[i]))) + 10 : 6;
  const topPad = labelled ? Math.ceil(widest(keys.map((j) => kLabels[j])) * 0.75) + 26 : 26;
  const w = keys.length * cell;
  const h = queries.length * cell;
  const blockW = left + w + 24;
  const blockH = topPad + h + 16;
  const width = perRow * blockW;
  const height = Math.ceil(heads.length / perRow) * blockH;
  svg.attr("width", width).attr("height", height).attr("viewBox", `0 0 ${width} ${height}`);
  svg.selectAll("*").remove();

  heads.forEach((head, k) => {
    const g = svg.append("g").attr("class", "hm-block").attr("data-head", head)
      .attr("transform", `translate(${(k % perRow) * blockW}, ${Math.floor(k / perRow) * blockH})`);
    g.append("text").attr("class", "hm-title").attr("x", left).attr("y", 14).style("fill", o.colors[head]).text(`Head ${head}`);
    const body = g.append("g").attr("transform", `translate(${left}, ${topPad})`);
    body.append("image").attr("width", w).attr("height", h).attr("preserveAspectRatio", "none")
      .attr("image-rendering", "pixelated").style("image-rendering", "pixelated")
      .attr("href", matrixImage(layer, head, queries, keys, lut));
    body.append("rect").attr("class", "hm-frame").attr("width", w).attr("height", h).style("stroke", o.colors[head]);
    if (o.pinned) {
      const r0 = queries.indexOf(o.pinned[0]);
      const r1 = queries.indexOf(o.pinned[1]);
      if (r0 >= 0 && r1 >= 0) {
        body.append("rect").attr("class", "hm-pin").attr("x", -2).attr("y", r0 * cell - 1)
          .attr("width", w + 4).attr("height", (r1 - r0 + 1) * cell + 2);
      }
    }
    if (labelled) {
      body.append("g").attr("class", "hm-labels").selectAll("text").data(queries).join("text")
        .attr("x", -5).attr("y", (_, r) => r * cell + cell / 2).attr("dy", "0.35em").attr("text-anchor", "end")
        .text((i) => qLabels[i]);
      body.append("g").attr("class", "hm-labels").selectAll("text").data(keys).join("text")
        .attr("transform", (_, c) => `translate(${c * cell + cell / 2}, -5) rotate(-50)`)
        .attr("text-anchor", "start").text((j) => kLabels[j]);
    }
    const hit = body.append("rect").attr("class", "hm-hit").attr("width", w).attr("height", h);
    const at = (event) => {
      const [x, y] = d3.pointer(event, hit.node());
      const c = Math.floor(x / cell);
      const r = Math.floor(y / cell);
      return r >= 0 && r < queries.length && c >= 0 && c < keys.length ? [queries[r], keys[c]] : null;
    };
    hit.on("pointermove", (event) => {
      const cellAt = at(event);
      if (cellAt) o.onHover(head, cellAt[0], cellAt[1]);
    });
    hit.on("pointerleave", () => o.onHover(null));
    hit.on("click", (event) => {
      const cellAt = at(event);
      if (cellAt) o.onPick(cellAt[0]);
    });
  });
}
