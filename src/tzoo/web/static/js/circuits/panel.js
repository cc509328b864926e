// The side panel for the selected node: what it is, its strongest visible links (each a
// button that selects the node at the other end), a pin button, and for a feature its
// dashboard, fetched when first asked for and kept for the page's life.

import { getJSON } from "tzoo/circuits/api.js";
import { renderDashboard } from "tzoo/circuits/dashboard_view.js";
import { el, clear, displayToken, fmt, percent } from "tzoo/circuits/dom.js";
import { shortName } from "tzoo/circuits/model.js";

const LINKS_SHOWN = 8;

function nodeTitle(node) {
  const token = `“${displayToken(node.text)}”`;
  if (node.kind === "feature") return `Feature ${node.feature} · layer ${node.layer} · ${token} (position ${node.position})`;
  if (node.kind === "error") return `Error · layer ${node.layer} · ${token} (position ${node.position})`;
  if (node.kind === "token") return `Embedding · ${token} (position ${node.position})`;
  return `Logit ${token} · p = ${fmt(node.probability)}`;
}

/**
 * @param {HTMLElement} root the page root
 * @param {{ api: string, onSelect: (id: string) => void, onTogglePin: (id: string) => void }} deps
 */
export function createNodePanel(root, { api, onSelect, onTogglePin }) {
  const empty = root.querySelector("#cg-node-empty");
  const details = root.querySelector("#cg-node-details");
  const title = root.querySelector("#cg-node-title");
  const facts = root.querySelector("#cg-node-facts");
  const pin = root.querySelector("#cg-pin");
  const incoming = root.querySelector("#cg-node-in");
  const outgoing = root.querySelector("#cg-node-out");
  const section = root.querySelector("#cg-dashboard");
  const body = root.querySelector("#cg-dashboard-body");
  const status = root.querySelector("#cg-dashboard-status");
  const cache = new Map();
  let current = null;
  let controller = null;

  pin.addEventListener("click", () => current && onTogglePin(current.id));

  function linkList(list, links, end) {
    clear(list);
    const shown = links.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, LINKS_SHOWN);
    if (!shown.length) {
      list.append(el("li", { class: "muted", text: "None shown at these thresholds." }));
      return;
    }
    for (const link of shown) {
      const other = link[end];
      list.append(el("li", {},
        el("button", { type: "button", class: "cg-link-button", onclick: () => onSelect(other.id) },
          el("span", { text: shortName(other) }), " ",
          el("span", { class: "cg-token", text: `“${displayToken(other.text)}”@${other.position}` })),
        " ",
        el("span", { class: link.weight >= 0 ? "cg-up" : "cg-down", text: fmt(link.weight) })));
    }
  }

  async function loadDashboard(node) {
    const key = `${node.layer}/${node.feature}`;
    controller?.abort();
    clear(body);
    section.hidden = false;
    section.dataset.feature = key;
    if (cache.has(key)) {
      status.textContent = "";
      body.append(renderDashboard(cache.get(key)));
      section.dataset.state = "ready";
      return;
    }
    status.textContent = "Building the dashboard over the corpus…";
    section.dataset.state = "loading";
    controller = new AbortController();
    try {
      const dashboard = await getJSON(`${api}/features/${node.layer}/${node.feature}`, { signal: controller.signal });
      cache.set(key, dashboard);
      if (current !== node) return;
      status.textContent = "";
      body.append(renderDashboard(dashboard));
      section.dataset.state = "ready";
    } catch (failure) {
      if (failure.name === "AbortError") return;
      status.textContent = failure.message || String(failure);
      section.dataset.state = "error";
    }
  }

  /** Show ``node`` (null: nothing selected) with its links among ``keep``. */
  function show(node, keep, pinned) {
    current = node;
    empty.hidden = Boolean(node);
    details.hidden = !node;
    if (!node) {
      controller?.abort();
      section.hidden = true;
      return;
    }
    title.textContent = nodeTitle(node);
    clear(facts);
    const add = (term, value) => facts.append(el("dt", { text: term }), el("dd", { text: value }));
    add("Node id", node.id);
    if (node.kind === "feature") add("Activation", fmt(node.activation));
    if (node.kind === "logit") add("Probability", percent(node.probability));
    if (node.influence != null) add("Influence (cumulative)", fmt(node.influence));
    if (node.kind === "feature" || node.kind === "error") add("Kept below node threshold", fmt(node.share));
    if (node.clerp) add("Label", node.clerp);
    pin.textContent = pinned.has(node.id) ? "Unpin" : "Pin";
    pin.setAttribute("aria-pressed", String(pinned.has(node.id)));
    linkList(incoming, node.incoming.filter((l) => keep.links[l.i]), "source");
    linkList(outgoing, node.outgoing.filter((l) => keep.links[l.i]), "target");
    if (node.kind === "feature") loadDashboard(node);
    else {
      controller?.abort();
      section.hidden = true;
    }
  }

  return { show };
}
