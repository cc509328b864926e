// The sampling controls: threshold, temperature, top-k, top-p. They are read and checked
// here; a change (debounced while typing) asks the page to fetch the distribution again.
// The reason a value is refused, ours or the server's, shows next to them.

import { say } from "tzoo/wheel/dom.js";
import { paramsText } from "tzoo/wheel/format.js";

/** Allowed ranges; top-k and top-p may also be blank (off). */
export const LIMITS = {
  threshold: { min: 0.001, max: 0.2, label: "Threshold" },
  temperature: { min: 0.05, max: 3, label: "Temperature" },
  top_k: { min: 1, max: 1000, label: "Top-k", integer: true, optional: true },
  top_p: { min: 0.05, max: 1, label: "Top-p", optional: true },
};

/**
 * Check raw field values.
 * @param {Record<string, string>} raw the inputs' values
 * @returns {{ values: {threshold: number, temperature: number, top_k: number|null, top_p: number|null} | null,
 *            error: string | null, field: string | null }}
 */
export function parseControls(raw) {
  const values = {};
  for (const [name, rule] of Object.entries(LIMITS)) {
    const text = String(raw[name] ?? "").trim();
    if (text === "") {
      if (rule.optional) {
        values[name] = null;
        continue;
      }
      return { values: null, error: `${rule.label} is required.`, field: name };
    }
    const value = Number(text);
    if (!Number.isFinite(value) || (rule.integer && !Number.isInteger(value)) || value < rule.min || value > rule.max) {
      const kind = rule.integer ? "a whole number" : "a number";
      const blank = rule.optional ? " (or blank for off)" : "";
      return { values: null, error: `${rule.label} must be ${kind} from ${rule.min} to ${rule.max}${blank}.`, field: name };
    }
    values[name] = value;
  }
  return { values: /** @type {any} */ (values), error: null, field: null };
}

/**
 * Wire the controls inside `form`: inputs named threshold, temperature, top_k, top_p; an
 * error line #wheel-controls-error and an "applied" line #wheel-applied.
 * @param {HTMLFormElement} form
 * @param {{ onChange: (values: any) => void, delay?: number }} options
 */
export function createControls(form, { onChange, delay = 350 }) {
  const error = form.querySelector("#wheel-controls-error");
  const applied = form.querySelector("#wheel-applied");
  let timer = null;
  let last = "";

  const raw = () => Object.fromEntries(Object.keys(LIMITS).map((name) => [name, form.elements[name].value]));

  function read() {
    const parsed = parseControls(raw());
    for (const name of Object.keys(LIMITS)) {
      form.elements[name].setAttribute("aria-invalid", String(parsed.field === name));
    }
    say(error, parsed.error);
    return parsed.values;
  }

  function changed() {
    clearTimeout(timer);
    const values = read();
    if (!values) return;
    const key = JSON.stringify(values);
    if (key === last) return;
    last = key;
    onChange(values);
  }

  form.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(changed, delay);
  });
  form.addEventListener("change", changed);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    changed();
  });

  return {
    /** The current values, or null (with the reason shown) when one is out of range. */
    read,
    /** Remember `values` as already fetched (so an unchanged field does not refetch). */
    settle: (values) => (last = JSON.stringify(values)),
    /** Show a reason from the server (422) next to the controls; null clears it. */
    showError: (message) => say(error, message),
    /** Show which parameters changed the distribution. */
    showApplied(params) {
      const text = paramsText(params);
      applied.textContent = text ? `Applied: ${text}` : "Applied: none — the model's own distribution";
    },
    /** Enable or disable every input. */
    setDisabled(disabled) {
      for (const name of Object.keys(LIMITS)) form.elements[name].disabled = disabled;
    },
  };
}
