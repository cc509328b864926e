// The /graph form: pick a model and one of its transcoder sets, type a prompt, compute.
// POST /api/graphs runs the attribution (seconds to minutes) and answers the permanent
// slug; the page then goes there.

import { postJSON } from "tzoo/circuits/api.js";
import { el, clear, fmt } from "tzoo/circuits/dom.js";

export function startForm() {
  const form = document.getElementById("cg-form");
  if (!form) return;
  const sets = JSON.parse(document.getElementById("cg-sets")?.textContent || "{}");
  const model = form.querySelector("#cg-model");
  const choice = form.querySelector("#cg-transcoders");
  const facts = form.querySelector("#cg-set-facts");
  const status = form.querySelector("#cg-status");
  const error = form.querySelector("#cg-error");
  const submit = form.querySelector("#cg-submit");

  const describe = (set) => {
    if (!set) return "";
    const parts = [`${set.kind}, ${set.activation}`, `layers ${set.layers.join(", ")}`];
    if (set.n_features) parts.push(`${set.n_features} features per layer`);
    if (set.explained_variance != null) parts.push(`explained variance ${fmt(set.explained_variance)}`);
    if (set.next_token_agreement != null) parts.push(`next-token agreement ${fmt(set.next_token_agreement)}`);
    return parts.join(" · ");
  };
  const current = () => (sets[model.value] || []).find((s) => s.id === choice.value);
  const fillSets = () => {
    clear(choice);
    for (const set of sets[model.value] || []) choice.append(el("option", { value: set.id, text: set.id }));
    facts.textContent = describe(current());
  };
  model.addEventListener("change", fillSets);
  choice.addEventListener("change", () => { facts.textContent = describe(current()); });
  fillSets();

  const showError = (message) => {
    error.textContent = message;
    error.hidden = !message;
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    const data = new FormData(form);
    const prompt = String(data.get("prompt") || "");
    if (!prompt.trim()) {
      showError("Type a prompt first.");
      form.querySelector("#cg-prompt").focus();
      return;
    }
    const number = (name) => Number(data.get(name));
    const body = {
      model_name: String(data.get("model_name")),
      transcoders: String(data.get("transcoders") || "") || null,
      prompt,
      // Empty: the server picks (the last token, or an encoder's mask).
      target_position: String(data.get("target_position") ?? "").trim()
        ? Math.trunc(number("target_position"))
        : null,
      node_threshold: number("node_threshold"),
      edge_threshold: number("edge_threshold"),
      max_feature_nodes: Math.trunc(number("max_feature_nodes")),
      visibility: String(data.get("visibility") || "public"),
    };
    submit.disabled = true;
    status.textContent = "Computing the graph… this takes a few seconds on small models, longer on large ones.";
    try {
      const created = await postJSON("/api/graphs", body);
      status.textContent = "Done; opening the graph.";
      window.location.assign(`/graph/${encodeURIComponent(created.slug)}`);
    } catch (failure) {
      status.textContent = "";
      showError(failure.message || String(failure));
      submit.disabled = false;
    }
  });
}
