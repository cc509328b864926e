// The graph drawn in SVG: rows of layers, columns of token positions, nodes in their
// cells, links as curves whose width follows |weight| and whose colour its sign.
//
// Keyboard: every node is a focusable button (Tab reaches the first); arrow keys move
// between nodes (left/right within a row, up/down to the nearest node of the next row),
// Enter or Space selects, P pins.

import { displayToken, fmt, svgEl, clear } from "tzoo/circuits/dom.js";
import { layout, rowOf, LEFT, BOTTOM } from "tzoo/circuits/layout.js";
import { shortName } from "tzoo/circuits/model.js";

/** What a screen reader (and the tooltip) says about a node. */
export function describeNode(node) {
  const token = `“${displayToken(node.text)}”`;
  if (node.kind === "feature") {
    return `Feature ${node.feature} of layer ${node.layer} at position ${node.position} ${token}, activation ${fmt(node.activation)}`;
  }
  if (node.kind === "error") return `Reconstruction error of layer ${node.layer} at position ${node.position} ${token}`;
  if (node.kind === "token") return `Embedding of token ${token} at position ${node.position}`;
  return `Logit ${token}, probability ${fmt(node.probability)}`;
}

function linkPath(x1, y1, x2, y2) {
  if (Math.abs(y1 - y2) < 1) {
    const bulge = Math.min(40, Math.abs(x2 - x1) / 3 + 10);
    return `M${x1},${y1} C${x1},${y1 - bulge} ${x2},${y2 - bulge} ${x2},${y2}`;
  }
  const mid = (y1 + y2) / 2;
  return `M${x1},${y1} C${x1},${mid} ${x2},${mid} ${x2},${y2}`;
}

function nodeShape(node) {
  if (node.kind === "feature") return svgEl("circle", { r: 6, class: "cg-shape" });
  if (node.kind === "error") return svgEl("rect", { x: -5.5, y: -5.5, width: 11, height: 11, class: "cg-shape" });
  if (node.kind === "token") return svgEl("rect", { x: -7, y: -5, width: 14, height: 10, rx: 2, class: "cg-shape" });
  return svgEl("rect", { x: -7, y: -5, width: 14, height: 10, rx: 5, class: "cg-shape" });
}

/**
 * @param {SVGSVGElement} svg
 * @param {{ onSelect: (id: string|null) => void, onTogglePin: (id: string) => void }} handlers
 */
