// The toolbar: view tabs (WAI-ARIA tabs with arrow keys) and the selectors shared by the
// views (stack, layer, head, token, sentence filter, statistic). Each field names the
// views it serves in `data-views`; the others hide it.

import { setOptions } from "tzoo/attention/dom.js";
import { STATS, VIEWS } from "tzoo/attention/state.js";
import { STAT_INFO } from "tzoo/attention/stats_view.js";
import { shortToken } from "tzoo/attention/tokens.js";

const STACK_LABELS = { encoder: "Encoder", decoder: "Decoder", cross: "Cross (decoder → encoder)" };
const FILTER_LABELS = { all: "All", ab: "A → B", ba: "B → A", aa: "A → A", bb: "B → B" };

/**
 * @param {{ root: HTMLElement, meta: any, store: any, notes: any,
 *           navigate: (patch: object, push?: boolean) => void }} deps
 */
export function createControls({ root, meta, store, notes, navigate }) {
  const $ = (selector) => root.querySelector(selector);
  const tabs = [...root.querySelectorAll('[role="tab"]')];
  const stack = $("#tzv-stack");
  const layer = $("#tzv-layer");
  const head = $("#tzv-head");
  const token = $("#tzv-token");
  const filter = $("#tzv-filter");
  const stat = $("#tzv-stat");

  // -- tabs ------------------------------------------------------------------------------

  for (const tab of tabs) tab.addEventListener("click", () => navigate({ view: tab.dataset.view }, true));
  root.querySelector('[role="tablist"]').addEventListener("keydown", (event) => {
    const at = tabs.indexOf(document.activeElement);
    if (at < 0) return;
    const moves = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: tabs.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const next = tabs[(moves[event.key] + tabs.length) % tabs.length];
    next.focus();
    navigate({ view: next.dataset.view }, true);
  });

  // -- selectors -------------------------------------------------------------------------

  const stacks = Object.keys(meta.stacks);
  setOptions(stack, stacks.map((s) => [s, STACK_LABELS[s] || s]), store.get().stack);
  stack.closest(".tzv-field").dataset.single = String(stacks.length < 2);
  filter.closest(".tzv-field").dataset.single = String(meta.sentence_b_start == null);
  setOptions(filter, Object.entries(FILTER_LABELS), "all");

  stack.addEventListener("change", () => navigate({ stack: stack.value, token: null, tokenEnd: null, key: null }));
  layer.addEventListener("change", () => navigate({ layer: Number(layer.value) }));
  head.addEventListener("change", () => navigate({ head: Number(head.value) }));
  token.addEventListener("change", () => navigate({ token: token.value === "" ? null : Number(token.value), tokenEnd: null, key: null }));
  filter.addEventListener("change", () => navigate({ filter: filter.value }));
  stat.addEventListener("change", () => navigate({ stat: stat.value }));
  $("#tzv-layer-prev").addEventListener("click", () => navigate({ layer: Math.max(0, store.get().layer - 1) }));
  $("#tzv-layer-next").addEventListener("click", () => {
    const s = store.get();
    navigate({ layer: Math.min(meta.stacks[s.stack].n_layers - 1, s.layer + 1) });
  });

  let filled = null; // what the options were built for

  /** Bring every control in line with `state`. */
  function sync(state) {
    const info = meta.stacks[state.stack];
    for (const tab of tabs) {
      const selected = tab.dataset.view === state.view;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
    }
    for (const view of VIEWS) root.querySelector(`#tzv-panel-${view}`).hidden = view !== state.view;
    for (const field of root.querySelectorAll(".tzv-field[data-views]")) {
      field.hidden = field.dataset.single === "true" || !field.dataset.views.split(" ").includes(state.view);
    }
    root.dataset.view = state.view;

    const key = `${state.stack}|${state.view}|${notes.version()}`;
    if (filled !== key) {
      filled = key;
      setOptions(layer, Array.from({ length: info.n_layers }, (_, l) => {
        const count = notes.layerCount(state.stack, l);
        return [l, count ? `${l} · ${count} comment${count > 1 ? "s" : ""}` : String(l)];
      }), state.layer);
      setOptions(head, Array.from({ length: info.n_heads }, (_, h) => {
        const count = notes.cellCount(state.stack, state.layer, h);
        return [h, count ? `${h} · ${count} comment${count > 1 ? "s" : ""}` : String(h)];
      }), state.head);
      const tokens = info.query_tokens.map((t, i) => [i, `${i} ${shortToken(t, 24)}`]);
      setOptions(token, state.view === "head" ? [["", "— none —"], ...tokens] : tokens, state.token ?? "");
      setOptions(stat, STATS.map((s) => [s, STAT_INFO[s].label]), state.stat);
      for (const option of stat.options) option.disabled = !Array.isArray(meta.head_stats?.[state.stack]?.[option.value]);
    }
    stack.value = state.stack;
    layer.value = String(state.layer);
    head.value = String(state.head);
    token.value = state.token == null ? (state.view === "neuron" ? String(info.query_tokens.length - 1) : "") : String(state.token);
    filter.value = state.filter;
    stat.value = state.stat;
    $("#tzv-layer-prev").disabled = state.layer <= 0;
    $("#tzv-layer-next").disabled = state.layer >= info.n_layers - 1;
  }

  return { sync };
}
