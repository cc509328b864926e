// Neuron view: for one (layer, head) and one query token, the query vector q, every key
// vector k, their elementwise product q×k, the scaled dot product and its softmax, next to
// the attention the model stored: a reader sees how q and k make each weight. For T5 the
// learned relative-position bias gets its own column, so q·k + bias = score on every row.
//
// Vectors are drawn as pixel images (one row per key, one column per dimension) inside the
// SVG, so 512 keys x 64 dimensions stay two elements and still export as SVG.

import { clear, el, fmt } from "tzoo/attention/dom.js";
import { divergingRamp, headColors, themeColors } from "tzoo/attention/palette.js";
import { attentionRow, maxAbsDiff } from "tzoo/attention/neuron_math.js";
import { displayToken, shortToken } from "tzoo/attention/tokens.js";

const d3 = globalThis.d3;
const ROW = 18;
const FONT = '12px system-ui, -apple-system, "Segoe UI", sans-serif';
const MATCH = 2e-3; // float16 storage of q, k, bias and attention keeps agreement within this

/**
 * A data URL of a (rows x cols) image: pixel (r, c) shows `value(r, c)` in -1..1 through
 * `ramp` (NaN: `blank`). Colours come from a 513-step lookup table.
 */
function vectorImage(rows, cols, value, ramp, blank) {
  const steps = 256;
  const lut = Array.from({ length: 2 * steps + 1 }, (_, k) => d3.rgb(ramp(k / steps - 1)));
  const none = d3.rgb(blank);
  const canvas = document.createElement("canvas");
  canvas.width = cols;
  canvas.height = rows;
  const image = new ImageData(cols, rows);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const v = value(r, c);
      const rgb = Number.isNaN(v) ? none : lut[Math.round((Math.max(-1, Math.min(1, v)) + 1) * steps)];
      const k = (r * cols + c) * 4;
      image.data[k] = rgb.r;
      image.data[k + 1] = rgb.g;
      image.data[k + 2] = rgb.b;
      image.data[k + 3] = 255;
    }
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

/**
 * A robust colour scale for vectors: the 98th percentile of |value| (at least a tiny
 * epsilon), so one outlier dimension does not wash every other cell out.
 */
function absScale(vectors) {
  const all = [];
  for (const v of vectors) for (let d = 0; d < v.length; d++) all.push(Math.abs(v[d]));
  all.sort((a, b) => a - b);
  return Math.max(1e-9, all[Math.floor(0.98 * (all.length - 1))] || 0);
}

/**
 * @param {{ panel: HTMLElement, store: any, source: any, meta: any,
 *           navigate: (patch: object, push?: boolean) => void, status: (text: string) => void }} deps
 */
