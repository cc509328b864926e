// Tiny DOM helpers for the token wheel and the lens page. Text always goes in as text nodes: token texts,
// prompts and server messages can never become markup.

/**
 * Create an element: `el("button", { type: "button", class: "x", onclick: fn }, "Label")`.
 * Attributes starting with "on" become listeners; `null`/`false` attributes are skipped;
 * children are nodes or strings (inserted as text).
 * @param {string} tag
 * @param {Record<string, any>} [attrs]
 * @param {...(Node | string | number | null | undefined | false)} children
 * @returns {HTMLElement}
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    // Through CSSOM: the Content-Security-Policy allows no style attributes.
    else if (name === "style") node.style.cssText = String(value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Remove every child of `node`; returns `node`. */
export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

/**
 * Show `message` in `node` (as text) and unhide it; an empty message hides it.
 * @param {HTMLElement | null} node
 * @param {string | null | undefined} message
 */
export function say(node, message) {
  if (!node) return;
  node.textContent = message || "";
  node.hidden = !message;
}

/** True when the user asked the system for less motion. */
export function prefersReducedMotion() {
  return Boolean(window.matchMedia?.("(prefers-reduced-motion: reduce)").matches);
}
