// The lens heat map: one row per layer (the model's output at the top, the embeddings at
// the bottom), one column per token position. Each cell shows the layer's most likely
// next token; its colour is the probability of the model's final token there, the KL to
// the final distribution, or the entropy. Hover or focus a cell for its top tokens.
//
// It is an HTML table with role="grid": screen readers read its headers, a roving
// tabindex makes it one Tab stop, and the arrow keys move between cells. Every token
// goes in as text (textContent), never as markup.

import { clear, el } from "tzoo/wheel/dom.js"; // the wheel's text-only DOM helpers
import { layerLabel, nats, percent, shortToken, spokenLayer, spokenToken, visibleToken } from "tzoo/lens/format.js";

const d3 = globalThis.d3;

/**
 * What a cell's colour can show.
 * @type {Record<string, { label: string, short: string, about: string,
 *                         fixed?: [number, number], interpolator: (t: number) => string,
 *                         format: (x: number) => string }>}
 */
export const METRICS = {
  final_probability: {
    label: "Probability of the final token",
    short: "p(final)",
    about: "How much probability each layer already gives the token the model finally predicts at that position.",
    fixed: [0, 1],
    interpolator: d3.interpolateBlues,
    format: percent,
  },
  kl_to_final: {
    label: "KL to final (nats)",
    short: "KL",
    about: "KL divergence from the model's final distribution to the layer's (0 at the output).",
    interpolator: d3.interpolateOranges,
    format: (x) => `${nats(x)} nats`,
  },
  entropy: {
    label: "Entropy (nats)",
    short: "entropy",
    about: "Entropy of the layer's next-token distribution: high when it is spread over many tokens.",
    interpolator: d3.interpolateGreens,
    format: (x) => `${nats(x)} nats`,
  },
};

/** Dark or light ink for text on `background` (a CSS colour), whichever reads better. */
export function inkFor(background) {
  const c = d3.rgb(background);
  const lin = (v) => {
    const s = v / 255;
    return s <= 0.03928 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
  };
  const luminance = 0.2126 * lin(c.r) + 0.7152 * lin(c.g) + 0.0722 * lin(c.b);
  return luminance > 0.33 ? "#14161b" : "#ffffff";
}

/**
 * The colour domain of `metric` over `result`: fixed for probability, 0 to the largest
 * finite value otherwise.
 * @returns {[number, number]}
 */
export function domainOf(metric, result) {
  const def = METRICS[metric];
  if (def.fixed) return def.fixed;
  let hi = 0;
  for (const row of result[metric] || []) for (const v of row) if (Number.isFinite(v) && v > hi) hi = v;
  return [0, hi > 0 ? hi : 1];
}

/**
 * The top tokens of one cell: [{id, text, probability}], most likely first.
 * @param {any} result a lens RESULT
 */
export function topTokens(result, layer, position) {
  const ids = result.top_ids[layer][position];
  const probs = result.top_probs[layer][position];
  return ids.map((id, i) => ({ id, text: result.token_strings[String(id)] ?? `#${id}`, probability: probs[i] }));
}

/**
 * Draw heat maps into `host`, with the colour scale in `legend`.
 * @param {HTMLElement} host
 * @param {{ legend: HTMLElement, label?: string }} options
 */
