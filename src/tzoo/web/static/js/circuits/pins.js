// Pinned nodes and supernodes (named groups of pinned nodes): tick pinned nodes, name
// the group, "Group"; a supernode's "Ungroup" dissolves it (its nodes stay pinned).

import { el, clear, displayToken } from "tzoo/circuits/dom.js";
import { shortName } from "tzoo/circuits/model.js";

/**
 * @param {HTMLElement} root the page root
 * @param {{ state: any, graph: () => any, onChange: () => void, onSelect: (id: string) => void }} deps
 */
export function createPins(root, { state, graph, onChange, onSelect }) {
  const list = root.querySelector("#cg-pinned");
  const empty = root.querySelector("#cg-pinned-empty");
  const form = root.querySelector("#cg-group-form");
  const name = root.querySelector("#cg-group-name");
  const error = root.querySelector("#cg-group-error");
  const groups = root.querySelector("#cg-supernodes");
  const ticked = new Set();

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const label = name.value.trim();
    const members = [...ticked].filter((id) => state.pinned.has(id));
    if (!label) {
      error.textContent = "Name the supernode.";
      name.focus();
      return;
    }
    if (!members.length) {
      error.textContent = "Tick the pinned nodes to group first.";
      return;
    }
    error.textContent = "";
    state.supernodes.push({ name: label, nodes: members });
    ticked.clear();
    name.value = "";
    onChange();
  });

  function label(id) {
    const node = graph().byId.get(id);
    return node ? `${shortName(node)} “${displayToken(node.text)}”@${node.position}` : id;
  }

  function render() {
    clear(list);
    empty.hidden = state.pinned.size > 0;
    form.hidden = state.pinned.size === 0;
    for (const id of state.pinned) {
      const box = el("input", { type: "checkbox", "aria-label": `Group ${label(id)}`, "data-id": id });
      box.checked = ticked.has(id);
      box.addEventListener("change", () => (box.checked ? ticked.add(id) : ticked.delete(id)));
      list.append(el("li", { "data-id": id },
        box,
        el("button", { type: "button", class: "cg-link-button", onclick: () => onSelect(id), text: label(id) }),
        el("button", {
          type: "button", class: "cg-small", "aria-label": `Unpin ${label(id)}`, text: "Unpin",
          onclick: () => {
            state.pinned.delete(id);
            ticked.delete(id);
            onChange();
          },
        })));
    }
    clear(groups);
    state.supernodes.forEach((group, k) => {
      groups.append(el("li", { "data-name": group.name },
        el("strong", { class: "cg-supernode-name", text: group.name }),
        el("span", { class: "muted", text: ` ${group.nodes.length} node${group.nodes.length === 1 ? "" : "s"}: ` }),
        el("span", { class: "cg-supernode-members", text: group.nodes.map(label).join(", ") }), " ",
        el("button", {
          type: "button", class: "cg-small", text: "Ungroup", "aria-label": `Ungroup ${group.name}`,
          onclick: () => {
            state.supernodes.splice(k, 1);
            onChange();
          },
        })));
    });
  }

  return { render };
}
