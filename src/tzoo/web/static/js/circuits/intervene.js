// The intervention panel: scale (or set) the selected feature at its position and show
// the top next-token predictions at the graph's target position before and after.

import { postJSON } from "tzoo/circuits/api.js";
import { el, clear, displayToken, fmt, percent } from "tzoo/circuits/dom.js";

/**
 * @param {HTMLElement} root the #cg-intervene section
 * @param {string} api the graph's API URL
 */
export function createInterventions(root, api) {
  const form = root.querySelector("#cg-intervene-form");
  const target = root.querySelector("#cg-intervene-target");
  const amount = root.querySelector("#cg-intervene-amount");
  const result = root.querySelector("#cg-intervene-result");
  const status = root.querySelector("#cg-intervene-status");
  const run = root.querySelector("#cg-intervene-run");
  let node = null;

  function show(selected) {
    node = selected && selected.kind === "feature" ? selected : null;
    root.hidden = !node;
    clear(result);
    status.textContent = "";
    if (node) {
      target.textContent = `Feature ${node.feature} of layer ${node.layer} at position ${node.position} “${displayToken(node.text)}” (activation ${fmt(node.activation)})`;
    }
  }

  function table(response) {
    const rows = Math.max(response.top_before.length, response.top_after.length);
    const body = el("tbody");
    for (let k = 0; k < rows; k++) {
      const before = response.top_before[k];
      const after = response.top_after[k];
      body.append(el("tr", {},
        el("td", { class: "num", text: String(k + 1) }),
        el("td", {}, before ? el("span", { class: "cg-token", text: displayToken(before.token) }) : ""),
        el("td", { class: "num", text: before ? percent(before.probability) : "" }),
        el("td", {}, after ? el("span", { class: "cg-token", text: displayToken(after.token) }) : ""),
        el("td", { class: "num", text: after ? percent(after.probability) : "" })));
    }
    return el("table", { class: "cg-table", id: "cg-intervene-table" },
      el("caption", { text: `Top next tokens at position ${response.position} (${response.mode} mode)` }),
      el("thead", {}, el("tr", {},
        el("th", { scope: "col", class: "num", text: "#" }),
        el("th", { scope: "col", text: "Before" }), el("th", { scope: "col", class: "num", text: "p" }),
        el("th", { scope: "col", text: "After" }), el("th", { scope: "col", class: "num", text: "p" }))),
      body);
  }

  function tracked(response) {
    return el("ul", { class: "cg-tracked" }, response.graph_logits.map((item) => {
      const change = item.probability_after - item.probability_before;
      return el("li", {},
        el("span", { class: "cg-token", text: displayToken(item.token) }), " ",
        el("span", { text: `${percent(item.probability_before)} → ${percent(item.probability_after)}` }), " ",
        el("span", { class: change >= 0 ? "cg-up" : "cg-down", text: `(${change >= 0 ? "+" : ""}${percent(change)})` }));
    }));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!node) return;
    const data = new FormData(form);
    const how = data.get("how") === "value" ? "value" : "scale";
    const number = Number(amount.value);
    if (!Number.isFinite(number)) {
      status.textContent = "Give a number.";
      amount.focus();
      return;
    }
    const item = { layer: node.layer, position: node.position, feature: node.feature, [how]: number };
    run.disabled = true;
    status.textContent = "Running…";
    clear(result);
    try {
      const response = await postJSON(`${api}/interventions`, {
        interventions: [item],
        mode: String(data.get("mode") || "frozen"),
      });
      status.textContent = "";
      result.append(table(response), el("h4", { text: "The graph's output tokens" }), tracked(response));
    } catch (failure) {
      status.textContent = failure.message || String(failure);
    } finally {
      run.disabled = false;
    }
  });

  return { show };
}
