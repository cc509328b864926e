// The graph page (/graph/{slug}[?view=ID]): loads the stored graph, draws it, and keeps
// the view state (thresholds, selected node, pinned nodes, supernodes), which "Save view"
// stores at a permalink that restores it.

import { getJSON, postJSON } from "tzoo/circuits/api.js";
import { el, clear, displayToken, fmt, percent } from "tzoo/circuits/dom.js";
import { createGraphView } from "tzoo/circuits/graph_view.js";
import { createComments } from "tzoo/circuits/comments.js";
import { createExplanations } from "tzoo/circuits/explain.js";
import { createInterventions } from "tzoo/circuits/intervene.js";
import { prepare, visible } from "tzoo/circuits/model.js";
import { createNodePanel } from "tzoo/circuits/panel.js";
import { createPins } from "tzoo/circuits/pins.js";

export async function start() {
  const root = document.getElementById("tzoo-graph");
  if (!root) return;
  const page = JSON.parse(document.getElementById("cg-page")?.textContent || "{}");
  const alert = root.querySelector("#cg-alert");
  const fail = (message) => {
    alert.textContent = message;
    alert.hidden = false;
  };
  let doc;
  try {
    doc = await getJSON(page.view ? `${page.api}?view=${encodeURIComponent(page.view)}` : page.api);
  } catch (failure) {
    fail(`The graph could not be loaded: ${failure.message || failure}`);
    root.dataset.ready = "error";
    return;
  }
  const graph = prepare(doc);
  const { info } = graph;
  const saved = info.view;
  const state = {
    nodeThreshold: saved ? saved.node_threshold : info.node_threshold,
    edgeThreshold: saved ? saved.edge_threshold : info.edge_threshold,
    selected: saved?.selected ?? null,
    pinned: new Set(saved?.pinned || []),
    supernodes: (saved?.supernodes || []).map((s) => ({ name: s.name, nodes: [...s.nodes] })),
    viewId: saved?.id ?? null,
    dirty: false,
  };
  let keep = visible(graph, state.nodeThreshold, state.edgeThreshold);

  describe(root, info);
  const svg = root.querySelector("#cg-svg");
  const view = createGraphView(svg, { onSelect: select, onTogglePin: togglePin });
  const panel = createNodePanel(root, { api: page.api, onSelect: selectAndFocus, onTogglePin: togglePin });
  const pins = createPins(root, { state, graph: () => graph, onChange: changed, onSelect: selectAndFocus });
  const interventions = createInterventions(root.querySelector("#cg-intervene"), page.api);
  const comments = createComments(root, {
    slug: page.slug,
    info,
    selected: () => (state.selected ? graph.byId.get(state.selected) : null),
  });
  createExplanations(root.querySelector("#cg-explain"), {
    page,
    graph,
    onSelect: selectAndFocus,
    opener: root.querySelector("#cg-explain-open"),
  });

  // -- thresholds ---------------------------------------------------------------------
  const sliders = [
    ["#cg-node-slider", "#cg-node-value", "nodeThreshold", info.node_threshold],
    ["#cg-edge-slider", "#cg-edge-value", "edgeThreshold", info.edge_threshold],
  ];
  for (const [sliderSel, outputSel, key, stored] of sliders) {
    const slider = root.querySelector(sliderSel);
    const output = root.querySelector(outputSel);
    // Above the stored threshold nothing more can appear: the graph was pruned there.
    slider.max = String(Math.ceil(stored * 100) / 100);
    slider.value = String(state[key]);
    output.textContent = fmt(state[key], 3);
    slider.addEventListener("input", () => {
      state[key] = Number(slider.value);
      output.textContent = fmt(state[key], 3);
      keep = visible(graph, state.nodeThreshold, state.edgeThreshold);
      redraw();
      changed();
    });
  }

  // -- selection and pins -------------------------------------------------------------
  function select(id) {
    state.selected = id && graph.byId.has(id) ? id : null;
    const node = state.selected ? graph.byId.get(state.selected) : null;
    panel.show(node, keep, state.pinned);
    interventions.show(node);
    comments.updateAnchor();
    view.highlight(state);
    changed();
  }

  function selectAndFocus(id) {
    select(id);
    view.focusNode(id);
  }

  function togglePin(id) {
    if (state.pinned.has(id)) state.pinned.delete(id);
    else state.pinned.add(id);
    changed();
    if (state.selected) panel.show(graph.byId.get(state.selected), keep, state.pinned);
  }

  root.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.selected && !event.target.closest("input, textarea, select")) select(null);
  });

  // -- saving and exporting -------------------------------------------------------------
  const saveButton = root.querySelector("#cg-save-view");
  const viewStatus = root.querySelector("#cg-view-status");
  const permalink = root.querySelector("#cg-permalink");
  const permalinkBox = root.querySelector("#cg-permalink-box");
  const copyButton = root.querySelector("#cg-copy");
  const exportLink = root.querySelector("#cg-export");

  saveButton.addEventListener("click", async () => {
    saveButton.disabled = true;
    viewStatus.textContent = "Saving…";
    try {
      const created = await postJSON(`${page.api}/views`, {
        pinned: [...state.pinned],
        supernodes: state.supernodes,
        node_threshold: state.nodeThreshold,
        edge_threshold: state.edgeThreshold,
        selected: state.selected,
      });
      state.viewId = created.view_id;
      state.dirty = false;
      history.replaceState(null, "", `/graph/${encodeURIComponent(page.slug)}?view=${encodeURIComponent(created.view_id)}`);
      showPermalink(created.url);
      viewStatus.textContent = "Saved: this link restores the view.";
      updateExport();
    } catch (failure) {
      viewStatus.textContent = failure.message || String(failure);
    } finally {
      saveButton.disabled = false;
    }
  });

  copyButton.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(permalink.href);
      viewStatus.textContent = "Link copied.";
    } catch {
      viewStatus.textContent = "Copy the link by hand (the clipboard is not available here).";
    }
  });

  function showPermalink(url) {
    permalink.href = url;
    permalink.textContent = url;
    permalinkBox.hidden = false;
  }

  function updateExport() {
    const query = new URLSearchParams();
    if (state.viewId) query.set("view", state.viewId);
    query.set("node_threshold", String(state.nodeThreshold));
    query.set("edge_threshold", String(state.edgeThreshold));
    exportLink.href = `${page.api}/export?${query}`;
  }

  // -- drawing --------------------------------------------------------------------------
  function normaliseGroups() {
    state.supernodes = state.supernodes
      .map((group) => ({ name: group.name, nodes: group.nodes.filter((id) => state.pinned.has(id)) }))
      .filter((group) => group.nodes.length);
  }

  function changed() {
    normaliseGroups();
    pins.render();
    view.highlight(state);
    state.dirty = true;
    if (state.viewId) viewStatus.textContent = "Changed since the view was saved.";
    updateExport();
  }

  function redraw() {
    view.draw(graph, keep);
    view.highlight(state);
    const nodes = keep.nodes.filter(Boolean).length;
    const links = keep.links.filter(Boolean).length;
    root.querySelector("#cg-counts").textContent = `${nodes} of ${graph.nodes.length} nodes, ${links} of ${graph.links.length} edges shown`;
    root.dataset.nodes = String(nodes);
    root.dataset.links = String(links);
    if (state.selected) panel.show(graph.byId.get(state.selected), keep, state.pinned);
  }

  redraw();
  pins.render();
  if (state.viewId) showPermalink(`${location.origin}/graph/${encodeURIComponent(page.slug)}?view=${encodeURIComponent(state.viewId)}`);
  updateExport();
  if (state.selected) select(state.selected);
  state.dirty = false;
  viewStatus.textContent = state.viewId ? "Showing a saved view." : "";
  root.dataset.ready = "true";
}

function describe(root, info) {
  const facts = root.querySelector("#cg-facts");
  clear(facts);
  const target = info.prompt_tokens[info.target_position] ?? "";
  const top = info.logit_strings.map((token, k) => `${displayToken(token)} ${percent(info.logit_probabilities[k], 0)}`);
  const items = [
    ["Model", info.model_name],
    ["Transcoders", `${info.transcoders.id} (${info.transcoders.kind}, layers ${info.transcoders.layers.join(", ")})`],
    ["Target", `position ${info.target_position} “${displayToken(target)}”`],
    ["Predicted", top.join(", ")],
    ["Replacement score", fmt(info.scores.replacement)],
    ["Completeness score", fmt(info.scores.completeness)],
    ["Stored", `${info.n_nodes} nodes, ${info.n_edges} edges (node threshold ${fmt(info.node_threshold)}, edge ${fmt(info.edge_threshold)}; ${info.n_feature_nodes} of ${info.n_active_features} active features attributed)`],
  ];
  for (const [term, value] of items) facts.append(el("dt", { text: term }), el("dd", { text: value }));
}
