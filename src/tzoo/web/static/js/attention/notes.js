// Comments on a visualization, optionally anchored to (stack, layer, head, token range).
// The panel lists threads; the views ask `cellCount`/`layerCount`/`tokenRanges` to draw
// markers where comments point, and call `open(id)` when a marker is clicked.
//
// Every author and body is inserted as text (dom.el), never as markup.

import { errorDetail } from "tzoo/attention/data.js";
import { clear, el } from "tzoo/attention/dom.js";
import { selectedHeads, tokenRange } from "tzoo/attention/state.js";
import { displayToken } from "tzoo/attention/tokens.js";

/** A notes object for read-only pages (standalone exports): no markers, no panel. */
export function noNotes() {
  return {
    enabled: false,
    version: () => "0",
    cellCount: () => 0,
    layerCount: () => 0,
    tokenRanges: () => [],
    firstThread: () => null,
    open: () => {},
    onChange: () => {},
    load: async () => {},
  };
}

/** A short description of an anchor: "decoder · layer 3 · head 2 · tokens 4–6". */
export function anchorLabel(anchor, meta) {
  const parts = [];
  if (anchor.stack && Object.keys(meta.stacks).length > 1) parts.push(anchor.stack);
  if (anchor.layer != null) parts.push(`layer ${anchor.layer}`);
  if (anchor.head != null) parts.push(`head ${anchor.head}`);
  if (anchor.token_start != null) {
    const tokens = meta.stacks[anchor.stack || Object.keys(meta.stacks)[0]]?.query_tokens || [];
    const end = anchor.token_end ?? anchor.token_start;
    const words = tokens.slice(anchor.token_start, end + 1).map(displayToken).join("");
    parts.push(end !== anchor.token_start ? `tokens ${anchor.token_start}–${end} “${words}”` : `token ${anchor.token_start} “${words}”`);
  }
  return parts.join(" · ");
}

/**
 * @param {{ root: HTMLElement, meta: any, store: any,
 *           navigate: (patch: object, push?: boolean) => void }} deps
 */
