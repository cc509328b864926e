// Head statistics: a layers x heads heat map of one statistic. Every cell is a link to
// that head in the head view (the same hash a reader could share).

import { clear, el, fmt } from "tzoo/attention/dom.js";
import { formatHash } from "tzoo/attention/state.js";
import { statRamp, textOn, themeColors } from "tzoo/attention/palette.js";

const d3 = globalThis.d3;

/** What each statistic means, for the caption and for screen readers. */
export const STAT_INFO = {
  entropy: { label: "Entropy", text: "How spread out each query's attention is, averaged over queries (nats). Low: the head looks at few tokens; high: it spreads evenly." },
  mean_distance: { label: "Mean distance", text: "How far back (in tokens) a head looks on average, weighting each distance by attention. Small: a local head." },
  sink: { label: "Sink", text: "The share of attention that goes to the first token, the usual 'attention sink' where heads park weight when they have nothing to do." },
  previous_token: { label: "Previous token", text: "The share of attention each token pays to the token just before it." },
  induction: { label: "Induction", text: "On repeated text, the attention from a token to the token that followed its earlier occurrence: the signature of induction heads." },
};

/**
 * @param {{ panel: HTMLElement, store: any, meta: any,
 *           navigate: (patch: object, push?: boolean) => void }} deps
 */
