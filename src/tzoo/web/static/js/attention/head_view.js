// Head view: query tokens on the left, key tokens on the right, one line per (head, query,
// key) whose opacity is the attention weight, one colour per head (as in BertViz).
//
// Built to stay fast at 512 tokens: lines are grouped by head and by opacity bucket into
// one <path> each (at most heads x 10 elements, whatever the length); weights under a
// threshold are skipped; only the selected layer is loaded; hovering redraws lines only.

import { clear, el, fmt } from "tzoo/attention/dom.js";
import { headings, headLayout, linePaths, renderReadout, ROW } from "tzoo/attention/head_layout.js";
import { drawHeadMatrices } from "tzoo/attention/head_matrix.js";
import { headColors, themeColors } from "tzoo/attention/palette.js";
import { selectedHeads, tokenRange } from "tzoo/attention/state.js";
import { displayToken, filterPositions } from "tzoo/attention/tokens.js";

const d3 = globalThis.d3;

/**
 * @param {{ panel: HTMLElement, store: any, source: any, meta: any, notes: any,
 *           navigate: (patch: object) => void, status: (text: string) => void }} deps
 */
export function createHeadView({ panel, store, source, meta, notes, navigate, status }) {
  // Long inputs start with a higher threshold: below a few percent a line is invisible
  // anyway, and skipping it keeps the picture (and the SVG) light.
  const longest = Math.max(...Object.values(meta.stacks).map((s) => s.query_tokens.length));
  let threshold = longest > 256 ? 0.05 : longest > 64 ? 0.03 : 0.01;
  let hover = null; // { side: "q" | "k", index } while the pointer is on a token
  let ticket = 0;
  /** @type {any} what the last render drew: layer data, geometry, state */
  let drawn = null;

  const chips = el("div", { class: "tzv-chips", role: "group", "aria-label": "Heads" });
  const allButton = el("button", { type: "button", class: "tzv-mini", onclick: () => navigate({ heads: null }, false) }, "All heads");
  const output = el("output", { for: "tzv-threshold" }, fmt(threshold, 3));
  const slider = el("input", {
    type: "range", id: "tzv-threshold", min: "0", max: "0.2", step: "0.005", value: String(threshold),
    "aria-describedby": "tzv-threshold-help",
    oninput: () => {
      threshold = Number(slider.value);
      output.textContent = fmt(threshold, 3);
      drawLines();
    },
  });
  const display = el("select", { id: "tzv-display", onchange: () => navigate({ display: display.value }, false) },
    el("option", { value: "lines" }, "Lines"), el("option", { value: "matrix" }, "Heat map"));
  const svg = d3.create("svg").attr("class", "tzv-svg tzv-headsvg").attr("role", "img");
  const matrix = d3.create("svg").attr("class", "tzv-svg tzv-matrixsvg").attr("role", "img");
  const scroller = el("div", {
    class: "tzv-scroll", tabindex: "0",
    "aria-label": "Attention of the selected heads. Arrow keys move the pinned query token, Escape clears it.",
  }, svg.node(), matrix.node());
  const readout = el("div", { class: "tzv-readout", "aria-live": "polite" });

  clear(panel).append(
    el("div", { class: "tzv-panelbar" },
      chips, allButton,
      el("label", { class: "tzv-range" }, "Show ", display),
      el("label", { class: "tzv-range" }, "Hide weights below ", slider, output),
      el("span", { id: "tzv-threshold-help", class: "tzv-hint" },
        "Click a head to toggle it, double-click (or Shift+click) to show it alone. Hover a token to see its lines; click to pin, Shift+click for a range."),
    ),
    el("div", { class: "tzv-headlayout" }, scroller, readout),
  );

  const gHeadings = svg.append("g").attr("class", "hv-headings");
  const gNotes = svg.append("g").attr("class", "hv-notes");
  const gStripes = svg.append("g").attr("class", "hv-stripes");
  const gLines = svg.append("g").attr("class", "hv-lines");
  const gQueries = svg.append("g").attr("class", "hv-col hv-queries");
  const gKeys = svg.append("g").attr("class", "hv-col hv-keys");

  // -- head chips ------------------------------------------------------------------------

  function toggleHead(h, isolate) {
    const state = store.get();
    const info = meta.stacks[state.stack];
    if (isolate) return navigate({ heads: [h] }, false);
    const current = new Set(selectedHeads(state, info.n_heads));
    current.has(h) ? current.delete(h) : current.add(h);
    navigate({ heads: [...current] }, false);
  }

  function renderChips(state, colors) {
    const info = meta.stacks[state.stack];
    const selected = new Set(selectedHeads(state, info.n_heads));
    d3.select(chips)
      .selectAll("button")
      .data(d3.range(info.n_heads), (h) => h)
      .join((enter) =>
        enter.append("button").attr("type", "button").attr("class", "tzv-chip")
          .on("click", (event, h) => toggleHead(h, event.shiftKey))
          .on("dblclick", (event, h) => toggleHead(h, true)),
      )
      .style("--chip", (h) => colors[h])
      .attr("aria-pressed", (h) => String(selected.has(h)))
      .attr("aria-label", (h) => `Head ${h}`)
      .attr("title", (h) => `Head ${h}${notes.cellCount(state.stack, state.layer, h) ? ` · ${notes.cellCount(state.stack, state.layer, h)} comment(s)` : ""}`)
      .each(function (h) {
        const count = notes.cellCount(state.stack, state.layer, h);
        this.replaceChildren(String(h), ...(count ? [el("span", { class: "tzv-count", "aria-hidden": "true" }, count)] : []));
      });
  }

  // -- tokens ------------------------------------------------------------------------------

  function drawTokens(state, geo) {
    const { info } = geo;
    svg.attr("width", geo.width).attr("height", geo.height).attr("viewBox", `0 0 ${geo.width} ${geo.height}`)
      .attr("aria-label", `Attention of layer ${state.layer} in the ${state.stack} stack between ${geo.queries.length} query and ${geo.keys.length} key tokens`);
    const [qHeading, kHeading] = headings(state.stack);
    gHeadings.selectAll("text")
      .data([
        { x: geo.marks + geo.left - 6, anchor: "end", text: qHeading },
        { x: geo.x2 + 10, anchor: "start", text: kHeading },
      ])
      .join("text").attr("class", "hv-heading").attr("x", (d) => d.x).attr("y", 16)
      .attr("text-anchor", (d) => d.anchor).text((d) => d.text);

    const column = (g, side, positions, labels, tokens, x, w, anchor, tx) => {
      g.selectAll("g.tok")
        .data(positions, (i) => i)
        .join((enter) => {
          const t = enter.append("g").attr("class", `tok ${side}`);
          t.append("rect").attr("class", "tok-bg");
          t.append("text").attr("dy", "0.35em");
          t.append("title");
          return t;
        })
        .attr("data-i", (i) => i)
        .attr("transform", (i) => `translate(0,${side === "q" ? geo.yq(i) : geo.yk(i)})`)
        .call((t) => t.select("rect").attr("x", x).attr("y", -ROW / 2 + 1).attr("width", w).attr("height", ROW - 2).attr("rx", 3))
        .call((t) => t.select("text").attr("x", tx).attr("text-anchor", anchor).text((i) => labels[i]))
        .call((t) => t.select("title").text((i) => `${side === "q" ? "Query" : "Key"} ${i}: ${displayToken(tokens[i])}`));
    };
    column(gQueries, "q", geo.queries, geo.qLabels, info.query_tokens, geo.marks, geo.left, "end", geo.marks + geo.left - 6);
    column(gKeys, "k", geo.keys, geo.kLabels, info.key_tokens, geo.x2 + 4, geo.right, "start", geo.x2 + 10);
  }

  function markPinned(state) {
    const range = tokenRange(state);
    gQueries.selectAll("g.tok").classed("is-pinned", (i) => range != null && i >= range[0] && i <= range[1]);
    gKeys.selectAll("g.tok").classed("is-pinned", (j) => state.key === j);
  }

  /** The tokens whose lines are shown alone: the hovered one, else the pinned ones. */
  function focus(state) {
    if (hover) return hover;
    const range = tokenRange(state);
    if (range) return { side: "q", index: range[0], end: range[1] };
    if (state.key != null) return { side: "k", index: state.key };
    return null;
  }

  // -- lines and stripes -----------------------------------------------------------------

  function drawLines() {
    if (!drawn) return;
    const { state, layer, geo, colors } = drawn;
    const heads = selectedHeads(state, layer.heads);
    const f = focus(state);
    let groups;
    if (f?.side === "q") {
      const queries = d3.range(f.index, (f.end ?? f.index) + 1).filter((i) => geo.querySet.has(i));
      groups = linePaths(layer, heads, queries, geo.keySet, geo.yq, geo.yk, geo.x1, geo.x2, 0.002);
    } else if (f?.side === "k") {
      const only = new Set([f.index]);
      groups = linePaths(layer, heads, geo.queries, only, geo.yq, geo.yk, geo.x1, geo.x2, 0.002);
    } else {
      groups = linePaths(layer, heads, geo.queries, geo.keySet, geo.yq, geo.yk, geo.x1, geo.x2, Math.max(threshold, 1e-6));
    }
    const width = f ? 2.5 : geo.queries.length > 150 ? 1.25 : 2;
    gLines.selectAll("path")
      .data(groups)
      .join("path")
      .attr("d", (g) => g.d)
      .attr("data-head", (g) => g.head)
      .attr("data-count", (g) => g.count)
      .attr("fill", "none")
      .attr("stroke", (g) => colors[g.head])
      .attr("stroke-opacity", (g) => g.opacity)
      .attr("stroke-width", width)
      .attr("stroke-linecap", "round");
    svg.attr("data-lines", d3.sum(groups, (g) => g.count));
    drawStripes(f);
    updateReadout(f);
  }

  /** On focus, the other column's tokens get one stripe per selected head, as opaque as
   * the weight: who this token attends to (or is attended by), per head. */
  function drawStripes(f) {
    const { state, layer, geo, colors } = drawn;
    const heads = selectedHeads(state, layer.heads);
    const rects = [];
    if (f && heads.length) {
      const side = f.side === "q" ? "k" : "q";
      const positions = side === "k" ? geo.keys : geo.queries;
      const x0 = side === "k" ? geo.x2 + 4 : geo.marks;
      const w = (side === "k" ? geo.right : geo.left) / heads.length;
      const sources = f.side === "q" ? d3.range(f.index, (f.end ?? f.index) + 1) : [f.index];
      for (const p of positions) {
        heads.forEach((h, s) => {
          let v = 0;
          for (const src of sources) v = Math.max(v, f.side === "q" ? layer.value(h, src, p) : layer.value(h, p, src));
          if (v >= 0.01) rects.push({ x: x0 + s * w, y: (side === "k" ? geo.yk(p) : geo.yq(p)) - ROW / 2 + 1, w, h: heads[s], v });
        });
      }
    }
    gStripes.selectAll("rect")
      .data(rects)
      .join("rect")
      .attr("x", (r) => r.x).attr("y", (r) => r.y).attr("width", (r) => r.w).attr("height", ROW - 2)
      .attr("fill", (r) => colors[r.h]).attr("fill-opacity", (r) => Math.min(1, r.v * 0.9 + 0.05));
  }

  function updateReadout(f) {
    const { state, layer, geo, colors } = drawn;
    renderReadout(readout, { heads: selectedHeads(state, layer.heads), layer, geo, colors, focus: f });
  }

  function drawNotes(state, geo) {
    const heads = selectedHeads(state, geo.info.n_heads);
    const ranges = notes.tokenRanges(state.stack, state.layer, heads).filter((r) => geo.querySet.has(r.start));
    const marks = gNotes.selectAll("g.hv-note")
      .data(ranges, (r) => r.id)
      .join((enter) => {
        const g = enter.append("g").attr("class", "hv-note").attr("tabindex", "0").attr("role", "button");
        g.append("rect").attr("class", "hv-note-band");
        g.append("circle").attr("r", 7).attr("cx", 9);
        g.append("text").attr("x", 9).attr("dy", "0.35em").attr("text-anchor", "middle");
        g.on("click", (event, r) => notes.open(r.id));
        g.on("keydown", (event, r) => (event.key === "Enter" || event.key === " ") && notes.open(r.id));
        return g;
      });
    marks.attr("aria-label", (r) => `Comment on tokens ${r.start}–${r.end}: open thread`)
      .attr("transform", (r) => `translate(0,${geo.yq(r.start)})`);
    marks.select("rect").attr("x", geo.marks).attr("y", -ROW / 2)
      .attr("width", geo.left).attr("height", (r) => (Math.min(r.end, geo.info.query_tokens.length - 1) - r.start + 1) * ROW);
    marks.select("text").text((r) => (r.count > 9 ? "9+" : r.count));
  }

  // -- interaction ---------------------------------------------------------------------

  svg.on("pointerover", (event) => {
    const tok = event.target.closest?.("g.tok");
    if (!tok || !drawn) return;
    const next = { side: tok.classList.contains("q") ? "q" : "k", index: Number(tok.dataset.i) };
    if (hover?.side === next.side && hover?.index === next.index) return;
    hover = next;
    drawLines();
  });
  svg.on("pointerleave", () => {
    hover = null;
    drawLines();
  });
  svg.on("click", (event) => {
    const tok = event.target.closest?.("g.tok");
    if (!tok) return;
    const i = Number(tok.dataset.i);
    const state = store.get();
    if (tok.classList.contains("k")) return navigate({ key: state.key === i ? null : i, token: null, tokenEnd: null }, false);
    if (event.shiftKey && state.token != null) {
      const [a, b] = [Math.min(state.token, i), Math.max(state.token, i)];
      return navigate({ token: a, tokenEnd: b, key: null }, false);
    }
    const same = state.token === i && state.tokenEnd == null;
    navigate({ token: same ? null : i, tokenEnd: null, key: null }, false);
  });
  scroller.addEventListener("keydown", (event) => {
    const state = store.get();
    const info = meta.stacks[state.stack];
    const { queries } = drawn?.geo ?? filterPositions(state.filter, info.query_tokens.length, info.key_tokens.length, meta.sentence_b_start);
    const at = state.token == null ? -1 : queries.indexOf(state.token);
    let next = null;
    if (event.key === "ArrowDown") next = queries[Math.min(queries.length - 1, at + 1)];
    else if (event.key === "ArrowUp") next = queries[Math.max(0, at - 1)];
    else if (event.key === "Home") next = queries[0];
    else if (event.key === "End") next = queries[queries.length - 1];
    else if (event.key === "Escape") return navigate({ token: null, tokenEnd: null, key: null }, false);
    else return;
    event.preventDefault();
    navigate({ token: next, tokenEnd: null, key: null }, false);
    if (!drawn) return;
    const y = drawn.geo.yq(next);
    if (y < scroller.scrollTop + ROW || y > scroller.scrollTop + scroller.clientHeight - ROW) scroller.scrollTop = y - scroller.clientHeight / 2;
  });

  // -- render ----------------------------------------------------------------------------

  /** Draw `state`; only the selected layer is loaded. */
  async function render(state) {
    const mine = ++ticket;
    const colors = headColors(meta.stacks[state.stack].n_heads, themeColors().dark);
    renderChips(state, colors);
    panel.classList.add("is-loading");
    let layer;
    try {
      layer = await source.attention(state.stack, state.layer);
    } catch (error) {
      if (mine === ticket) {
        panel.classList.remove("is-loading");
        status(String(error.message || error));
      }
      return;
    }
    if (mine !== ticket) return;
    panel.classList.remove("is-loading");
    display.value = state.display;
    const asMatrix = state.display === "matrix";
    svg.style("display", asMatrix ? "none" : null);
    matrix.style("display", asMatrix ? null : "none");
    slider.closest("label").hidden = asMatrix;
    if (asMatrix) return renderMatrix(state, layer, colors);
    const key = `${state.stack}|${state.filter}|${layer.tq}|${layer.tk}`;
    const geo = drawn?.key === key ? drawn.geo : headLayout(meta, state, layer, notes.enabled);
    if (drawn?.key !== key) drawTokens(state, geo);
    drawn = { key, state, layer, geo, colors };
    svg.attr("data-layer", state.layer).attr("data-stack", state.stack);
    markPinned(state);
    drawNotes(state, geo);
    drawLines();
  }

  /** The heat-map display: one matrix per selected head; hovering reads a weight. */
  function renderMatrix(state, layer, colors) {
    const heads = selectedHeads(state, layer.heads);
    const info = meta.stacks[state.stack];
    const { queries, keys } = filterPositions(state.filter, layer.tq, layer.tk, meta.sentence_b_start);
    drawn = null; // the lines display redraws from scratch when it comes back
    matrix.attr("data-layer", state.layer).attr("data-heads", heads.join(","))
      .attr("aria-label", `Attention matrices of layer ${state.layer}, heads ${heads.join(", ")}`);
    drawHeadMatrices(matrix, {
      layer, heads, colors, info, queries, keys, pinned: tokenRange(state),
      width: Math.max(320, scroller.parentElement.clientWidth - 300),
      onHover: (h, i, j) => {
        if (h == null) return;
        readout.replaceChildren(el("p", {},
          el("span", { class: "tzv-swatch", style: `background:${colors[h]}` }),
          el("strong", {}, `Head ${h}: `),
          `query ${i} “${displayToken(info.query_tokens[i])}” → key ${j} “${displayToken(info.key_tokens[j])}”: ${fmt(layer.value(h, i, j), 4)}`));
      },
      onPick: (i) => navigate({ token: store.get().token === i ? null : i, tokenEnd: null, key: null }, false),
    });
    if (!heads.length) readout.replaceChildren(el("p", {}, "No head selected: click a head above."));
    else readout.replaceChildren(el("p", { class: "tzv-hint" }, "Each square is one weight: rows are queries, columns keys; darker means more attention. Hover to read a value, click to pin a query."));
  }

  return {
    render,
    /** Redraw with the current theme's colours. */
    refresh: () => {
      drawn = null;
      return render(store.get());
    },
    exportTarget: () => ({
      svg: store.get().display === "matrix" ? matrix.node() : svg.node(),
      name: `head-${store.get().stack}-layer${store.get().layer}`,
    }),
  };
}