export function createNotes({ root, meta, store, navigate }) {
  const panel = root.querySelector("#tzv-notes");
  const toggle = root.querySelector("#tzv-notes-toggle");
  const commentButton = root.querySelector("#tzv-comment");
  if (!panel) return noNotes();
  const slug = meta.slug || root.dataset.slug;
  const api = (root.dataset.api || "/api").replace(/\/$/, "");
  const csrf = document.querySelector('meta[name="csrf-token"]')?.getAttribute("content") || null;
  // Anonymous pages carry a CSRF token too (for the log-in form): who may comment is
  // the logged-in user the page names in data-user.
  const canWrite = Boolean(csrf) && (root.dataset.user === undefined || root.dataset.user !== "");
  /** @type {any[]} */
  let items = [];
  let version = 0;
  const listeners = new Set();

  const list = panel.querySelector("#tzv-notes-list");
  const compose = panel.querySelector("#tzv-notes-compose");
  const alert = panel.querySelector("#tzv-notes-alert");

  // -- talking to the server ---------------------------------------------------------

  async function call(method, url, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (csrf) headers["X-CSRF-Token"] = csrf;
    const response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "same-origin" });
    if (!response.ok) throw new Error(await errorDetail(response));
    return response.status === 204 ? null : response.json();
  }

  function report(error) {
    alert.textContent = error ? String(error.message || error) : "";
    alert.hidden = !error;
  }

  async function load() {
    try {
      items = await call("GET", `${api}/visualizations/${encodeURIComponent(slug)}/annotations`);
      report(null);
    } catch (error) {
      report(error);
      items = [];
    }
    changed();
  }

  function changed() {
    version++;
    renderList();
    const live = items.filter((c) => !c.deleted).length;
    if (toggle) toggle.textContent = live ? `Comments (${live})` : "Comments";
    for (const listener of listeners) listener();
  }

  // -- markers for the views -------------------------------------------------------------

  const threads = () => items.filter((c) => c.parent_id == null && !c.deleted);
  const stackOf = (c) => c.stack || Object.keys(meta.stacks)[0];
  const repliesOf = (id) => items.filter((c) => c.parent_id === id && !c.deleted).length;

  function cellCount(stack, layer, head) {
    return threads().filter((c) => stackOf(c) === stack && c.layer === layer && c.head === head).length;
  }
  function layerCount(stack, layer) {
    return threads().filter((c) => stackOf(c) === stack && c.layer === layer).length;
  }
  function firstThread(stack, layer, head) {
    return threads().find((c) => stackOf(c) === stack && c.layer === layer && c.head === head)?.id ?? null;
  }
  /** Token-anchored threads on this layer and on one of `heads` (or on no head). */
  function tokenRanges(stack, layer, heads) {
    const wanted = new Set(heads);
    return threads()
      .filter((c) => c.token_start != null && stackOf(c) === stack && (c.layer == null || c.layer === layer) && (c.head == null || wanted.has(c.head)))
      .map((c) => ({ id: c.id, start: c.token_start, end: c.token_end ?? c.token_start, count: 1 + repliesOf(c.id) }));
  }

  // -- the panel ---------------------------------------------------------------------------

  function show(open) {
    panel.hidden = !open;
    root.classList.toggle("has-notes", open);
    toggle?.setAttribute("aria-expanded", String(open));
  }

  /** Open the panel on comment `id`, scrolled into view and briefly highlighted. */
  function open(id) {
    show(true);
    const node = id == null ? null : list.querySelector(`[data-comment="${CSS.escape(String(id))}"]`);
    if (node) {
      node.scrollIntoView({ block: "nearest" });
      node.classList.add("is-flash");
      setTimeout(() => node.classList.remove("is-flash"), 1500);
      node.focus({ preventScroll: true });
    }
  }

  /** The anchor of "Comment on this": the current stack, layer, head, tokens. */
  function currentAnchor() {
    const state = store.get();
    const anchor = { stack: state.stack };
    if (state.view === "head" || state.view === "neuron") {
      anchor.layer = state.layer;
      const heads = state.view === "neuron" ? [state.head] : selectedHeads(state, meta.stacks[state.stack].n_heads);
      if (heads.length === 1) anchor.head = heads[0];
      const range = tokenRange(state);
      if (range) {
        anchor.token_start = range[0];
        anchor.token_end = range[1];
      }
    }
    return anchor;
  }

  function goTo(c) {
    const patch = { stack: stackOf(c), view: "head", token: c.token_start ?? null, tokenEnd: c.token_end ?? null, key: null };
    if (c.layer != null) patch.layer = c.layer;
    patch.heads = c.head != null ? [c.head] : null;
    navigate(patch, true);
  }

  function editor({ initial = "", label, submit, onCancel }) {
    const textarea = el("textarea", { rows: "3", maxlength: "10000", "aria-label": label, required: true });
    textarea.value = initial;
    const button = el("button", { type: "submit" }, label);
    const form = el("form", { class: "tzv-editor" }, textarea, el("div", { class: "tzv-editor-actions" }, button,
      onCancel ? el("button", { type: "button", class: "tzv-secondary", onclick: onCancel }, "Cancel") : null));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!textarea.value.trim()) return textarea.focus();
      button.disabled = true;
      try {
        await submit(textarea.value);
        report(null);
      } catch (error) {
        report(error);
      } finally {
        button.disabled = false;
      }
    });
    return { form, textarea };
  }

  let anchorChoice = true;
  function renderCompose() {
    clear(compose);
    if (!canWrite) {
      const next = encodeURIComponent(location.pathname);
      compose.append(el("p", { class: "tzv-login" }, el("a", { href: `/login?next=${next}` }, "Log in to comment")));
      return;
    }
    const anchorText = el("span", { class: "tzv-anchor-text" });
    const box = el("input", { type: "checkbox", id: "tzv-anchor-box", onchange: () => (anchorChoice = box.checked) });
    box.checked = anchorChoice;
    const refreshAnchor = () => (anchorText.textContent = anchorLabel(currentAnchor(), meta) || "the whole visualization");
    refreshAnchor();
    store.subscribe(refreshAnchor);
    const { form, textarea } = editor({
      label: "Post",
      submit: async (body) => {
        const payload = { body, ...(anchorChoice ? currentAnchor() : {}) };
        await call("POST", `${api}/visualizations/${encodeURIComponent(slug)}/annotations`, payload);
        textarea.value = "";
        await load();
      },
    });
    textarea.id = "tzv-notes-body";
    textarea.setAttribute("placeholder", "What do you see here?");
    compose.append(el("label", { class: "tzv-anchor" }, box, "Attach to what the view shows:"), anchorText, form);
  }

  function commentNode(c, replies) {
    const node = el("li", { class: `tzv-comment${c.deleted ? " is-deleted" : ""}`, tabindex: "-1", dataset: { comment: c.id } });
    const when = c.created_at ? new Date(c.created_at) : null;
    node.append(el("div", { class: "tzv-comment-head" },
      el("strong", {}, c.deleted ? "—" : c.author || "anonymous"),
      when ? el("time", { datetime: c.created_at, class: "muted" }, when.toLocaleString()) : null,
      c.updated_at && c.updated_at !== c.created_at && !c.deleted ? el("span", { class: "muted" }, "(edited)") : null));
    const anchor = anchorLabel(c, meta);
    if (c.parent_id == null && anchor && !c.deleted) {
      node.append(el("button", { type: "button", class: "tzv-anchor-link", onclick: () => goTo(c), title: "Show this in the view" }, `↳ ${anchor}`));
    }
    const body = el("p", { class: "tzv-comment-body" }, c.deleted ? "This comment was deleted." : c.body);
    node.append(body);
    const actions = el("div", { class: "tzv-comment-actions" });
    if (!c.deleted && canWrite && c.parent_id == null) {
      actions.append(el("button", { type: "button", class: "link-button", onclick: () => {
        const { form, textarea } = editor({
          label: "Reply",
          submit: async (text) => {
            await call("POST", `${api}/visualizations/${encodeURIComponent(slug)}/annotations`, { body: text, parent_id: c.id });
            await load();
          },
          onCancel: () => form.remove(),
        });
        node.append(form);
        textarea.focus();
      } }, "Reply"));
    }
    if (!c.deleted && c.can_edit) {
      actions.append(el("button", { type: "button", class: "link-button", onclick: () => {
        const { form, textarea } = editor({
          initial: c.body,
          label: "Save",
          submit: async (text) => {
            await call("PATCH", `${api}/annotations/${encodeURIComponent(c.id)}`, { body: text });
            await load();
          },
          onCancel: () => form.replaceWith(body),
        });
        body.replaceWith(form);
        textarea.focus();
      } }, "Edit"));
      actions.append(el("button", { type: "button", class: "link-button tzv-danger", onclick: async () => {
        if (!window.confirm("Delete this comment?")) return;
        try {
          await call("DELETE", `${api}/annotations/${encodeURIComponent(c.id)}`);
          await load();
        } catch (error) {
          report(error);
        }
      } }, "Delete"));
    }
    if (actions.childNodes.length) node.append(actions);
    if (replies.length) node.append(el("ol", { class: "tzv-replies" }, ...replies.map((r) => commentNode(r, []))));
    return node;
  }

  function renderList() {
    clear(list);
    const top = items.filter((c) => c.parent_id == null);
    const visible = top.filter((c) => !c.deleted || items.some((r) => r.parent_id === c.id && !r.deleted));
    if (!visible.length) {
      list.append(el("li", { class: "tzv-empty" }, "No comments yet."));
      return;
    }
    const byTime = (a, b) => String(a.created_at).localeCompare(String(b.created_at));
    for (const c of visible.sort(byTime)) {
      list.append(commentNode(c, items.filter((r) => r.parent_id === c.id).sort(byTime)));
    }
  }

  toggle?.addEventListener("click", () => show(panel.hidden));
  panel.querySelector("#tzv-notes-close")?.addEventListener("click", () => show(false));
  commentButton?.addEventListener("click", () => {
    show(true);
    anchorChoice = true;
    const box = panel.querySelector("#tzv-anchor-box");
    if (box) box.checked = true;
    (panel.querySelector("#tzv-notes-body") || panel.querySelector(".tzv-login a"))?.focus();
  });
  renderCompose();

  return {
    enabled: true,
    version: () => String(version),
    cellCount,
    layerCount,
    tokenRanges,
    firstThread,
    open,
    onChange: (listener) => listeners.add(listener),
    load,
  };
}