export function createGraphView(svg, handlers) {
  let graph = null;
  let positions = null;
  /** @type {Map<string, SVGGElement>} */
  let nodeElements = new Map();
  /** @type {{ el: SVGPathElement, link: any }[]} */
  let linkElements = [];
  let rows = [];

  function draw(prepared, keep) {
    graph = prepared;
    const { info } = graph;
    positions = layout(graph, keep.nodes);
    const { width, height, columns, rowY, nRows } = positions;
    clear(svg);
    svg.setAttribute("width", String(width));
    svg.setAttribute("height", String(height));
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);

    const bands = svgEl("g", { class: "cg-bands", "aria-hidden": "true" });
    for (let row = 0; row < nRows; row++) {
      const y = rowY(row);
      bands.append(svgEl("rect", { x: 0, y: y - 29, width, height: 58, class: row % 2 ? "cg-band odd" : "cg-band" }));
      const label = row === 0 ? "Emb" : row === nRows - 1 ? "Logits" : `L${row - 1}`;
      bands.append(svgEl("text", { x: 10, y: y + 4, class: "cg-row-label", text: label }));
    }
    const target = columns[info.target_position];
    if (target) {
      bands.append(svgEl("rect", { x: target.x, y: 4, width: target.width, height: height - 8, class: "cg-target-column" }));
    }
    const axisY = height - BOTTOM + 20;
    columns.forEach((column, p) => {
      const token = info.prompt_tokens[p] ?? "";
      const maxChars = Math.max(2, Math.floor((column.width - 4) / 7));
      let shown = displayToken(token);
      if (shown.length > maxChars) shown = `${shown.slice(0, maxChars - 1)}…`;
      bands.append(svgEl("g", {},
        svgEl("title", { text: `${p}: ${displayToken(token)}` }),
        svgEl("text", { x: column.x + column.width / 2, y: axisY, class: "cg-token-label", text: shown })));
      bands.append(svgEl("text", { x: column.x + column.width / 2, y: axisY + 16, class: "cg-position-label", text: String(p) }));
    });
    bands.append(svgEl("text", { x: LEFT - 8, y: axisY + 16, class: "cg-position-label cg-axis-note", text: "pos" }));
    svg.append(bands);

    const linkLayer = svgEl("g", { class: "cg-links", "aria-hidden": "true" });
    const shown = graph.links.filter((_, e) => keep.links[e]);
    const maxAbs = shown.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 0) || 1;
    linkElements = shown.map((link) => {
      const s = link.source.i;
      const t = link.target.i;
      const path = svgEl("path", {
        d: linkPath(positions.x[s], positions.y[s], positions.x[t], positions.y[t]),
        class: `cg-link ${link.weight >= 0 ? "positive" : "negative"}`,
        "stroke-width": (0.4 + 4 * Math.sqrt(Math.abs(link.weight) / maxAbs)).toFixed(2),
        "data-source": link.source.id,
        "data-target": link.target.id,
      });
      linkLayer.append(path);
      return { el: path, link };
    });
    svg.append(linkLayer);

    const nodeLayer = svgEl("g", { class: "cg-nodes", role: "group", "aria-label": "Graph nodes" });
    nodeElements = new Map();
    const labels = svgEl("g", { class: "cg-logit-labels", "aria-hidden": "true" });
    graph.nodes.forEach((node, i) => {
      if (!keep.nodes[i]) return;
      const x = positions.x[i];
      const y = positions.y[i];
      const g = svgEl("g", {
        class: `cg-node kind-${node.kind}`,
        transform: `translate(${x},${y})`,
        tabindex: "0",
        role: "button",
        "aria-label": describeNode(node),
        "data-id": node.id,
      }, nodeShape(node), svgEl("circle", { r: 10, class: "cg-ring" }), svgEl("title", { text: describeNode(node) }));
      g.addEventListener("click", () => handlers.onSelect(node.id));
      g.addEventListener("keydown", (event) => onKey(event, node));
      nodeLayer.append(g);
      nodeElements.set(node.id, g);
      if (node.kind === "logit") {
        labels.append(svgEl("text", {
          x: x + 2, y: y - 10, class: "cg-logit-label", transform: `rotate(-40 ${x + 2} ${y - 10})`,
          text: `${displayToken(node.text)} ${fmt(node.probability, 2)}`,
        }));
      }
    });
    svg.append(nodeLayer, labels);

    // Rows of visible nodes in x order, for arrow-key moves.
    rows = [];
    graph.nodes.forEach((node, i) => {
      if (!keep.nodes[i]) return;
      const row = rowOf(node, info.n_layers);
      (rows[row] ||= []).push(node);
    });
    for (const row of rows) row?.sort((a, b) => positions.x[a.i] - positions.x[b.i]);
  }

  function onKey(event, node) {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      handlers.onSelect(node.id);
      return;
    }
    if (event.key === "p" || event.key === "P") {
      event.preventDefault();
      handlers.onTogglePin(node.id);
      return;
    }
    const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [1, 0], ArrowDown: [-1, 0] };
    const move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    const next = neighbour(node, move[0], move[1]);
    if (next) nodeElements.get(next.id)?.focus();
  }

  function neighbour(node, dRow, dCol) {
    const row = rowOf(node, graph.info.n_layers);
    if (dCol) {
      const members = rows[row] || [];
      const k = members.indexOf(node) + dCol;
      return members[k] || null;
    }
    for (let r = row + dRow; r >= 0 && r < rows.length; r += dRow) {
      const members = rows[r];
      if (!members?.length) continue;
      const x = positions.x[node.i];
      return members.reduce((best, n) => (Math.abs(positions.x[n.i] - x) < Math.abs(positions.x[best.i] - x) ? n : best));
    }
    return null;
  }

  /** Mark the selected, pinned and grouped nodes and the selected node's links. */
  function highlight({ selected, pinned, supernodes }) {
    const grouped = new Set(supernodes.flatMap((s) => s.nodes));
    for (const [id, g] of nodeElements) {
      g.classList.toggle("is-selected", id === selected);
      g.classList.toggle("is-pinned", pinned.has(id));
      g.classList.toggle("in-supernode", grouped.has(id));
      g.setAttribute("aria-pressed", String(id === selected));
    }
    svg.classList.toggle("has-selection", Boolean(selected && nodeElements.has(selected)));
    for (const { el, link } of linkElements) {
      el.classList.toggle("is-active", link.source.id === selected || link.target.id === selected);
    }
  }

  function focusNode(id) {
    const g = nodeElements.get(id);
    if (!g) return;
    g.focus({ preventScroll: true });
    g.scrollIntoView?.({ block: "nearest", inline: "nearest" });
  }

  return {
    draw,
    highlight,
    focusNode,
    isShown: (id) => nodeElements.has(id),
    name: shortName,
  };
}
