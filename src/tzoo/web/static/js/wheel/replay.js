// The replay page (/wheel/replay/{slug}): a saved path, step by step, from the JSON the
// page embeds (<script type="application/json" id="wheel-replay">). Needs no session and
// no request: every step carries the wheel that was shown when its token was chosen.
//
// Position 0 is the prompt alone (with the first wheel, nothing chosen yet); position k
// shows step k's wheel with its choice highlighted and the text up to that token.
//
// Usage: <script type="module">import { startReplay } from "tzoo/wheel/replay.js"; startReplay();</script>

import { clear, el, prefersReducedMotion } from "tzoo/wheel/dom.js";
import { paramsText, percent, spokenPercent, spokenToken, visibleToken } from "tzoo/wheel/format.js";
import { segmentsOf } from "tzoo/wheel/geometry.js";
import { renderChips, renderText } from "tzoo/wheel/history_view.js";
import { renderTable } from "tzoo/wheel/table_view.js";
import { createWheel } from "tzoo/wheel/wheel_view.js";

/** The key of the segment a step chose: its token's, or "other". */
export function chosenKey(step) {
  return step.choice === "other" ? "other" : `t${step.token_id}`;
}

/** The replay embedded in the page. */
export function readReplay(doc = document) {
  const node = doc.getElementById("wheel-replay");
  if (!node) throw new Error("This page has no replay data.");
  return JSON.parse(node.textContent);
}

