// The token wheel page (/wheel): start a session on a prompt, then grow the text one token
// at a time by spinning the wheel, clicking a wedge, or choosing a row of the table. The
// session id lives in the URL (#session=...), so a reload picks the session up again; the
// session's key travels in an HttpOnly cookie the server set for that session's paths, so
// only this browser (or whoever holds the key) can open it, and no script ever sees the key.
//
// Usage: <script type="module">import { start } from "tzoo/wheel/main.js"; start();</script>

import { ApiError, createApi, samplingFields } from "tzoo/wheel/api.js";
import { createControls } from "tzoo/wheel/controls.js";
import { clear, el, prefersReducedMotion, say } from "tzoo/wheel/dom.js";
import { percent, spokenToken, visibleToken } from "tzoo/wheel/format.js";
import { pickSegment, segmentsOf } from "tzoo/wheel/geometry.js";
import { renderChips, renderText } from "tzoo/wheel/history_view.js";
import { renderTable } from "tzoo/wheel/table_view.js";
import { createWheel } from "tzoo/wheel/wheel_view.js";

/** How long the wheel rests on the landed segment before the token joins the text. */
const LANDED_PAUSE_MS = 500;

/** The session id in `#session=...`, or null. */
export function sessionFromHash(hash = location.hash) {
  return new URLSearchParams(hash.replace(/^#/, "")).get("session");
}

function writeHash(id) {
  const hash = id ? `#session=${encodeURIComponent(id)}` : "";
  if (location.hash === hash || (!id && !location.hash)) return;
  history.replaceState(null, "", hash || location.pathname + location.search);
}

/** Typing in these keeps its own Ctrl+Z. */
function isEditable(node) {
  return node instanceof HTMLElement && (node.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(node.tagName));
}

/**
 * Start the page in `root` (default: #tzoo-wheel).
 * @returns {Promise<object>} a handle for tests: `{ state, wheel, spin, choose, undo }`
 */
export async function start(root = document.getElementById("tzoo-wheel")) {
  const $ = (selector) => root.querySelector(selector);
  const api = createApi({ base: root.dataset.api || "/api" });
  const ui = {
    startForm: $("#wheel-start"), model: $("#wheel-model"), prompt: $("#wheel-prompt"),
    startButton: $("#wheel-start-button"), startError: $("#wheel-start-error"),
    alert: $("#wheel-alert"), alertText: $("#wheel-alert-text"), restart: $("#wheel-restart"),
    status: $("#wheel-status"), session: $("#wheel-session"), facts: $("#wheel-facts"),
    spin: $("#wheel-spin"), wheelError: $("#wheel-error"), text: $("#wheel-text"), chips: $("#wheel-chips"),
    undo: $("#wheel-undo"), otherPanel: $("#wheel-other-panel"), otherSummary: $("#wheel-other-summary"),
    otherSamples: $("#wheel-other-samples"), table: $("#wheel-table-body"), save: $("#wheel-save"),
    visibility: $("#wheel-visibility"), saveError: $("#wheel-save-error"), saved: $("#wheel-saved"),
    savedLink: $("#wheel-saved-link"), savedUrl: $("#wheel-saved-url"), savedNote: $("#wheel-saved-note"), copy: $("#wheel-copy"),
  };
  const state = { session: null, dist: null, segments: [], busy: false, ticket: 0 };
  const status = (text) => (ui.status.textContent = text);

  const wheel = createWheel($("#wheel-canvas"), {
    label: "Next-token wheel: one segment per likely token and one for all others. Arrow keys move, Enter adds the token.",
    onChoose: (segment) => choose(segment),
    onHover: (segment) => ui.otherPanel.classList.toggle("is-active", segment?.kind === "other"),
  });
  const controls = createControls($("#wheel-controls"), { onChange: () => refresh() });

  /**
   * While a request runs, buttons say so with aria-disabled but stay focusable (a
   * disabled button would drop the keyboard user's focus); the actions check `busy`.
   */
  function setBusy(busy) {
    state.busy = busy;
    root.dataset.busy = String(busy);
    const steps = state.session?.steps.length || 0;
    ui.spin.disabled = !state.segments.length;
    ui.undo.disabled = !steps;
    ui.save.disabled = !steps;
    ui.startButton.disabled = !ui.model.options.length;
    for (const button of [ui.spin, ui.undo, ui.save, ui.startButton]) button.setAttribute("aria-disabled", String(busy));
  }

  // -- errors ------------------------------------------------------------------------------

  /** Show `error` where it belongs: `where` is "start", "controls", "wheel" or "save". */
  function report(error, where) {
    const detail = error instanceof ApiError ? error.detail : String(error?.message || error);
    const code = error instanceof ApiError ? error.status : 0;
    if (code === 404 && where !== "start") return sessionLost(detail);
    if (where === "controls" && code === 422) return controls.showError(detail);
    say({ start: ui.startError, save: ui.saveError }[where] || ui.wheelError, detail);
    status(code === 413 ? "The context is full: undo a token, or start over with a shorter prompt." : "");
  }

  function clearErrors() {
    for (const line of [ui.startError, ui.wheelError, ui.saveError]) say(line, null);
    controls.showError(null);
  }

  /** The session expired or never existed: say so and offer a new one. */
  function sessionLost(detail) {
    state.session = null;
    state.segments = [];
    ui.session.hidden = true;
    ui.alertText.textContent = detail;
    ui.alert.hidden = false;
    ui.startButton.textContent = "Start";
    writeHash(null);
    status("");
    ui.restart.focus();
  }

  // -- drawing -------------------------------------------------------------------------------

  function showSession(snapshot) {
    state.session = snapshot;
    ui.session.hidden = false;
    ui.alert.hidden = true;
    ui.startButton.textContent = "Start over";
    writeHash(snapshot.id);
    renderText(ui.text, snapshot.prompt, snapshot.steps);
    renderChips(ui.chips, snapshot.prompt, snapshot.steps);
    root.dataset.steps = String(snapshot.steps.length);
    setBusy(state.busy);
  }

  function showDistribution(dist) {
    state.dist = dist;
    state.segments = segmentsOf(dist);
    wheel.reset();
    wheel.render(state.segments, { emptyText: "No token has any probability." });
    renderTable(ui.table, state.segments, { onChoose: (segment) => choose(segment) });
    controls.showApplied(dist.applied);
    const other = dist.other || { probability: 0, count: 0, samples: [] };
    ui.facts.textContent = `${dist.context_tokens} tokens of context · ${dist.tokens.length} at or above ${percent(dist.threshold)} · Other ${percent(other.probability)}`;
    clear(ui.otherSamples);
    if (other.count > 0 && other.probability > 0) {
      ui.otherSummary.textContent = `${other.count} tokens below the threshold share ${percent(other.probability)}. Landing here draws one of them at random, by probability. Some of them:`;
      for (const t of other.samples || []) {
        ui.otherSamples.append(el("li", {}, el("span", { class: "wheel-token" }, visibleToken(t.text)), " ", el("span", { class: "muted" }, percent(t.probability))));
      }
    } else {
      ui.otherSummary.textContent = "Every token with any probability has a segment of its own.";
    }
    setBusy(state.busy);
  }

  // -- actions -------------------------------------------------------------------------------

  /** Fetch the distribution under the current controls and redraw. */
  async function refresh() {
    if (!state.session) return;
    const values = controls.read();
    if (!values) return;
    const ticket = ++state.ticket;
    root.dataset.loading = "true";
    try {
      const dist = await api.nextTokenProbs(state.session.id, samplingFields(values));
      if (ticket !== state.ticket) return; // a newer request is on its way
      controls.settle(values);
      controls.showError(null);
      showDistribution(dist);
    } catch (error) {
      if (ticket === state.ticket) report(error, "controls");
    } finally {
      if (ticket === state.ticket) root.dataset.loading = "false";
    }
  }

  async function startSession() {
    if (state.busy) return;
    clearErrors();
    ui.alert.hidden = true;
    const model = ui.model.value;
    const prompt = ui.prompt.value;
    if (!model) return say(ui.startError, "Choose a model first.");
    if (!prompt.trim()) return say(ui.startError, "Write a prompt first.");
    setBusy(true);
    status(`Starting ${model}… (the first start loads the model)`);
    const old = state.session;
    try {
      if (old) await api.deleteSession(old.id).catch(() => {});
      state.session = null;
      let snapshot = await api.createSession(model);
      snapshot = await api.setPrompt(snapshot.id, prompt);
      ui.saved.hidden = true;
      showSession(snapshot);
      await refresh();
      if (state.session) status(`Ready: ${model}, ${snapshot.prompt_tokens.length} prompt tokens. Spin the wheel or pick a segment.`);
    } catch (error) {
      if (!state.session) ui.session.hidden = true;
      report(error, "start");
    } finally {
      setBusy(false);
    }
  }

  async function loadSession(id) {
    setBusy(true);
    status("Opening the session…");
    try {
      const snapshot = await api.getSession(id);
      if ([...ui.model.options].some((o) => o.value === snapshot.model_name)) ui.model.value = snapshot.model_name;
      ui.prompt.value = snapshot.prompt;
      showSession(snapshot);
      await refresh();
      status("");
    } catch (error) {
      report(error, "wheel");
    } finally {
      setBusy(false);
    }
  }

  /** Append `segment` (a token, or a draw from Other) with the current controls. */
  async function append(segment) {
    const values = controls.read();
    if (!values || !state.session) return;
    const fields = samplingFields(values);
    const body = segment.kind === "other" ? { choice: "other", ...fields } : { token_id: segment.id, ...fields };
    say(ui.wheelError, null);
    try {
      const { step, session } = await api.appendToken(state.session.id, body);
      showSession(session);
      const from = step.choice === "other" ? ", drawn from Other" : "";
      status(`Added ${spokenToken(step.text)} (${percent(step.probability)}${from}).`);
      await refresh();
    } catch (error) {
      report(error, "wheel");
    }
  }

  /** Append `segment` now (click, Enter, table). */
  async function choose(segment) {
    if (state.busy || !state.session) return;
    setBusy(true);
    try {
      await append(segment);
    } finally {
      setBusy(false);
    }
  }

  /** Pick a segment by probability, spin the wheel onto it, then append it. */
  async function spin() {
    if (state.busy || !state.session || !state.segments.length) return null;
    const segment = pickSegment(state.segments, Math.random());
    setBusy(true);
    status("Spinning…");
    try {
      const landed = await wheel.spin(segment, { r: Math.random() });
      if (!landed) return segment;
      status(`Landed on ${segment.kind === "other" ? "Other" : spokenToken(segment.text)}.`);
      if (!prefersReducedMotion()) await new Promise((resolve) => setTimeout(resolve, LANDED_PAUSE_MS));
      await append(segment);
    } finally {
      setBusy(false);
    }
    return segment;
  }

  async function undo() {
    if (state.busy || !state.session?.steps.length) return;
    setBusy(true);
    say(ui.wheelError, null);
    try {
      const { undone, session } = await api.undo(state.session.id);
      showSession(session);
      status(undone ? `Removed ${spokenToken(undone.text)}.` : "Nothing to undo.");
      await refresh();
    } catch (error) {
      report(error, "wheel");
    } finally {
      setBusy(false);
    }
  }

  async function save() {
    if (state.busy || !state.session) return;
    setBusy(true);
    say(ui.saveError, null);
    try {
      const { url } = await api.save(state.session.id, ui.visibility.value);
      const absolute = new URL(url, location.href).href;
      ui.savedLink.href = absolute;
      ui.savedLink.textContent = absolute;
      ui.savedUrl.value = absolute;
      const n = state.session.steps.length;
      const who = { private: "Only you can open it", unlisted: "Anyone with the link can open it" }[ui.visibility.value] || "Anyone can find and open it";
      ui.savedNote.textContent = `Saved the prompt and ${n} token${n === 1 ? "" : "s"}. ${who}:`;
      ui.saved.hidden = false;
      status("Saved. The link replays this path step by step.");
    } catch (error) {
      report(error, "save");
    } finally {
      setBusy(false);
    }
  }

  async function copyLink() {
    try {
      await navigator.clipboard.writeText(ui.savedUrl.value);
      status("Link copied.");
    } catch {
      ui.savedUrl.select();
      status("Press Ctrl+C to copy the selected link.");
    }
  }

  // -- wiring -------------------------------------------------------------------------------

  ui.startForm.addEventListener("submit", (event) => {
    event.preventDefault();
    startSession();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      ui.startForm.requestSubmit();
    }
  });
  ui.restart.addEventListener("click", () => startSession());
  ui.spin.addEventListener("click", () => spin());
  ui.undo.addEventListener("click", () => undo());
  ui.save.addEventListener("click", () => save());
  ui.copy.addEventListener("click", () => copyLink());
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && !event.shiftKey && !event.altKey && event.key.toLowerCase() === "z" && !isEditable(event.target)) {
      if (!state.session) return;
      event.preventDefault();
      undo();
    }
  });
  if (!ui.model.options.length) say(ui.startError, "No decoder model is available on this server.");

  setBusy(false);
  const id = sessionFromHash();
  if (id) await loadSession(id);
  root.dataset.ready = "true";
  return { state, wheel, spin, choose, undo, refresh };
}
