// The request form: text, analysis, model group and the options each analysis takes.
// Groups and analyses come from the server (connection_established, model_groups); the
// options are read and checked here, and the server checks them again.

import { el } from "tzoo/wheel/dom.js"; // the wheel's text-only DOM helpers

export const ANALYSIS_NAMES = {
  logit_lens: "Logit lens",
  tuned_lens: "Tuned lens",
  verbalize: "Verbalize (Patchscope)",
};

/**
 * Read an optional whole number from an input: null when blank.
 * @param {HTMLInputElement} input
 * @param {string} label
 * @returns {{ value: number | null, error: string | null }}
 */
export function readInteger(input, label) {
  const text = input.value.trim();
  if (text === "") return { value: null, error: null };
  const value = Number(text);
  if (!Number.isInteger(value)) return { value: null, error: `${label} must be a whole number.` };
  const min = input.min === "" ? -Infinity : Number(input.min);
  const max = input.max === "" ? Infinity : Number(input.max);
  if (value < min || value > max) {
    const range = Number.isFinite(min) && Number.isFinite(max) ? `from ${min} to ${max}` : Number.isFinite(min) ? `at least ${min}` : `at most ${max}`;
    return { value: null, error: `${label} must be ${range}.` };
  }
  return { value, error: null };
}

/**
 * A group's line under the form: its description, then "Model tiny-llama, 2 layers,
 * loaded. No trained tuned lens (...)."
 * @param {any} group a GROUP
 */
export function groupNote(group) {
  if (!group) return "";
  const parts = [`Model ${group.model}`];
  if (group.n_layers != null) parts.push(`${group.n_layers} layers`);
  parts.push(group.loaded ? "loaded" : "loads on the first run");
  const lens = group.tuned_lens ? "A trained tuned lens is available." : "No trained tuned lens (train one with `tzoo lens train`).";
  return [group.description, `${parts.join(", ")}.`, lens].filter(Boolean).join(" ");
}

/**
 * Wire the form in `root`.
 * @param {HTMLFormElement} form
 */
export function createForm(form) {
  const $ = (selector) => form.querySelector(selector);
  const ui = {
    text: $("#lens-text"), count: $("#lens-text-count"), analysis: $("#lens-analysis"), group: $("#lens-group"),
    groupNote: $("#lens-group-note"), k: $("#lens-k"), layer: $("#lens-layer"), target: $("#lens-target-layer"),
  };
  /** @type {any[]} */
  let groups = [];
  let maxLength = null;

  const group = () => groups.find((g) => g.name === ui.group.value) || null;

  function showOptions() {
    const analysis = ui.analysis.value;
    for (const field of form.querySelectorAll(".lens-opt")) {
      field.hidden = !field.dataset.for.split(" ").includes(analysis);
    }
  }

  /** The chosen group's facts, layer range and suggested layer; the tuned lens only where trained. */
  function groupChanged({ resetLayers = true } = {}) {
    const g = group();
    ui.groupNote.textContent = groupNote(g);
    const n = g?.n_layers;
    for (const input of [ui.layer, ui.target]) {
      if (n != null) {
        input.min = String(-n);
        input.max = String(n - 1);
      } else {
        input.removeAttribute("min");
        input.removeAttribute("max");
      }
      if (resetLayers) input.value = g?.verbalize_layer != null ? String(g.verbalize_layer) : "";
    }
    const tuned = ui.analysis.querySelector('option[value="tuned_lens"]');
    if (tuned && !tuned.dataset.unavailable) {
      tuned.disabled = Boolean(g && !g.tuned_lens);
      tuned.textContent = tuned.disabled ? `${ANALYSIS_NAMES.tuned_lens} (none trained for this group)` : ANALYSIS_NAMES.tuned_lens;
      if (tuned.disabled && ui.analysis.value === "tuned_lens") ui.analysis.value = "logit_lens";
    }
    showOptions();
  }

  function countText() {
    const n = ui.text.value.length;
    ui.count.textContent = maxLength ? `${n} of ${maxLength} characters` : `${n} characters`;
    ui.count.classList.toggle("is-over", Boolean(maxLength && n > maxLength));
  }

  ui.analysis.addEventListener("change", showOptions);
  ui.group.addEventListener("change", () => groupChanged());
  ui.text.addEventListener("input", countText);
  showOptions();
  countText();

  return {
    /**
     * Show the server's groups, keeping the user's choice when it still exists.
     * @param {any[]} list GROUPs
     * @param {string | null} current the server's current group
     */
    setGroups(list, current) {
      const before = ui.group.value;
      groups = Array.isArray(list) ? list : [];
      ui.group.replaceChildren(...groups.map((g) =>
        el("option", { value: g.name }, `${g.name} (${g.model}${g.loaded ? ", loaded" : ""})`)));
      const keep = groups.some((g) => g.name === before) ? before : groups.some((g) => g.name === current) ? current : groups[0]?.name;
      ui.group.disabled = !groups.length;
      if (!groups.length) ui.group.append(el("option", { value: "" }, "No model groups on this server"));
      else ui.group.value = keep;
      groupChanged({ resetLayers: keep !== before || ui.layer.value === "" });
    },
    /** Offer only the analyses the server runs. */
    setAnalyses(names) {
      if (!Array.isArray(names)) return;
      for (const option of ui.analysis.options) {
        const offered = names.includes(option.value);
        option.dataset.unavailable = offered ? "" : "true";
        option.disabled = !offered; // groupChanged disables the tuned lens where none is trained
      }
      if (ui.analysis.selectedOptions[0]?.disabled) ui.analysis.value = names[0];
      groupChanged({ resetLayers: false });
    },
    /** The server's text limit, for the counter. */
    setMaxLength(n) {
      maxLength = Number.isInteger(n) && n > 0 ? n : null;
      countText();
    },
    /**
     * The analyze message's fields, or an error sentence.
     * @returns {{ message: any, error: null } | { message: null, error: string }}
     */
    read() {
      const analysis = ui.analysis.value;
      const options = {};
      const fields = analysis === "verbalize"
        ? [["layer", ui.layer, "Layer"], ["target_layer", ui.target, "Target layer"]]
        : [["k", ui.k, "Top-k"]];
      for (const [name, input, label] of fields) {
        const { value, error } = readInteger(input, label);
        if (error) {
          input.setAttribute("aria-invalid", "true");
          input.focus();
          return { message: null, error };
        }
        input.removeAttribute("aria-invalid");
        if (value != null) options[name] = value;
      }
      const message = { type: "analyze", text: ui.text.value, analysis, options };
      if (ui.group.value) message.model_group = ui.group.value;
      return { message, error: null };
    },
    group,
    /** The analysis chosen now. */
    analysis: () => ui.analysis.value,
  };
}