export function createStatsView({ panel, store, meta, navigate }) {
  const caption = el("p", { class: "tzv-caption" });
  const svg = d3.create("svg").attr("class", "tzv-svg tzv-statsvg").attr("role", "group");
  const ranking = el("ol", { class: "tzv-ranking" });
  const rankingTitle = el("h3", {}, "Strongest heads");
  clear(panel).append(
    caption,
    el("div", { class: "tzv-statswrap" },
      el("div", { class: "tzv-scroll tzv-scroll-wide" }, svg.node()),
      el("div", { class: "tzv-side" }, rankingTitle, ranking)),
  );

  function render(state) {
    const info = meta.stacks[state.stack];
    const values = meta.head_stats?.[state.stack]?.[state.stat];
    const about = STAT_INFO[state.stat];
    caption.replaceChildren(el("strong", {}, about.label), ` — ${about.text}`);
    svg.selectAll("*").remove();
    clear(ranking);
    if (!Array.isArray(values)) {
      caption.append(el("span", { class: "tzv-empty" }, " Not available for this stack."));
      return;
    }
    const colors = themeColors();
    const flat = values.flat().filter((v) => v != null && Number.isFinite(v));
    const [lo, hi] = flat.length ? d3.extent(flat) : [0, 1];
    const colour = d3.scaleSequential(statRamp()).domain([lo, hi === lo ? lo + 1e-9 : hi]);
    const width = panel.clientWidth || 800;
    const cw = Math.max(24, Math.min(56, Math.floor((width - 330) / info.n_heads)));
    const ch = Math.max(18, Math.min(34, cw * 0.7));
    const left = 64;
    const top = 26;
    const gridW = info.n_heads * cw;
    const legendX = left + gridW + 24;
    const W = legendX + 90;
    const H = Math.max(top + info.n_layers * ch + 10, 200);
    svg.attr("width", W).attr("height", H).attr("viewBox", `0 0 ${W} ${H}`)
      .attr("aria-label", `${about.label} of each head, layers by heads`);

    svg.append("g").attr("class", "sv-axis").selectAll("text").data(d3.range(info.n_heads)).join("text")
      .attr("x", (h) => left + h * cw + cw / 2).attr("y", 16).attr("text-anchor", "middle").text((h) => h);
    svg.append("text").attr("class", "sv-axis-title").attr("x", left - 8).attr("y", 16).attr("text-anchor", "end").text("head →");
    svg.append("g").attr("class", "sv-axis").selectAll("text").data(d3.range(info.n_layers)).join("text")
      .attr("x", left - 8).attr("y", (l) => top + l * ch + ch / 2).attr("dy", "0.35em").attr("text-anchor", "end").text((l) => `layer ${l}`);

    const cells = [];
    for (let l = 0; l < info.n_layers; l++) for (let h = 0; h < info.n_heads; h++) cells.push({ l, h, v: values[l]?.[h] });
    const link = svg.append("g").attr("class", "sv-cells").selectAll("a").data(cells).join("a")
      .attr("href", (c) => "#" + formatHash({ ...state, view: "head", layer: c.l, heads: [c.h], token: null, tokenEnd: null, key: null }))
      .attr("class", "sv-cell")
      .attr("data-layer", (c) => c.l).attr("data-head", (c) => c.h)
      .attr("aria-label", (c) => `Layer ${c.l}, head ${c.h}: ${about.label.toLowerCase()} ${fmt(c.v, 3)}. Open in the head view.`)
      .on("click", (event, c) => {
        event.preventDefault();
        navigate({ view: "head", layer: c.l, heads: [c.h], token: null, tokenEnd: null, key: null }, true);
      });
    const valid = (c) => c.v != null && Number.isFinite(c.v);
    link.append("rect")
      .attr("x", (c) => left + c.h * cw + 1).attr("y", (c) => top + c.l * ch + 1)
      .attr("width", cw - 2).attr("height", ch - 2).attr("rx", 2)
      .attr("fill", (c) => (valid(c) ? colour(c.v) : colors.line));
    link.append("title").text((c) => `Layer ${c.l}, head ${c.h}: ${fmt(c.v, 3)}`);
    if (cw >= 40) {
      link.append("text").attr("class", "sv-value")
        .attr("x", (c) => left + c.h * cw + cw / 2).attr("y", (c) => top + c.l * ch + ch / 2).attr("dy", "0.35em")
        .attr("text-anchor", "middle").style("fill", (c) => (valid(c) ? textOn(colour(c.v)) : colors.muted))
        .text((c) => (valid(c) ? fmt(c.v, Math.abs(hi) >= 10 ? 1 : 2) : "n/a"));
    }

    // Legend: a vertical gradient with its extremes.
    const gradientId = "sv-gradient";
    const gradient = svg.append("defs").append("linearGradient").attr("id", gradientId).attr("x1", 0).attr("x2", 0).attr("y1", 1).attr("y2", 0);
    d3.range(0, 1.0001, 0.1).forEach((t) => gradient.append("stop").attr("offset", t).attr("stop-color", colour(lo + t * (hi - lo))));
    const legendH = Math.min(160, info.n_layers * ch);
    svg.append("rect").attr("x", legendX).attr("y", top).attr("width", 14).attr("height", legendH).attr("fill", `url(#${gradientId})`);
    svg.append("g").attr("class", "sv-axis").selectAll("text").data([[hi, top + 8], [lo, top + legendH]]).join("text")
      .attr("x", legendX + 20).attr("y", (d) => d[1]).text((d) => fmt(d[0], 3));

    rankingTitle.textContent = state.stat === "entropy" ? "Lowest entropy (most focused)" : `Highest ${about.label.toLowerCase()}`;
    const strongest = cells.filter(valid).sort((a, b) => (state.stat === "entropy" ? a.v - b.v : b.v - a.v)).slice(0, 8);
    for (const c of strongest) {
      ranking.append(el("li", {}, el("a", {
        href: "#" + formatHash({ ...state, view: "head", layer: c.l, heads: [c.h], token: null, tokenEnd: null, key: null }),
        onclick: (event) => {
          event.preventDefault();
          navigate({ view: "head", layer: c.l, heads: [c.h], token: null, tokenEnd: null, key: null }, true);
        },
      }, `Layer ${c.l}, head ${c.h}`), ` ${fmt(c.v, 3)}`));
    }
  }

  return {
    render,
    refresh: () => render(store.get()),
    exportTarget: () => ({ svg: svg.node(), name: `stats-${store.get().stack}-${store.get().stat}` }),
  };
}
