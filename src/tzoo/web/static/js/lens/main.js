// The lens page (/lens): send a text to the server's queue over the WebSocket at /ws,
// follow its place in the queue and its progress, and show the result: a heat map for
// the logit and tuned lenses, a table of explanations (streamed row by row) for
// verbalize. The protocol is described in routes/lens_service.py.
//
// Usage: <script type="module">import { start } from "tzoo/lens/main.js"; start();</script>

import { say } from "tzoo/wheel/dom.js"; // the wheel's text-only DOM helpers
import { createExplainTable } from "tzoo/lens/explain_view.js";
import { ANALYSIS_NAMES, createForm } from "tzoo/lens/form.js";
import { queueText, seconds } from "tzoo/lens/format.js";
import { createHeatmap } from "tzoo/lens/heatmap_view.js";
import { createConnection, socketUrl } from "tzoo/lens/socket.js";

/** Where the API key is kept: this tab only. */
export const KEY_STORAGE = "tzoo.lens.apiKey";

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || null;
  } catch {
    return null; // storage disabled
  }
}

function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lasts until the page closes */
  }
}

/** A client-side id for an analyze request (crypto.randomUUID needs a secure context). */
function newClientId() {
  return globalThis.crypto?.randomUUID?.() ?? `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 10)}`;
}

/**
 * Start the page in `root` (default: #tzoo-lens).
 * @returns {object} a handle for tests: `{ state, connection, heatmap, explain }`
 */
