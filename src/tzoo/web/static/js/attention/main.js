// The attention explorer: reads the metadata, keeps the state in the URL hash, and shows
// one view at a time (head, model, neuron, statistics). The same modules run on the
// site (/viz/{slug}) and inside a standalone HTML export.
//
// Usage: <script type="module">import { start } from "tzoo/attention/main.js"; start();</script>

import { createControls } from "tzoo/attention/controls.js";
import { createSource, loadMeta } from "tzoo/attention/data.js";
import { saveView } from "tzoo/attention/export.js";
import { createHeadView } from "tzoo/attention/head_view.js";
import { createModelView } from "tzoo/attention/model_view.js";
import { createNeuronView } from "tzoo/attention/neuron_view.js";
import { createNotes, noNotes } from "tzoo/attention/notes.js";
import { themeColors } from "tzoo/attention/palette.js";
import { createStore, formatHash, normalize, parseHash } from "tzoo/attention/state.js";
import { createStatsView } from "tzoo/attention/stats_view.js";
import { initStandaloneTheme, onThemeChange } from "tzoo/attention/theme.js";

const FACTORIES = { head: createHeadView, model: createModelView, neuron: createNeuronView, stats: createStatsView };

/**
 * Start the explorer in `root` (default: #tzoo-attention).
 * @returns {Promise<{ store: any, meta: any } | null>}
 */
export async function start(root = document.getElementById("tzoo-attention")) {
  const statusLine = root.querySelector("#tzv-status");
  const status = (text) => {
    statusLine.textContent = text;
  };
  initStandaloneTheme(root.querySelector("#tzv-theme-toggle"));
  let meta;
  try {
    meta = await loadMeta(root);
  } catch (error) {
    status(`Could not load this visualization: ${error.message || error}`);
    return null;
  }
  const source = createSource(meta, { root });
  const store = createStore(normalize(meta, parseHash(location.hash)), (s) => normalize(meta, s));
  let push = false;
  /** Change the state; `asNewEntry` makes it a history entry (Back returns to the last view). */
  const navigate = (patch, asNewEntry = false) => {
    push = asNewEntry;
    store.set(patch);
  };
  const readonly = source.embedded || root.dataset.readonly === "true";
  const notes = readonly ? noNotes() : createNotes({ root, meta, store, navigate });
  const controls = createControls({ root, meta, store, notes, navigate });

  const views = {};
  const view = (name) => {
    views[name] ??= FACTORIES[name]({ panel: root.querySelector(`#tzv-panel-${name}`), store, source, meta, notes, navigate, status });
    return views[name];
  };

  function writeHash(state) {
    const hash = "#" + formatHash(state);
    if (location.hash === hash) return;
    try {
      history[push ? "pushState" : "replaceState"](null, "", hash);
    } catch {
      /* about:srcdoc in a sandboxed frame may refuse; the view still works */
    }
  }

  function show(state) {
    controls.sync(state);
    status("");
    view(state.view).render(state);
    writeHash(state);
    push = false;
  }

  store.subscribe(show);
  const fromHash = () => {
    const next = normalize(meta, parseHash(location.hash));
    if (formatHash(next) !== formatHash(store.get())) store.set(next);
  };
  window.addEventListener("hashchange", fromHash);
  window.addEventListener("popstate", fromHash);
  onThemeChange(() => view(store.get().view).refresh());
  notes.onChange(() => show(store.get()));

  for (const format of ["svg", "png"]) {
    root.querySelector(`#tzv-export-${format}`)?.addEventListener("click", async (event) => {
      const button = event.currentTarget;
      button.disabled = true;
      try {
        const target = await view(store.get().view).exportTarget();
        await saveView(target, format, { background: themeColors().bg, prefix: meta.slug || meta.model_name });
        status(`Saved the ${store.get().view} view as ${format.toUpperCase()}.`);
      } catch (error) {
        status(`Could not save: ${error.message || error}`);
      } finally {
        button.disabled = false;
      }
    });
  }

  show(store.get());
  notes.load();
  root.dataset.ready = "true";
  return { store, meta };
}
