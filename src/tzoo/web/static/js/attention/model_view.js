// Model view: a grid of every layer x head as small canvases. Rows load their layer only
// when they scroll into view (IntersectionObserver); a click opens that head in the head view.

import { clear, el } from "tzoo/attention/dom.js";
import { attentionRamp, headColors, lookupRgb, themeColors } from "tzoo/attention/palette.js";
import { drawLines, drawMatrix } from "tzoo/attention/thumbnails.js";

const d3 = globalThis.d3;
const LABEL = 64; // px for the layer labels in the export

/**
 * @param {{ panel: HTMLElement, store: any, source: any, meta: any, notes: any,
 *           navigate: (patch: object, push?: boolean) => void, status: (text: string) => void }} deps
 */
export function createModelView({ panel, store, source, meta, notes, navigate, status }) {
  const maxTokens = Math.max(...Object.values(meta.stacks).map((s) => s.query_tokens.length));
  let style = maxTokens <= 48 ? "lines" : "matrix";
  let builtFor = null; // the stack the grid was built for
  let generation = 0; // bumps when colours or style change: rows redraw
  const rows = new Map(); // layer -> { generation, stack, promise } of its last drawing
  let observer = null;

  const styleSelect = el("select", { id: "tzv-thumbs", onchange: () => { style = styleSelect.value; redrawAll(); } },
    el("option", { value: "matrix" }, "Heat map"), el("option", { value: "lines" }, "Lines"));
  styleSelect.value = style;
  const grid = el("div", { class: "tzv-grid", role: "group", "aria-label": "Attention of every layer and head" });
  clear(panel).append(
    el("div", { class: "tzv-panelbar" },
      el("label", { for: "tzv-thumbs" }, "Thumbnails "), styleSelect,
      el("span", { class: "tzv-hint" }, "Each cell is one head. Click a cell to open it in the head view.")),
    el("div", { class: "tzv-gridwrap" }, grid),
  );

  /** Cells as large as fit beside the layer labels (76 px), between 44 and 120 px. */
  function cellSize(nHeads) {
    const width = grid.parentElement.clientWidth || panel.clientWidth - 32 || 900;
    return Math.max(44, Math.min(120, Math.floor((width - 76 - 6 * nHeads) / nHeads)));
  }

  function build(state) {
    const info = meta.stacks[state.stack];
    const size = cellSize(info.n_heads);
    const dpr = Math.min(2, window.devicePixelRatio || 1);
    observer?.disconnect();
    rows.clear();
    clear(grid);
    grid.style.setProperty("--cell", `${size}px`);
    grid.style.gridTemplateColumns = `auto repeat(${info.n_heads}, var(--cell))`;
    grid.append(el("div", { class: "tzv-corner" }, "Layer \\ head"));
    for (let h = 0; h < info.n_heads; h++) grid.append(el("div", { class: "tzv-colhead" }, String(h)));
    observer = new IntersectionObserver((entries) => {
      for (const entry of entries) if (entry.isIntersecting) drawRow(Number(entry.target.dataset.layer));
    }, { root: grid.parentElement, rootMargin: "300px 0px" });
    for (let l = 0; l < info.n_layers; l++) {
      const label = el("div", { class: "tzv-rowhead", dataset: { layer: l } }, `Layer ${l}`);
      const count = notes.layerCount(state.stack, l);
      if (count) label.append(el("span", { class: "tzv-count", title: `${count} comment(s) on this layer` }, count));
      grid.append(label);
      for (let h = 0; h < info.n_heads; h++) grid.append(cell(state.stack, l, h, size, dpr));
      observer.observe(label);
    }
    builtFor = state.stack;
  }

  function cell(stack, l, h, size, dpr) {
    const canvas = el("canvas", { width: Math.round(size * dpr), height: Math.round(size * dpr), "aria-hidden": "true" });
    const button = el("button", {
      type: "button", class: "tzv-cell", "aria-label": `Layer ${l}, head ${h}: open in the head view`,
      title: `Layer ${l}, head ${h}`, dataset: { layer: l, head: h },
      onclick: () => navigate({ view: "head", layer: l, heads: [h], token: null, tokenEnd: null, key: null }, true),
    }, canvas);
    const wrap = el("div", { class: "tzv-cellwrap is-loading", dataset: { layer: l, head: h } }, button);
    const count = notes.cellCount(stack, l, h);
    if (count) {
      wrap.append(el("button", {
        type: "button", class: "tzv-count tzv-count-cell", "aria-label": `${count} comment(s) on layer ${l}, head ${h}`,
        onclick: () => notes.open(notes.firstThread(stack, l, h)),
      }, count));
    }
    return wrap;
  }

  /** Load layer `l` and draw its cells in the current style and colours (once per generation). */
  function drawRow(l) {
    const known = rows.get(l);
    if (known && known.generation === generation && known.stack === builtFor) return known.promise;
    const entry = { generation, stack: builtFor, promise: null };
    entry.promise = paintRow(l, entry).catch((error) => {
      for (const wrap of grid.querySelectorAll(`.tzv-cellwrap[data-layer="${l}"]`)) {
        wrap.classList.replace("is-loading", "is-missing");
        wrap.title = String(error.message || error);
      }
      status(String(error.message || error));
    });
    rows.set(l, entry);
    return entry.promise;
  }

  async function paintRow(l, entry) {
    const layer = await source.attention(entry.stack, l);
    if (entry.stack !== builtFor || entry.generation !== generation) return;
    const colors = themeColors();
    const lut = lookupRgb(attentionRamp(colors));
    const heads = headColors(layer.heads, colors.dark);
    for (const wrap of grid.querySelectorAll(`.tzv-cellwrap[data-layer="${l}"]`)) {
      const h = Number(wrap.dataset.head);
      const canvas = wrap.querySelector("canvas");
      if (style === "matrix") drawMatrix(canvas, layer, h, lut);
      else drawLines(canvas, layer, h, heads[h], colors.card);
      wrap.classList.remove("is-loading");
    }
  }

  function redrawAll() {
    generation++;
    for (const label of grid.querySelectorAll(".tzv-rowhead")) {
      const rect = label.getBoundingClientRect();
      if (rect.bottom > -300 && rect.top < window.innerHeight + 300) drawRow(Number(label.dataset.layer));
    }
  }

  function render(state) {
    if (builtFor !== state.stack || grid.dataset.notes !== notes.version()) {
      grid.dataset.notes = notes.version();
      build(state);
    }
    grid.querySelectorAll(".tzv-cellwrap").forEach((wrap) => {
      wrap.classList.toggle("is-current", Number(wrap.dataset.layer) === state.layer && (state.heads ?? []).length === 1 && state.heads[0] === Number(wrap.dataset.head));
    });
  }

  /** Every cell redrawn at 2x into one canvas with head and layer labels. */
  async function composite() {
    const info = meta.stacks[builtFor];
    const layers = await Promise.all(d3.range(info.n_layers).map((l) => source.attention(builtFor, l)));
    const colors = themeColors();
    const lut = lookupRgb(attentionRamp(colors));
    const heads = headColors(info.n_heads, colors.dark);
    const size = cellSize(info.n_heads);
    const gap = 6;
    const top = 24;
    const scale = 2;
    const out = document.createElement("canvas");
    out.width = (LABEL + info.n_heads * (size + gap) + gap) * scale;
    out.height = (top + info.n_layers * (size + gap) + gap) * scale;
    const context = out.getContext("2d");
    context.scale(scale, scale);
    context.fillStyle = colors.bg;
    context.fillRect(0, 0, out.width, out.height);
    context.font = '12px system-ui, -apple-system, "Segoe UI", sans-serif';
    context.fillStyle = colors.muted;
    context.textAlign = "center";
    for (let h = 0; h < info.n_heads; h++) context.fillText(`Head ${h}`, LABEL + h * (size + gap) + size / 2, 16);
    context.textAlign = "right";
    const cell = document.createElement("canvas");
    cell.width = cell.height = size * scale;
    layers.forEach((layer, l) => {
      const y = top + l * (size + gap);
      context.fillStyle = colors.muted;
      context.fillText(`Layer ${l}`, LABEL - 8, y + size / 2 + 4);
      for (let h = 0; h < info.n_heads; h++) {
        const x = LABEL + h * (size + gap);
        if (style === "matrix") drawMatrix(cell, layer, h, lut);
        else drawLines(cell, layer, h, heads[h], colors.card);
        context.fillStyle = colors.line;
        context.fillRect(x - 1, y - 1, size + 2, size + 2);
        context.drawImage(cell, x, y, size, size);
      }
    });
    return out;
  }

  return {
    render,
    refresh: () => redrawAll(),
    exportTarget: async () => ({ canvas: await composite(), name: `model-${builtFor}` }),
  };
}