export function createNeuronView({ panel, store, source, meta, navigate, status }) {
  let ticket = 0;
  const TOP = 24;
  let topOnly = null; // null: decide by length (long inputs start with the top keys only)
  const topBox = el("input", { type: "checkbox", id: "tzv-topkeys", onchange: () => { topOnly = topBox.checked; render(store.get()); } });
  const summary = el("p", { class: "tzv-verify", "aria-live": "polite" });
  const readout = el("p", { class: "tzv-readout tzv-hint" }, "Hover a cell to read its value.");
  const svg = d3.create("svg").attr("class", "tzv-svg tzv-neuronsvg").attr("role", "img");
  const scroller = el("div", { class: "tzv-scroll" }, svg.node());
  const message = el("p", { class: "tzv-empty", hidden: true });
  clear(panel).append(
    el("div", { class: "tzv-panelbar" },
      el("label", { class: "tzv-check" }, topBox, ` Only the ${TOP} keys with the most attention`),
      el("span", { class: "tzv-hint" }, "Pick a layer, a head and a query token above. Each row is a key: its vector k, the elementwise product q×k (which sums to q·k), the scaled score (plus the position bias, for T5), the softmax over keys, and the weight the model stored. Click a key token to make it the query.")),
    summary, message, scroller, readout,
  );

  function empty(text) {
    message.hidden = false;
    message.textContent = text;
    scroller.hidden = true;
    summary.textContent = "";
  }

  async function render(state) {
    const mine = ++ticket;
    const info = meta.stacks[state.stack];
    if (!info.has_neurons) {
      return empty(state.stack === "cross"
        ? "Cross attention has no neuron view here: pick the encoder or decoder stack."
        : "This visualization has no query and key vectors, so the neuron view is not available.");
    }
    panel.classList.add("is-loading");
    let layer, neurons, bias;
    try {
      [layer, neurons, bias] = await Promise.all([
        source.attention(state.stack, state.layer),
        source.neurons(state.stack, state.layer),
        info.has_position_bias ? source.positionBias(state.stack) : null,
      ]);
    } catch (error) {
      if (mine === ticket) {
        panel.classList.remove("is-loading");
        empty(String(error.message || error));
        status(String(error.message || error));
      }
      return;
    }
    if (mine !== ticket) return;
    panel.classList.remove("is-loading");
    message.hidden = true;
    scroller.hidden = false;
    draw(state, info, layer, neurons, bias);
  }

  /** @param {import("tzoo/attention/data.js").AttentionLayer | null} bias T5's position bias */
  function draw(state, info, layer, neurons, bias) {
    const h = Math.min(state.head, neurons.heads - 1);
    const count = neurons.t;
    const i = state.token ?? count - 1;
    const causal = state.stack === "decoder";
    const scale = Number(info.score_scale ?? 1 / Math.sqrt(neurons.d));
    const q = neurons.query(h, i);
    const row = attentionRow(q, (j) => neurons.key(h, j), count, scale, causal ? i : null, bias && ((j) => bias.value(h, i, j)));
    const stored = Float64Array.from({ length: count }, (_, j) => layer.value(h, i, j));
    const diff = maxAbsDiff(row.softmax, stored);
    const matches = diff < MATCH;
    const tokens = info.key_tokens;
    const onlyTop = topOnly ?? count > 64;
    topBox.checked = onlyTop;
    /** The key positions drawn, in order: all, or the TOP most attended. */
    const shown = onlyTop && count > TOP
      ? Array.from({ length: count }, (_, j) => j).sort((a, b) => stored[b] - stored[a]).slice(0, TOP).sort((a, b) => a - b)
      : Array.from({ length: count }, (_, j) => j);

    summary.dataset.maxDiff = String(diff);
    summary.dataset.matches = String(matches);
    const scaled = scale === 1 ? "q·k" : `${fmt(scale, 4)} × q·k`;
    summary.replaceChildren(
      el("strong", {}, bias ? `softmax(${scaled} + bias)` : `softmax(${scaled})`),
      causal ? ` over keys 0–${i} (causal mask)` : " over all keys",
      bias ? ", with the learned relative-position bias this model (T5) adds before the softmax," : "",
      " against the attention the model stored: largest difference ",
      el("strong", {}, diff.toExponential(1)),
      matches ? " — they match."
        : bias ? " — they differ: this model adds something q·k and the bias do not hold."
        : " — they differ: this model adds something q·k does not hold (a position bias or a mask).",
    );
    summary.classList.toggle("is-ok", matches);
    summary.classList.toggle("is-off", !matches);

    const colors = themeColors();
    const ramp = divergingRamp(colors);
    const head = headColors(neurons.heads, colors.dark)[h];
    const keys = Array.from({ length: count }, (_, j) => neurons.key(h, j));
    const n = shown.length;
    const vMax = absScale([q, ...keys]);
    const pMax = absScale(row.products.filter((_, j) => !row.masked[j]));
    const d = neurons.d;
    const cw = Math.max(3, Math.min(14, Math.floor(300 / d)));
    const labels = tokens.map((t) => shortToken(t, 20));
    const context = document.createElement("canvas").getContext("2d");
    context.font = FONT;
    const qLabel = `query ${i} ${shortToken(tokens[i], 14)}`;
    const labelW = Math.min(190, Math.max(80, context.measureText(qLabel).width * 1.12 + 16, ...labels.map((t) => context.measureText(t).width + 34)));

    const x = { label: labelW, k: labelW + 10, p: labelW + 10 + d * cw + 28 };
    x.score = x.p + d * cw + 24;
    if (bias) { // q·k + bias = score, one column each
      x.dot = x.score;
      x.bias = x.dot + 76;
      x.score = x.bias + 76;
    }
    x.soft = x.score + 84;
    x.att = x.soft + 122;
    x.end = x.att + 122;
    const top = 74; // titles, then the query row
    const y = (r) => top + r * ROW; // r: the row index among the shown keys
    const width = x.end;
    const height = top + n * ROW + 8;
    svg.attr("width", width).attr("height", height).attr("viewBox", `0 0 ${width} ${height}`)
      .attr("aria-label", `Neuron view of layer ${state.layer}, head ${h}, query ${i}: ${displayToken(tokens[i])}`);
    svg.selectAll("*").remove();

    const titles = [
      [x.label - 4, "end", "Key"], [x.k, "start", "k (key vector)"], [x.p, "start", "q × k"],
      ...(bias ? [[x.dot, "start", scaled], [x.bias, "start", "+ bias"], [x.score, "start", "= score"]]
        : [[x.score, "start", "score"]]),
      [x.soft, "start", "softmax"], [x.att, "start", "stored"],
    ];
    svg.append("g").attr("class", "nv-titles").selectAll("text").data(titles).join("text")
      .attr("x", (t) => t[0]).attr("y", 14).attr("text-anchor", (t) => t[1]).text((t) => t[2]);

    // The query: its label, and q drawn above the key vectors so each dimension lines up.
    const qRow = svg.append("g").attr("class", "nv-query").attr("transform", `translate(0, 30)`);
    qRow.append("text").attr("x", x.label - 4).attr("y", ROW / 2).attr("dy", "0.35em").attr("text-anchor", "end")
      .attr("class", "nv-qlabel").text(qLabel);
    qRow.append("image").attr("x", x.k).attr("y", 0).attr("width", d * cw).attr("height", ROW)
      .attr("preserveAspectRatio", "none").attr("image-rendering", "pixelated").style("image-rendering", "pixelated")
      .attr("href", vectorImage(1, d, (_, c) => q[c] / vMax, ramp, colors.card));
    qRow.append("rect").attr("class", "nv-frame").attr("x", x.k).attr("y", 0).attr("width", d * cw).attr("height", ROW);
    qRow.append("text").attr("class", "nv-note").attr("x", x.p).attr("y", ROW / 2).attr("dy", "0.35em")
      .text(`q: ${d} dimensions of head ${h} · blue < 0 < red · score = ${bias ? (scale === 1 ? "Σ(q × k) + bias" : `${fmt(scale, 4)} × Σ(q × k) + bias`) : `${fmt(scale, 4)} × Σ(q × k)`}`);

    // Keys: one pixel row each.
    const body = svg.append("g").attr("class", "nv-body");
    body.append("image").attr("class", "nv-keys").attr("x", x.k).attr("y", top).attr("width", d * cw).attr("height", n * ROW)
      .attr("preserveAspectRatio", "none").attr("image-rendering", "pixelated").style("image-rendering", "pixelated")
      .attr("href", vectorImage(n, d, (r, c) => keys[shown[r]][c] / vMax, ramp, colors.card));
    body.append("image").attr("class", "nv-products").attr("x", x.p).attr("y", top).attr("width", d * cw).attr("height", n * ROW)
      .attr("preserveAspectRatio", "none").attr("image-rendering", "pixelated").style("image-rendering", "pixelated")
      .attr("href", vectorImage(n, d, (r, c) => (row.masked[shown[r]] ? NaN : row.products[shown[r]][c] / pMax), ramp, colors.card));
    for (const [at] of [[x.k], [x.p]]) {
      body.append("rect").attr("class", "nv-frame").attr("x", at).attr("y", top).attr("width", d * cw).attr("height", n * ROW);
    }

    const rows = body.selectAll("g.nv-row").data(shown).join("g")
      .attr("class", (j) => `nv-row${row.masked[j] ? " is-masked" : ""}${j === i ? " is-query" : ""}`)
      .attr("transform", (j, r) => `translate(0, ${y(r)})`)
      .attr("data-j", (j) => j)
      .attr("data-score", (j) => (row.masked[j] ? "" : row.scores[j]))
      .attr("data-bias", (j) => (row.biases ? row.biases[j] : null))
      .attr("data-softmax", (j) => row.softmax[j])
      .attr("data-attention", (j) => stored[j]);
    rows.append("line").attr("class", "nv-sep").attr("x1", 0).attr("x2", width).attr("y1", ROW).attr("y2", ROW);
    rows.append("text").attr("class", "nv-token").attr("x", x.label - 4).attr("y", ROW / 2).attr("dy", "0.35em")
      .attr("text-anchor", "end").text((j) => `${j} ${labels[j]}`)
      .append("title").text((j) => `Key ${j}: ${displayToken(tokens[j])} (click to make it the query)`);
    if (bias) {
      rows.append("text").attr("class", "nv-num nv-dot").attr("x", x.dot).attr("y", ROW / 2).attr("dy", "0.35em")
        .text((j) => (row.masked[j] ? "" : fmt(scale * row.dots[j], 3)));
      rows.append("text").attr("class", "nv-num nv-bias").attr("x", x.bias).attr("y", ROW / 2).attr("dy", "0.35em")
        .text((j) => (row.masked[j] ? "" : fmt(row.biases[j], 3)));
    }
    rows.append("text").attr("class", "nv-num nv-score").attr("x", x.score).attr("y", ROW / 2).attr("dy", "0.35em")
      .text((j) => (row.masked[j] ? "masked" : fmt(row.scores[j], 3)));
    const bar = (g, at, values, fill, cls) => {
      g.append("rect").attr("class", "nv-bar-bg").attr("x", at).attr("y", 4).attr("width", 50).attr("height", ROW - 8);
      g.append("rect").attr("class", "nv-bar").attr("x", at).attr("y", 4).attr("height", ROW - 8)
        .attr("width", (j) => Math.max(0, Math.min(1, values[j])) * 50).attr("fill", fill);
      g.append("text").attr("class", `nv-num ${cls}`).attr("x", at + 56).attr("y", ROW / 2).attr("dy", "0.35em")
        .text((j) => fmt(values[j], 4));
    };
    bar(rows, x.soft, row.softmax, colors.accent, "nv-softmax");
    bar(rows, x.att, stored, head, "nv-attention");
    rows.filter((j) => !row.masked[j] && Math.abs(row.softmax[j] - stored[j]) >= MATCH)
      .append("text").attr("class", "nv-mismatch").attr("x", x.end - 4).attr("y", ROW / 2).attr("dy", "0.35em")
      .attr("text-anchor", "end").text("≠");

    rows.select(".nv-token").on("click", (event, j) => navigate({ token: j, tokenEnd: null }, false));

    // Hover a vector cell to read it.
    svg.on("pointermove", (event) => {
      const [px, py] = d3.pointer(event);
      const j = shown[Math.floor((py - top) / ROW)];
      const inK = px >= x.k && px < x.k + d * cw;
      const inP = px >= x.p && px < x.p + d * cw;
      if (py >= 30 && py < 30 + ROW && inK) {
        const c = Math.floor((px - x.k) / cw);
        readout.textContent = `q[${c}] = ${fmt(q[c], 4)}`;
      } else if (j != null && py >= top && (inK || inP)) {
        const c = Math.floor((px - (inK ? x.k : x.p)) / cw);
        readout.textContent = inK
          ? `k[${c}] of key ${j} “${displayToken(tokens[j])}” = ${fmt(keys[j][c], 4)}; q[${c}] = ${fmt(q[c], 4)}`
          : `q[${c}] × k[${c}] for key ${j} = ${fmt(row.products[j][c], 4)} (the row sums to q·k = ${fmt(row.dots[j], 4)})`;
      }
    });
  }

  return {
    render,
    refresh: () => render(store.get()),
    exportTarget: () => ({ svg: svg.node(), name: `neuron-${store.get().stack}-layer${store.get().layer}-head${store.get().head}` }),
  };
}
