// A feature's dashboard (GET /api/graphs/{slug}/features/{layer}/{index}): frequency,
// activation histogram, top and bottom logits, and the top contexts with each token
// shaded by the feature's activation on it.

import { el, svgEl, displayToken, fmt, percent } from "tzoo/circuits/dom.js";

function histogram(data) {
  const counts = data.counts || [];
  if (!counts.length) return el("p", { class: "muted", text: "Never active on the corpus." });
  const width = 260;
  const height = 70;
  const max = Math.max(...counts);
  const bar = width / counts.length;
  const svg = svgEl("svg", {
    class: "cg-histogram",
    width,
    height: height + 16,
    viewBox: `0 0 ${width} ${height + 16}`,
    role: "img",
    "aria-label": `Histogram of activations from ${fmt(data.edges[0])} to ${fmt(data.edges[data.edges.length - 1])}`,
  });
  counts.forEach((count, k) => {
    const h = max ? (count / max) * height : 0;
    svg.append(svgEl("rect", { x: k * bar + 0.5, y: height - h, width: Math.max(1, bar - 1), height: h, class: "cg-histogram-bar" },
      svgEl("title", { text: `${fmt(data.edges[k])}–${fmt(data.edges[k + 1])}: ${count}` })));
  });
  svg.append(svgEl("text", { x: 0, y: height + 13, class: "cg-axis", text: fmt(data.edges[0]) }));
  svg.append(svgEl("text", { x: width, y: height + 13, class: "cg-axis end", text: fmt(data.edges[data.edges.length - 1]) }));
  return svg;
}

function logits(title, items, cls) {
  return el("div", { class: "cg-logits" },
    el("h4", { text: title }),
    items.length
      ? el("ol", { class: `cg-logit-list ${cls}` }, items.map((item) =>
        el("li", {}, el("span", { class: "cg-token", text: displayToken(item.token) }), " ", el("span", { class: "muted", text: fmt(item.logit) }))))
      : el("p", { class: "muted", text: "No unembedding to read." }));
}

/** One context: its tokens shaded by activation, the token it is about outlined. */
export function contextLine(context, scale) {
  const line = el("p", { class: "cg-context" });
  context.tokens.forEach((token, k) => {
    const value = context.activations[k] || 0;
    const strength = scale > 0 ? Math.max(0, Math.min(1, value / scale)) : 0;
    const span = el("span", {
      class: k === context.index ? "cg-ctx-token is-centre" : "cg-ctx-token",
      title: `${displayToken(token)}: ${fmt(value)}`,
      text: displayToken(token),
    });
    span.style.setProperty("--strength", strength.toFixed(3));
    if (value > 0) span.dataset.active = "true";
    line.append(span);
  });
  return line;
}

/**
 * The dashboard as DOM; a stored one (with a ``slug``) links to its permalink unless
 * ``permalink`` is false (on that page itself).
 */
export function renderDashboard(dashboard, { permalink = true } = {}) {
  const scale = dashboard.max_activation || 0;
  const facts = el("dl", { class: "cg-facts" },
    el("dt", { text: "Frequency" }), el("dd", { text: `${percent(dashboard.frequency, 2)} of tokens` }),
    el("dt", { text: "Active" }), el("dd", { text: `${dashboard.n_active} of ${dashboard.n_tokens}` }),
    el("dt", { text: "Max activation" }), el("dd", { text: fmt(dashboard.max_activation) }),
    el("dt", { text: "Mean (active)" }), el("dd", { text: fmt(dashboard.mean_activation) }));
  const contexts = dashboard.top_contexts.length
    ? el("div", { class: "cg-contexts" }, dashboard.top_contexts.map((c) => contextLine(c, scale)))
    : el("p", { class: "muted", text: "No activating contexts in the corpus." });
  const quantiles = (dashboard.quantiles || []).filter((q) => q.contexts.length);
  const link = permalink && dashboard.slug
    ? el("p", { class: "cg-note" }, el("a", {
      class: "cg-dashboard-link", href: `/features/${encodeURIComponent(dashboard.slug)}`,
      text: "Permalink to this dashboard",
    }))
    : null;
  return el("div", { class: "cg-dashboard-body" },
    link,
    facts,
    el("h4", { text: "Activations" }),
    histogram(dashboard.histogram),
    el("div", { class: "cg-logit-columns" },
      logits("Top logits", dashboard.top_logits, "top"),
      logits("Bottom logits", dashboard.bottom_logits, "bottom")),
    el("h4", { text: "Top contexts" }),
    contexts,
    quantiles.length
      ? el("details", { class: "cg-quantiles" },
        el("summary", { text: "Contexts by activation quantile" }),
        quantiles.map((q) => el("div", {},
          el("h5", { text: `${fmt(q.low)} – ${fmt(q.high)} (${q.n_active} tokens)` }),
          q.contexts.map((c) => contextLine(c, scale)))))
      : null);
}