export function start(root = document.getElementById("tzoo-lens")) {
  const $ = (selector) => root.querySelector(selector);
  const ui = {
    form: $("#lens-form"), run: $("#lens-run"), stop: $("#lens-stop"), cancel: $("#lens-cancel"),
    connection: $("#lens-connection"), keyForm: $("#lens-key-form"), key: $("#lens-api-key"), keyNote: $("#lens-key-note"),
    alert: $("#lens-alert"), status: $("#lens-status"), progress: $("#lens-progress"),
    heatSection: $("#lens-heatmap-section"), heatFacts: $("#lens-heatmap-facts"), colour: $("#lens-colour"),
    explainSection: $("#lens-explain-section"), explainFacts: $("#lens-explain-facts"), partial: $("#lens-partial"),
  };
  const form = createForm(ui.form);
  const heatmap = createHeatmap($("#lens-heatmap"), { legend: $("#lens-legend"), label: "Lens: layers by token positions" });
  const explain = createExplainTable($("#lens-explain-body"));
  /**
   * `job`: the request this page is running, { clientId, requestId (null until queued),
   * analysis, pending (an action asked for before the request had an id), group, loaded
   * (whether its model was loaded when it was sent) }.
   */
  const state = { connected: false, groups: 0, keyRequired: false, job: null };
  const hint = Number(root.dataset.maxTextLength);
  if (Number.isInteger(hint)) form.setMaxLength(hint);

  const status = (text) => (ui.status.textContent = text || "");
  /** Show `text` in the alert region (null hides it); `source`: "page", "server" or "connection". */
  function showAlert(text, source = "page") {
    say(ui.alert, text);
    if (text) ui.alert.dataset.source = source;
    else delete ui.alert.dataset.source;
  }

  const connection = createConnection({
    url: () => socketUrl(root.dataset.ws || "/ws", location, storedKey()),
    onMessage: handle,
    onState: connectionState,
  });

  // -- buttons and states ------------------------------------------------------------------------

  function setState(name) {
    root.dataset.state = name;
    updateButtons();
  }

  function updateButtons() {
    const running = Boolean(state.job);
    const had = document.activeElement;
    ui.run.disabled = running || !state.connected || !state.groups;
    ui.stop.disabled = !running;
    ui.cancel.disabled = !running;
    // A disabled button drops the keyboard user's focus: hand it to the button that now acts.
    if (had instanceof HTMLButtonElement && had.disabled && ui.form.contains(had)) (running ? ui.cancel : ui.run).focus();
  }

  function connectionState(name, detail = {}) {
    root.dataset.connection = name;
    ui.connection.dataset.state = name;
    if (name === "open") ui.connection.textContent = "Connected";
    else if (name === "connecting") ui.connection.textContent = "Connecting…";
    if (name === "open" || name === "connecting") return;
    state.connected = false;
    if (name === "retrying") ui.connection.textContent = `Connection lost — retrying in ${seconds(detail.delayMs / 1000)}`;
    if (name === "refused") {
      ui.connection.textContent = "Refused";
      showKeyForm(true);
      // The server usually said why just before closing; keep its sentence.
      if (ui.alert.hidden) showAlert(`The server refused the connection${detail.reason ? ` (${detail.reason})` : ""}. ${storedKey() ? "Check the API key." : "Enter an API key."}`, "connection");
    }
    if (state.job) {
      abandon("The connection dropped while the request was running; run it again once it is back.");
    }
    updateButtons();
  }

  function showKeyForm(focus = false) {
    ui.keyForm.hidden = false;
    if (!ui.key.value) ui.key.value = storedKey() || "";
    ui.keyNote.textContent = storedKey()
      ? "This server asks for an API key. The key in use is kept in this tab only (session storage)."
      : "This server asks for an API key. It is kept in this tab only (session storage).";
    if (focus) ui.key.focus();
  }

  // -- messages ----------------------------------------------------------------------------------

  const mine = (requestId) => Boolean(state.job && requestId != null && requestId === state.job.requestId);

  function handle(message) {
    switch (message.type) {
      case "connection_established": return established(message);
      case "model_groups": return groupsChanged(message.groups, message.current_group);
      case "queued": return queued(message);
      case "queue_update": return mine(message.request_id) && showQueue(message.position, message.queue_size);
      case "progress": return mine(message.request_id) && progress(message);
      case "completed": return mine(message.request_id) && completed(message);
      case "request_cancelled": return mine(message.request_id) && cancelled(message);
      case "error": return failed(message);
      case "model_switch_complete":
        if (state.job) status(`Loaded ${message.model_group} in ${seconds(message.elapsed_s)}; running…`);
        return undefined;
      default: return undefined; // "status" replies and anything newer: not needed here
    }
  }

  function established(message) {
    state.connected = true;
    state.keyRequired = Boolean(message.api_key_required);
    form.setAnalyses(message.analyses);
    form.setMaxLength(message.max_text_length);
    groupsChanged(message.model_groups, message.current_group);
    if (state.keyRequired) showKeyForm();
    else ui.keyForm.hidden = true;
    if (ui.alert.dataset.source === "connection") showAlert(null);
    if (!state.job) status("");
    root.dataset.ready = "true";
    updateButtons();
  }

  function groupsChanged(groups, current) {
    form.setGroups(groups, current);
    state.groups = Array.isArray(groups) ? groups.length : 0;
    updateButtons();
  }

  function queued(message) {
    const job = state.job;
    if (!job || message.client_request_id !== job.clientId) return;
    job.requestId = message.request_id;
    root.dataset.requestId = String(message.request_id);
    if (job.pending) {
      connection.send({ type: job.pending, request_id: job.requestId });
      return;
    }
    showQueue(message.position, message.queue_size);
  }

  function showQueue(position, size) {
    setState(position ? "queued" : "running");
    if (state.job?.pending) return; // "Cancelling…" stays until the answer
    status(queueText(position, size));
    ui.progress.hidden = false;
    if (position) ui.progress.removeAttribute("value"); // indeterminate while waiting
  }

  function progress(message) {
    const job = state.job;
    setState("running");
    if (Array.isArray(message.rows) && message.rows.length) {
      ui.explainSection.hidden = false;
      explain.add(message.rows);
    }
    if (job.pending) return;
    ui.progress.hidden = false;
    if (message.stage === "loading") {
      // Sent when a request starts on a model that is not loaded yet.
      ui.progress.removeAttribute("value");
      status(`Loading ${job.group}…`);
      return;
    }
    const total = Math.max(1, Number(message.total) || 1);
    ui.progress.max = total;
    ui.progress.value = Math.min(total, Number(message.done) || 0);
    if (job.analysis === "verbalize" && !message.rows) {
      status("Running…"); // started; the first batch of rows is on its way
    } else if (job.analysis === "verbalize") {
      status(`Running — ${message.done} of ${message.total} tokens explained`);
      ui.explainFacts.textContent = `${explain.count} of ${message.total} positions so far`;
    } else {
      status("Running the lens…"); // one forward pass: nothing to count
    }
  }

  function completed(message) {
    const interrupted = message.status === "interrupted";
    show(message.result);
    const rows = Array.isArray(message.result?.rows) ? message.result.rows.length : null;
    status(interrupted
      ? `Stopped after ${seconds(message.elapsed_s)}${rows != null ? `: kept the ${rows} rows done` : ""}.`
      : `Done in ${seconds(message.elapsed_s)}.`);
    root.dataset.elapsed = String(message.elapsed_s);
    finish(interrupted ? "interrupted" : "done");
  }

  function cancelled(message) {
    if (message.result) show(message.result);
    const rows = Array.isArray(message.result?.rows) ? message.result.rows.length : 0;
    status(rows ? `Cancelled: showing the ${rows} rows done before.` : "Cancelled.");
    finish("cancelled");
  }

  function failed(message) {
    const text = message.message || message.error || "The server could not run the request.";
    const job = state.job;
    const ours = mine(message.request_id) || (job && job.requestId == null && message.request_id == null);
    if (message.request_id != null && !ours) return; // about a request this page no longer follows
    ui.alert.dataset.error = String(message.error || "");
    if (message.status === 401 && message.request_id == null) {
      // A missing or wrong key: the server closes the socket next (code 4401).
      showKeyForm(true);
      return showAlert(text, "connection");
    }
    showAlert(text, "server");
    if (ours) {
      if (message.result) show(message.result); // a timed-out verbalisation keeps its rows
      status("");
      finish("error");
    }
  }

  // -- results -------------------------------------------------------------------------------------

  function show(result) {
    if (!result) return;
    if (result.analysis === "verbalize" || Array.isArray(result.rows)) {
      explain.replace(result.rows);
      ui.explainSection.hidden = false;
      ui.partial.hidden = result.complete !== false;
      const layers = result.source_layer === result.target_layer
        ? `layer ${result.source_layer}` : `layer ${result.source_layer} → ${result.target_layer}`;
      ui.explainFacts.textContent = `${result.model_group || result.model} (${result.model}) · ${layers} · ${result.rows.length} of ${result.tokens?.length ?? "?"} positions`;
      root.dataset.complete = String(result.complete !== false);
      return;
    }
    heatmap.render(result);
    ui.heatSection.hidden = false;
    const k = result.top_ids?.[0]?.[0]?.length ?? 0;
    ui.heatFacts.textContent = `${result.model_group || result.model} (${result.model}) · ${ANALYSIS_NAMES[result.analysis] || result.analysis} · ${result.layers.length} layers × ${result.tokens.length} positions · top ${k}`;
    root.dataset.complete = String(result.complete !== false);
  }

  function finish(outcome) {
    state.job = null;
    if (outcome === "done" || outcome === "interrupted") {
      ui.progress.value = ui.progress.max;
    } else {
      ui.progress.hidden = true;
    }
    setState(outcome);
    connection.send({ type: "list_model_groups" }); // "loaded" may have changed
  }

  /** The request is lost (the socket dropped): say so and free the form. */
  function abandon(text) {
    showAlert(text, "connection");
    status("");
    state.job = null;
    ui.progress.hidden = true;
    setState("error");
  }

  // -- actions ---------------------------------------------------------------------------------------

  function run(event) {
    event.preventDefault();
    if (state.job || ui.run.disabled) return;
    showAlert(null);
    const { message, error } = form.read();
    if (error) return showAlert(error);
    const group = form.group();
    const job = {
      clientId: newClientId(), requestId: null, analysis: message.analysis, pending: null,
      group: group?.name ?? "the model", loaded: Boolean(group?.loaded),
    };
    ui.heatSection.hidden = true;
    ui.explainSection.hidden = true;
    ui.partial.hidden = true;
    explain.reset();
    ui.explainFacts.textContent = "";
    delete root.dataset.complete;
    delete root.dataset.requestId;
    delete root.dataset.elapsed;
    if (!connection.send({ ...message, client_request_id: job.clientId })) {
      return showAlert("Not connected to the server; wait for it to reconnect and try again.");
    }
    state.job = job;
    status("Sending…");
    ui.progress.hidden = false;
    ui.progress.removeAttribute("value");
    setState("sending");
  }

  /** Cancel (drop everything) or interrupt (stop, keep what is done). */
  function act(type) {
    const job = state.job;
    if (!job || job.pending) return;
    job.pending = type;
    status(type === "cancel_request" ? "Cancelling…" : "Stopping: keeping what is done…");
    if (job.requestId != null) connection.send({ type, request_id: job.requestId });
  }

  ui.form.addEventListener("submit", run);
  ui.cancel.addEventListener("click", () => act("cancel_request"));
  ui.stop.addEventListener("click", () => act("interrupt"));
  ui.colour.addEventListener("change", (event) => heatmap.setMetric(/** @type {HTMLInputElement} */ (event.target).value));
  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey(ui.key.value.trim());
    showAlert(null);
    status("Reconnecting with the key…");
    connection.connect();
  });

  setState("idle");
  connection.connect();
  return { state, connection, heatmap, explain };
}