/** The step in `#step=k`, clamped to 0..n. */
export function stepFromHash(n, hash = location.hash) {
  const k = Number(new URLSearchParams(hash.replace(/^#/, "")).get("step"));
  return Number.isInteger(k) ? Math.min(Math.max(k, 0), n) : 0;
}

/**
 * Start the replay in `root` (default: #tzoo-wheel-replay).
 * @param {HTMLElement} [root]
 * @param {{ playDelay?: number, spinDuration?: number }} [options] ms between steps, and of a spin
 * @returns {{ go: (k: number, options?: {animate?: boolean}) => Promise<void>, position: () => number, wheel: any }}
 */
export function startReplay(root = document.getElementById("tzoo-wheel-replay"), { playDelay = 1400, spinDuration = 1300 } = {}) {
  const $ = (selector) => root.querySelector(selector);
  const replay = readReplay();
  const steps = replay.steps || [];
  const n = steps.length;
  const ui = {
    prev: $("#replay-prev"), next: $("#replay-next"), play: $("#replay-play"), slider: $("#replay-slider"),
    label: $("#replay-step"), text: $("#replay-text"), chips: $("#replay-chips"), table: $("#replay-table-body"),
    facts: $("#replay-facts"), otherSummary: $("#replay-other-summary"), otherSamples: $("#replay-other-samples"),
  };
  const wheel = createWheel($("#replay-canvas"), { interactive: false, label: "The wheel at this step" });
  let position = 0;
  let ticket = 0;
  let timer = null;
  let playing = false;

  ui.slider.max = String(n);

  /** Draw position `k` at rest. */
  function draw(k) {
    position = k;
    const step = k > 0 ? steps[k - 1] : null;
    const shown = step || steps[0];
    const segments = shown ? segmentsOf(shown.wheel) : [];
    const key = step ? chosenKey(step) : null;
    const chosen = segments.find((s) => s.key === key);
    if (chosen) wheel.centre(chosen); // where the spin stopped: the choice under the pointer
    else wheel.reset();
    wheel.render(segments, { highlight: key, emptyText: n ? "" : "This path has no steps." });
    wheel.setHub(n ? `${k}/${n}` : "");
    renderTable(ui.table, segments, { highlight: key });
    renderText(ui.text, replay.prompt, steps.slice(0, k), { current: k - 1 });
    renderChips(ui.chips, replay.prompt, steps.slice(0, k), { current: k - 1 });
    describeOther(shown?.wheel?.other);
    clear(ui.label);
    if (!step) {
      ui.label.append(n ? `Step 0 of ${n}: the prompt. Press Next or Play to see each token chosen.` : "This path has no steps.");
      wheel.setLabel(n ? "The first wheel, before any token was chosen" : "No wheel");
    } else {
      const from = step.choice === "other" ? ", drawn from Other" : "";
      ui.label.append(`Step ${k} of ${n}: `, el("span", { class: "wheel-token" }, visibleToken(step.text)), ` — ${percent(step.probability)}${from}`);
      const params = paramsText(step.sampling);
      ui.facts.textContent = `Threshold ${step.threshold}${params ? ` · ${params}` : " · no sampling controls"} · ${shown.wheel.tokens.length} segments + Other`;
      wheel.setLabel(`Step ${k}: chose ${spokenToken(step.text)}, ${spokenPercent(step.probability)}${from}`);
    }
    if (!step) ui.facts.textContent = shown ? `Threshold ${shown.threshold} · ${shown.wheel.tokens.length} segments + Other` : "";
    ui.slider.value = String(k);
    ui.slider.setAttribute("aria-valuetext", `Step ${k} of ${n}`);
    ui.prev.disabled = k === 0;
    ui.next.disabled = k === n;
    ui.play.disabled = n === 0;
    root.dataset.position = String(k);
    try {
      history.replaceState(null, "", k ? `#step=${k}` : location.pathname + location.search);
    } catch {
      /* a sandboxed frame may refuse */
    }
  }

  function describeOther(other) {
    clear(ui.otherSamples);
    if (!other || !(other.probability > 0)) {
      ui.otherSummary.textContent = "Every token with any probability had a segment of its own.";
      return;
    }
    ui.otherSummary.textContent = `${other.count} tokens below the threshold shared ${percent(other.probability)}. Some of them:`;
    for (const t of other.samples || []) {
      ui.otherSamples.append(el("li", {}, el("span", { class: "wheel-token" }, visibleToken(t.text)), " ", el("span", { class: "muted" }, percent(t.probability))));
    }
  }

  /**
   * Go to position `k`. With `animate` (Next, Play) and one step forward, the wheel first
   * spins onto the segment that was chosen.
   */
  async function go(k, { animate = false } = {}) {
    const target = Math.min(Math.max(k, 0), n);
    const mine = ++ticket;
    wheel.stop();
    if (animate && target === position + 1 && target > 0 && !prefersReducedMotion()) {
      const step = steps[target - 1];
      const segments = segmentsOf(step.wheel);
      const segment = segments.find((s) => s.key === chosenKey(step));
      draw(target - 1);
      if (segment) {
        wheel.render(segments);
        root.dataset.spinning = "true";
        await wheel.spin(segment, { duration: spinDuration, turns: 2, r: 0.5 }); // r 0.5: stop mid-segment, as draw() centres it
        root.dataset.spinning = "false";
        if (mine !== ticket) return;
      }
    }
    if (mine === ticket) draw(target);
  }

  function stop() {
    playing = false;
    clearTimeout(timer);
    ui.play.textContent = "Play";
    ui.play.setAttribute("aria-pressed", "false");
  }

  async function tick() {
    if (!playing) return;
    if (position >= n) return stop();
    await go(position + 1, { animate: true });
    if (!playing) return;
    if (position >= n) return stop();
    timer = setTimeout(tick, playDelay);
  }

  ui.prev.addEventListener("click", () => { stop(); go(position - 1); });
  ui.next.addEventListener("click", () => { stop(); go(position + 1, { animate: true }); });
  ui.slider.addEventListener("input", () => { stop(); go(Number(ui.slider.value)); });
  ui.play.addEventListener("click", () => {
    if (playing) return stop();
    playing = true;
    ui.play.textContent = "Pause";
    ui.play.setAttribute("aria-pressed", "true");
    if (position >= n) draw(0);
    tick();
  });

  draw(stepFromHash(n));
  root.dataset.ready = "true";
  return { go, position: () => position, wheel };
}
