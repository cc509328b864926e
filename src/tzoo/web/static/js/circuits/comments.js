// Comments on a graph, through the annotations API the attention explorer uses
// (/api/visualizations/{slug}/annotations works for any stored artefact): a comment is
// anchored to the selected node's layer and token position, or to the whole graph.
// Authors and bodies are inserted as text only.

import { ApiError, errorDetail, getJSON, postJSON } from "tzoo/circuits/api.js";
import { el, clear, displayToken } from "tzoo/circuits/dom.js";

function anchorLabel(comment, info) {
  const parts = [];
  if (comment.layer != null) parts.push(`layer ${comment.layer}`);
  if (comment.token_start != null) {
    const token = info.prompt_tokens[comment.token_start] ?? "";
    parts.push(`position ${comment.token_start} “${displayToken(token)}”`);
  }
  return parts.length ? parts.join(" · ") : "the whole graph";
}

/**
 * @param {HTMLElement} root the page root
 * @param {{ slug: string, info: any, selected: () => any }} deps
 */
export function createComments(root, { slug, info, selected }) {
  const list = root.querySelector("#cg-comments-list");
  const form = root.querySelector("#cg-comment-form");
  const text = root.querySelector("#cg-comment-body");
  const anchor = root.querySelector("#cg-comment-anchor");
  const status = root.querySelector("#cg-comment-status");
  const url = `/api/visualizations/${encodeURIComponent(slug)}/annotations`;
  const canWrite = Boolean(root.dataset.user);
  form.hidden = !canWrite;
  root.querySelector("#cg-comment-login").hidden = canWrite;

  function anchorOf(node) {
    if (!node) return {};
    const at = { token_start: node.position, token_end: node.position };
    return node.layer != null ? { layer: node.layer, ...at } : at;
  }

  function updateAnchor() {
    const node = selected();
    anchor.textContent = node
      ? `On ${anchorLabel(anchorOf(node), info)} (the selected node).`
      : "On the whole graph (select a node to comment on its layer and position).";
  }

  async function load() {
    try {
      const comments = await getJSON(url);
      clear(list);
      if (!comments.length) list.append(el("li", { class: "muted", text: "No comments yet." }));
      for (const comment of comments) {
        const item = el("li", { class: "cg-comment", "data-id": String(comment.id) },
          el("p", { class: "cg-comment-meta muted" },
            el("strong", { text: comment.deleted ? "deleted" : comment.author || "" }),
            ` on ${anchorLabel(comment, info)} · ${new Date(comment.created_at).toLocaleString()}`),
          el("p", { class: "cg-comment-body", text: comment.body }));
        if (comment.can_edit) {
          item.append(el("button", {
            type: "button", class: "cg-small", text: "Delete",
            onclick: () => remove(comment.id),
          }));
        }
        list.append(item);
      }
    } catch (failure) {
      status.textContent = `Comments could not be loaded: ${failure.message || failure}`;
    }
  }

  async function remove(id) {
    const token = document.querySelector('meta[name="csrf-token"]')?.getAttribute("content");
    const response = await fetch(`/api/annotations/${id}`, {
      method: "DELETE",
      headers: token ? { "X-CSRF-Token": token } : {},
      credentials: "same-origin",
    });
    if (!response.ok) status.textContent = await errorDetail(response);
    await load();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = text.value.trim();
    if (!body) {
      status.textContent = "Write something first.";
      text.focus();
      return;
    }
    try {
      await postJSON(url, { body, ...anchorOf(selected()) });
      text.value = "";
      status.textContent = "Posted.";
      await load();
    } catch (failure) {
      status.textContent = failure instanceof ApiError ? failure.message : String(failure);
    }
  });

  updateAnchor();
  load();
  return { updateAnchor };
}
