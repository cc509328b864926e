// The explain panel: run the circuit agent on the graph (the strongest paths into one
// token's logit, features labelled), follow the job's progress, show the answer, and
// list the graph's stored explanations. An answer's permalink is
// /graph/{slug}?explanation={id}. A feature step that is also a node of the stored graph
// is a button that selects that node.

import { getJSON, postJSON } from "tzoo/circuits/api.js";
import { el, clear, displayToken, fmt, percent } from "tzoo/circuits/dom.js";

const POLL_MS = 500;
const STAGES = {
  queued: "Waiting for the model",
  loading: "Loading the model and transcoders",
  graph: "Tracing the attribution graph",
  dashboards: "Building feature dashboards",
  labels: "Labelling features",
  saving: "Saving the answer",
};
const OTHER = "other";

/**
 * @param {HTMLElement} root the #cg-explain section
 * @param {{ page: object, graph: object, onSelect: (id: string) => void, opener: HTMLElement }} options
 */
export function createExplanations(root, { page, graph, onSelect, opener }) {
  const api = `${page.api}/explanations`;
  const form = root.querySelector("#cg-explain-form");
  const choice = root.querySelector("#cg-explain-target");
  const otherBox = root.querySelector("#cg-explain-other");
  const tokenInput = root.querySelector("#cg-explain-token");
  const pathsInput = root.querySelector("#cg-explain-paths");
  const labelBox = root.querySelector("#cg-explain-label");
  const run = root.querySelector("#cg-explain-run");
  const error = root.querySelector("#cg-explain-error");
  const progressBox = root.querySelector("#cg-explain-progress-box");
  const progress = root.querySelector("#cg-explain-progress");
  const stage = root.querySelector("#cg-explain-stage");
  const result = root.querySelector("#cg-explain-result");
  const savedList = root.querySelector("#cg-explain-saved");
  const savedEmpty = root.querySelector("#cg-explain-saved-empty");
  let current = 0; // the run (or shown answer) that may still write to the panel

  // -- the form ---------------------------------------------------------------------------
  const { info } = graph;
  info.logit_tokens.forEach((token, k) => {
    const text = `${displayToken(info.logit_strings[k])} (${percent(info.logit_probabilities[k])})`;
    choice.append(el("option", { value: String(token), text }));
  });
  choice.append(el("option", { value: OTHER, text: "Another token…" }));
  pathsInput.max = String(page.max_paths);
  pathsInput.value = String(page.default_paths);
  tokenInput.maxLength = page.max_target_chars;
  const showOther = () => {
    otherBox.hidden = choice.value !== OTHER;
  };
  choice.addEventListener("change", () => {
    showOther();
    if (choice.value === OTHER) tokenInput.focus();
  });
  showOther();

  opener.addEventListener("click", () => {
    setOpen(root.hidden);
    if (!root.hidden) root.querySelector("#cg-explain-heading").focus();
  });

  function setOpen(open) {
    root.hidden = !open;
    opener.setAttribute("aria-expanded", String(open));
  }

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    const nPaths = Number(pathsInput.value);
    if (!Number.isInteger(nPaths) || nPaths < 1 || nPaths > page.max_paths) {
      showError(`The number of paths must be a whole number from 1 to ${page.max_paths}.`);
      pathsInput.focus();
      return;
    }
    let target;
    if (choice.value === OTHER) {
      target = tokenInput.value; // not trimmed: " Paris" and "Paris" are different tokens
      if (!target) {
        showError("Type the token to explain, e.g. “ Paris” (a leading space matters).");
        tokenInput.focus();
        return;
      }
    } else {
      target = Number(choice.value);
    }
    const mine = ++current;
    run.disabled = true;
    clear(result);
    root.dataset.state = "submitting";
    try {
      const job = await postJSON(api, { target, n_paths: nPaths, label: labelBox.checked });
      if (mine === current) await follow(job, mine);
    } catch (failure) {
      if (mine === current) {
        progressBox.hidden = true;
        root.dataset.state = "failed";
        showError(failure.message || String(failure));
      }
    } finally {
      if (mine === current) run.disabled = false;
    }
  });

  // -- following a job ----------------------------------------------------------------------
  async function follow(job, mine) {
    for (;;) {
      showProgress(job);
      if (job.state === "done") {
        progressBox.hidden = true;
        show(job);
        remember(job.explanation_id);
        await refreshSaved();
        return;
      }
      if (job.state === "failed") {
        progressBox.hidden = true;
        root.dataset.state = "failed";
        showError(job.error?.detail || "The explanation failed.");
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (mine !== current) return; // another run or answer took the panel
      job = await getJSON(`${api}/${encodeURIComponent(job.job_id)}`);
      if (mine !== current) return;
    }
  }

  function showProgress(job) {
    root.dataset.state = job.state;
    progressBox.hidden = false;
    const key = job.state === "queued" ? "queued" : job.stage || "loading";
    progressBox.dataset.stage = key;
    let text = STAGES[key] || key;
    if (job.total > 0) {
      progress.max = job.total;
      progress.value = job.done;
      text += ` ${job.done}/${job.total}`;
    } else {
      progress.removeAttribute("value"); // indeterminate
    }
    if (job.state === "queued" && job.position > 1) text += ` (${job.position - 1} ahead)`;
    stage.textContent = `${text}…`;
  }

  // -- showing an answer ----------------------------------------------------------------------
  function show(job) {
    const answer = job.answer;
    root.dataset.state = "done";
    clear(result);
    result.dataset.id = job.explanation_id;
    const heading = el("p", { class: "cg-explain-summary", id: "cg-explain-summary" },
      "Target ", el("span", { class: "cg-token", text: displayToken(answer.target_text) }),
      ` (token ${answer.target_token}) at position ${answer.target_position}: probability ${probability(answer.target_probability)}`,
      job.explainer ? ` · labels by ${job.explainer}` : " · not labelled");
    const list = el("ol", { class: "cg-paths", id: "cg-explain-paths-list" });
    for (const path of answer.paths) list.append(pathRow(path));
    result.append(heading);
    if (answer.paths.length) result.append(list);
    else result.append(el("p", { class: "muted", text: "No path reaches this logit." }));
    if (job.url) {
      result.append(el("p", { class: "cg-note" }, "Permalink: ",
        el("a", { id: "cg-explain-permalink", href: job.url, text: job.url })));
    }
  }

  function pathRow(path) {
    const positive = path.sign > 0;
    const row = el("li", { class: `cg-path ${positive ? "positive" : "negative"}` },
      el("span", {
        class: `cg-path-strength ${positive ? "cg-up" : "cg-down"}`,
        title: `Strength ${fmt(path.strength)} (the share of the target's direct attribution along this path); ${positive ? "raises" : "lowers"} the logit`,
        text: `${positive ? "+" : "−"}${fmt(path.strength)}`,
      }));
    const steps = el("span", { class: "cg-steps" });
    path.steps.forEach((step, i) => {
      if (i > 0) {
        const weight = path.steps[i - 1].edge_to_next;
        steps.append(el("span", {
          class: `cg-arrow ${weight >= 0 ? "positive" : "negative"}`,
          title: `edge weight ${fmt(weight)}`,
          "aria-label": `edge weight ${fmt(weight)}`,
          text: "→",
        }));
      }
      steps.append(stepElement(step));
    });
    row.append(steps);
    return row;
  }

  function stepElement(step) {
    const at = `@${step.position}`;
    if (step.kind === "feature") {
      const name = `L${step.layer}#${step.feature} ${at}`;
      const parts = [el("span", { class: "cg-step-name", text: name })];
      if (step.label) parts.push(" ", el("span", { class: "cg-step-label", text: `“${step.label}”` }));
      const node = graphNode(step);
      if (node) {
        return el("button", {
          type: "button",
          class: "cg-step kind-feature cg-link-button",
          dataset: { nodeId: node.id },
          title: "Select this node in the graph",
          onclick: () => onSelect(node.id),
        }, ...parts);
      }
      return el("span", { class: "cg-step kind-feature", title: "Not among the stored graph's nodes (pruned)" }, ...parts);
    }
    if (step.kind === "token") return el("span", { class: "cg-step kind-token" }, el("span", { class: "cg-token", text: displayToken(step.text) }), ` ${at}`);
    if (step.kind === "logit") return el("span", { class: "cg-step kind-logit" }, "logit ", el("span", { class: "cg-token", text: displayToken(step.text) }));
    return el("span", { class: `cg-step kind-${step.kind}`, text: `${step.text} ${at}` });
  }

  /** The stored graph's node for a feature step, if the graph kept it. */
  function graphNode(step) {
    return graph.nodes.find((node) => node.kind === "feature" && node.layer === step.layer
      && node.feature === step.feature && node.position === step.position) || null;
  }

  // -- stored answers -------------------------------------------------------------------------
  async function open(id) {
    const mine = ++current;
    showError("");
    progressBox.hidden = true;
    run.disabled = false;
    try {
      const job = await getJSON(`${api}/${encodeURIComponent(id)}`);
      if (mine !== current) return;
      show(job);
      remember(id);
    } catch (failure) {
      if (mine === current) showError(failure.message || String(failure));
    }
  }

  /** Put the answer's id in the address, keeping a view's. */
  function remember(id) {
    const url = new URL(location.href);
    url.searchParams.set("explanation", id);
    history.replaceState(null, "", url);
  }

  async function refreshSaved() {
    let saved;
    try {
      saved = await getJSON(api);
    } catch {
      return; // the list is a convenience; the answer itself is shown
    }
    clear(savedList);
    savedEmpty.hidden = saved.length > 0;
    for (const item of saved) {
      const when = new Date(item.created_at).toLocaleString();
      const link = el("a", {
        href: `/graph/${encodeURIComponent(page.slug)}?explanation=${encodeURIComponent(item.id)}`,
        dataset: { id: item.id },
        onclick: (event) => {
          event.preventDefault();
          open(item.id);
        },
      }, el("span", { class: "cg-token", text: displayToken(item.target_text) }),
      ` · ${item.n_paths} path${item.n_paths === 1 ? "" : "s"}${item.label ? ", labelled" : ""}`);
      savedList.append(el("li", {}, link, el("span", { class: "muted", text: ` ${when}` })));
    }
  }

  refreshSaved();
  if (page.explanation) {
    setOpen(true);
    open(page.explanation);
  }
  return { open, setOpen };
}

/** A probability as a percentage, small ones in scientific notation. */
function probability(p) {
  if (p === null || p === undefined) return "–";
  return p >= 0.001 ? percent(p, 1) : fmt(p);
}