export function createHeatmap(host, { legend, label = "Lens heat map" }) {
  host.classList.add("lens-heat-host");
  const scroller = el("div", { class: "lens-heat-scroll" });
  const tip = el("div", { class: "lens-tip", role: "tooltip", id: `${host.id || "lens-heatmap"}-tip`, hidden: true });
  host.append(scroller, tip);

  /** @type {any} */
  let result = null;
  let metric = "final_probability";
  /** @type {HTMLTableCellElement[][]} cells[layer][position] */
  let cells = [];
  let table = null;
  let focused = null; // [layer, position] holding tabindex=0
  let hovered = null;

  const last = () => result.layers.length - 1;
  const finalId = (position) => result.top_ids[last()][position][0];

  function render(next) {
    result = next;
    clear(scroller);
    hideTip();
    const T = result.tokens.length;
    const L = last();
    const head = el("tr", {}, el("th", { scope: "col", class: "lens-corner" }, "Layer"));
    result.tokens.forEach((token, t) => {
      head.append(el("th", { scope: "col", class: "lens-col", title: `position ${t}: ${visibleToken(token)}`, dataset: { position: String(t) } },
        el("span", { class: "lens-pos" }, String(t)),
        el("span", { class: "lens-token" }, shortToken(token, 8))));
    });
    const body = el("tbody");
    cells = result.layers.map(() => []);
    for (let layer = L; layer >= 0; layer--) {
      const row = el("tr", { dataset: { layer: String(layer) } },
        el("th", { scope: "row", class: "lens-layer", title: spokenLayer(layer, L) }, layerLabel(layer, L)));
      for (let t = 0; t < T; t++) {
        const top = result.token_strings[String(result.top_ids[layer][t][0])] ?? "";
        const cell = el("td", { role: "gridcell", tabindex: "-1", class: "lens-cell", dataset: { layer: String(layer), position: String(t) } },
          shortToken(top, 6));
        cells[layer][t] = /** @type {HTMLTableCellElement} */ (cell);
        row.append(cell);
      }
      body.append(row);
    }
    table = el("table", { class: "lens-grid", role: "grid", "aria-label": label, "aria-describedby": "lens-heatmap-hint",
      "aria-rowcount": String(L + 2), "aria-colcount": String(T + 1), dataset: { layers: String(L + 1), positions: String(T) } },
    el("thead", {}, head), body);
    table.addEventListener("keydown", onKey);
    table.addEventListener("focusin", (event) => {
      const cell = cellOf(event.target);
      if (cell) showTip(cell);
    });
    table.addEventListener("focusout", (event) => {
      if (!table.contains(/** @type {Node} */ (event.relatedTarget))) hideTip();
    });
    table.addEventListener("pointerover", (event) => {
      const cell = cellOf(event.target);
      if (cell && cell !== hovered) {
        hovered = cell;
        showTip(cell);
      }
    });
    table.addEventListener("pointerleave", () => {
      hovered = null;
      const active = document.activeElement;
      if (cellOf(active)) showTip(active);
      else hideTip();
    });
    scroller.append(table);
    focused = null;
    if (T > 0) setTabStop(L, 0);
    paint();
  }

  /** Colour every cell (and its accessible name) by the current metric. */
  function paint() {
    if (!result) return;
    const def = METRICS[metric];
    const scale = d3.scaleSequential(def.interpolator).domain(domainOf(metric, result)).clamp(true);
    const L = last();
    cells.forEach((row, layer) => {
      row.forEach((cell, t) => {
        const value = result[metric][layer][t];
        const colour = Number.isFinite(value) ? scale(value) : "#9aa1b0";
        cell.style.background = colour;
        cell.style.color = inkFor(colour);
        const top = topTokens(result, layer, t)[0];
        cell.setAttribute("aria-label",
          `${spokenLayer(layer, L)}, position ${t} ${spokenToken(result.tokens[t])}: top ${spokenToken(top?.text)} ${percent(top?.probability)}; ${def.short} ${def.format(value)}`);
      });
    });
    host.dataset.metric = metric;
    renderLegend(def, scale);
    const active = hovered || (cellOf(document.activeElement) ? document.activeElement : null);
    if (active && !tip.hidden) showTip(active);
  }

  function renderLegend(def, scale) {
    clear(legend);
    const [lo, hi] = scale.domain();
    const stops = d3.range(0, 11).map((i) => `${scale(lo + ((hi - lo) * i) / 10)} ${i * 10}%`).join(", ");
    const mid = (lo + hi) / 2;
    legend.append(
      el("p", { class: "lens-legend-title", id: "lens-legend-title" }, def.label),
      el("div", { class: "lens-legend-bar", role: "img", style: `background: linear-gradient(to right, ${stops})`,
        "aria-label": `Colour scale: ${def.format(lo)} is the lightest, ${def.format(hi)} the darkest.` }),
      el("div", { class: "lens-legend-ticks", "aria-hidden": "true" },
        el("span", {}, def.format(lo)), el("span", {}, def.format(mid)), el("span", {}, def.format(hi))),
      el("p", { class: "muted lens-legend-about" }, def.about));
  }

  // -- the tooltip --------------------------------------------------------------------------

  function cellOf(node) {
    return node instanceof HTMLElement && node.classList.contains("lens-cell") && table?.contains(node) ? node : null;
  }

  function showTip(cell) {
    const layer = Number(cell.dataset.layer);
    const t = Number(cell.dataset.position);
    const L = last();
    clear(tip);
    const final = result.token_strings[String(finalId(t))] ?? "";
    const rank = result.final_token_rank[layer][t];
    tip.append(
      el("p", { class: "lens-tip-head" },
        el("strong", {}, layer === 0 ? "Embeddings" : layer === L ? `Output (layer ${layer})` : `Layer ${layer}`),
        ` · position ${t} `, el("span", { class: "lens-token lens-chip" }, visibleToken(result.tokens[t]))),
      el("ol", { class: "lens-tip-top" }, ...topTokens(result, layer, t).map((top) =>
        el("li", { dataset: { id: String(top.id) } },
          el("span", { class: "lens-token" }, visibleToken(top.text)),
          el("span", { class: "lens-tip-pct" }, percent(top.probability))))),
      el("dl", { class: "lens-tip-facts" },
        el("dt", {}, "Final token"),
        el("dd", {}, el("span", { class: "lens-token lens-chip" }, visibleToken(final)),
          ` ${percent(result.final_probability[layer][t])}, rank ${Number.isFinite(rank) ? rank + 1 : "–"}`),
        el("dt", {}, "KL to final"), el("dd", { class: "lens-tip-kl" }, `${nats(result.kl_to_final[layer][t])} nats`),
        el("dt", {}, "Entropy"), el("dd", { class: "lens-tip-entropy" }, `${nats(result.entropy[layer][t])} nats`)));
    tip.dataset.layer = String(layer);
    tip.dataset.position = String(t);
    tip.hidden = false;
    for (const other of table.querySelectorAll("[aria-describedby='" + tip.id + "']")) other.removeAttribute("aria-describedby");
    cell.setAttribute("aria-describedby", tip.id);
    placeTip(cell);
  }

  function placeTip(cell) {
    const box = host.getBoundingClientRect();
    const r = cell.getBoundingClientRect();
    const width = tip.offsetWidth;
    let left = r.left - box.left + r.width / 2 - width / 2;
    left = Math.max(0, Math.min(left, box.width - width));
    tip.style.left = `${left}px`;
    tip.style.top = `${r.bottom - box.top + 6}px`;
  }

  function hideTip() {
    tip.hidden = true;
  }

  // -- the keyboard ---------------------------------------------------------------------------

  function setTabStop(layer, t) {
    if (focused) cells[focused[0]]?.[focused[1]]?.setAttribute("tabindex", "-1");
    cells[layer][t].setAttribute("tabindex", "0");
    focused = [layer, t];
    return cells[layer][t];
  }

  function onKey(event) {
    const cell = cellOf(event.target);
    if (!cell) return;
    if (event.key === "Escape") return hideTip();
    const L = last();
    const T = result.tokens.length;
    let layer = Number(cell.dataset.layer);
    let t = Number(cell.dataset.position);
    switch (event.key) {
      case "ArrowUp": layer = Math.min(L, layer + 1); break; // up is towards the output
      case "ArrowDown": layer = Math.max(0, layer - 1); break;
      case "ArrowLeft": t = Math.max(0, t - 1); break;
      case "ArrowRight": t = Math.min(T - 1, t + 1); break;
      case "Home": t = 0; break;
      case "End": t = T - 1; break;
      case "PageUp": layer = L; break;
      case "PageDown": layer = 0; break;
      default: return;
    }
    event.preventDefault();
    setTabStop(layer, t).focus();
  }

  return {
    render,
    /** Colour by "final_probability", "kl_to_final" or "entropy". */
    setMetric(name) {
      if (!(name in METRICS)) return;
      metric = name;
      paint();
    },
    /** The cell at (layer, position), for tests and links. */
    cell: (layer, position) => cells[layer]?.[position] || null,
  };
}
