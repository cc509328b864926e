// The path so far: the prompt and each appended token as chips, and the text they make,
// prompt in one colour and appended tokens in another. Tokens go in exactly, as text
// (white-space: pre-wrap keeps their spaces and newlines).

import { clear, el } from "tzoo/wheel/dom.js";
import { paramsText, percent, visibleToken } from "tzoo/wheel/format.js";

/** The hover text of a step: "41.2% · threshold 0.01 · temperature 0.7 · from Other". */
export function stepTitle(step) {
  const parts = [percent(step.probability)];
  if (step.threshold != null) parts.push(`threshold ${step.threshold}`);
  const params = paramsText(step.sampling);
  if (params) parts.push(params);
  if (step.choice === "other") parts.push("drawn from Other");
  return parts.join(" · ");
}

/**
 * Chips: the prompt, then one per step (newest last).
 * @param {HTMLElement} list an <ol>
 * @param {string} prompt
 * @param {any[]} steps
 * @param {{ current?: number | null }} [options] highlight step `current` (0-based)
 */
export function renderChips(list, prompt, steps, { current = null } = {}) {
  clear(list);
  list.append(el("li", { class: "wheel-chip is-prompt", title: "The prompt" },
    el("span", { class: "wheel-chip-tag" }, "Prompt"), el("span", { class: "wheel-token" }, visibleToken(prompt))));
  steps.forEach((step, i) => {
    const chip = el("li", {
      class: `wheel-chip${step.choice === "other" ? " is-other" : ""}${i === current ? " is-current" : ""}`,
      title: stepTitle(step),
      dataset: { step: String(i + 1) },
    }, el("span", { class: "wheel-token" }, visibleToken(step.text)),
    el("span", { class: "visually-hidden" }, `, ${stepTitle(step)}`));
    list.append(chip);
  });
}

/**
 * The text: the prompt, then each step's token in its own span.
 * @param {HTMLElement} node
 * @param {string} prompt
 * @param {any[]} steps
 * @param {{ current?: number | null }} [options] mark step `current` (0-based)
 */
export function renderText(node, prompt, steps, { current = null } = {}) {
  clear(node);
  node.append(el("span", { class: "wheel-text-prompt" }, prompt));
  steps.forEach((step, i) => {
    node.append(el("span", {
      class: `wheel-text-token${i === current ? " is-current" : ""}`,
      title: stepTitle(step),
      dataset: { step: String(i + 1) },
    }, step.text));
  });
}
