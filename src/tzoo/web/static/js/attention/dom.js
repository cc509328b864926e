// Tiny DOM helpers. Text always goes in as text nodes: user text (tokens, comments, model
// names) can never become markup.

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
  append(node, ...children);
  return node;
}

/** Append children (strings become text nodes). */
export function append(node, ...children) {
  for (const child of children) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Remove every child of `node`. */
export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

/** Fill a <select> with `[value, label]` pairs and select `current`. */
export function setOptions(select, options, current) {
  clear(select);
  for (const [value, label] of options) {
    const option = el("option", { value: String(value) }, label);
    if (String(value) === String(current)) option.selected = true;
    select.append(option);
  }
}

/** Format a number with `digits` decimals, or "–" for null/NaN. */
export function fmt(value, digits = 3) {
  return value == null || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
}
