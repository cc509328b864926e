// The probability table: the wheel's segments as rows (token, id, probability, a bar),
// for readers who prefer numbers and for screen readers. On the wheel page each row has
// an "Add" button that appends its token, like clicking its wedge.

import { clear, el } from "tzoo/wheel/dom.js";
import { percent, spokenToken, visibleToken } from "tzoo/wheel/format.js";
import { colourClass } from "tzoo/wheel/wheel_view.js";

/**
 * Fill `tbody` with one row per segment.
 * @param {HTMLTableSectionElement} tbody
 * @param {import("./geometry.js").Segment[]} segments
 * @param {{ highlight?: string | null, onChoose?: ((s: any) => void) | null }} [options]
 */
export function renderTable(tbody, segments, { highlight = null, onChoose = null } = {}) {
  clear(tbody);
  const top = Math.max(...segments.map((s) => s.probability), 1e-9);
  for (const s of segments) {
    const other = s.kind === "other";
    const name = other
      ? el("span", {}, "Other ", el("span", { class: "muted" }, `(${s.count ?? 0} tokens)`))
      : el("span", { class: "wheel-token" }, visibleToken(s.text));
    const bar = el("span", { class: `wheel-bar ${colourClass(s)}`, "aria-hidden": "true" },
      el("span", { class: "wheel-bar-fill", style: `width: ${((100 * s.probability) / top).toFixed(2)}%` }));
    const row = el("tr", { dataset: { key: s.key }, class: s.key === highlight ? "is-chosen" : null },
      el("th", { scope: "row" }, el("span", { class: `wheel-swatch ${colourClass(s)}`, "aria-hidden": "true" }), name),
      el("td", { class: "num" }, other ? "—" : String(s.id)),
      el("td", { class: "num" }, percent(s.probability)),
      el("td", { class: "wheel-bar-cell" }, bar));
    if (onChoose) {
      row.append(el("td", {}, el("button", {
        type: "button", class: "wheel-mini",
        "aria-label": other ? "Add a token drawn from Other" : `Add ${spokenToken(s.text)}`,
        onclick: () => onChoose(s),
      }, "Add")));
    }
    tbody.append(row);
  }
}
