// The explanation table of a verbalize run: one row per token position, in position
// order, added as the server streams them and replaced by the final result. Every
// token and explanation goes in as text.

import { clear, el } from "tzoo/wheel/dom.js"; // the wheel's text-only DOM helpers
import { nats, percent, spokenToken, visibleToken } from "tzoo/lens/format.js";

/**
 * One table row of a ROW {position, token, explanation, kl, entropy, lens_top}.
 * @returns {HTMLTableRowElement}
 */
export function rowElement(row) {
  const lens = (row.lens_top || []).map(([token, p]) =>
    el("li", {}, el("span", { class: "lens-token" }, visibleToken(token)), " ", el("span", { class: "muted" }, percent(p))));
  const explanation = String(row.explanation ?? "");
  return /** @type {HTMLTableRowElement} */ (el("tr", { dataset: { position: String(row.position) } },
    el("td", { class: "num" }, String(row.position)),
    el("th", { scope: "row", "aria-label": `position ${row.position}, ${spokenToken(row.token)}` },
      el("span", { class: "lens-token lens-chip" }, visibleToken(row.token))),
    el("td", { class: `lens-explanation${explanation ? "" : " is-empty"}` }, explanation || "(nothing)"),
    el("td", { class: "num" }, nats(row.kl)),
    el("td", { class: "num" }, nats(row.entropy)),
    el("td", {}, el("ol", { class: "lens-lens-top", "aria-label": "logit lens top tokens" }, ...lens))));
}

/**
 * Keep the rows of `tbody` in position order, one per position.
 * @param {HTMLTableSectionElement} tbody
 */
export function createExplainTable(tbody) {
  /** @type {Map<number, HTMLTableRowElement>} */
  const byPosition = new Map();
  /** @type {number[]} the positions shown, ascending */
  const order = [];

  /** Where `position` goes in `order` (binary search). */
  function slot(position) {
    let lo = 0;
    let hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (order[mid] < position) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  function put(row) {
    const next = rowElement(row);
    const old = byPosition.get(row.position);
    if (old) {
      old.replaceWith(next);
    } else {
      const at = slot(row.position);
      tbody.insertBefore(next, at < order.length ? byPosition.get(order[at]) : null);
      order.splice(at, 0, row.position);
    }
    byPosition.set(row.position, next);
  }

  return {
    /** Empty the table. */
    reset() {
      byPosition.clear();
      order.length = 0;
      clear(tbody);
    },
    /** Add (or update) streamed rows. */
    add(rows) {
      for (const row of rows || []) put(row);
    },
    /** The final rows: exactly these, in position order. */
    replace(rows) {
      this.reset();
      this.add(rows);
    },
    get count() {
      return byPosition.size;
    },
  };
}
