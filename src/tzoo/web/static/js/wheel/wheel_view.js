// The wheel itself: an SVG pie with one wedge per segment, a fixed pointer at 12 o'clock,
// and a tooltip. On the wheel page the wedges are buttons (click, Enter/Space; arrow keys
// move between them); on the replay page they are a picture and the table holds the
// numbers. Colours are CSS classes (wheel.css) so that the theme switch needs no redraw.
//
// Every token text goes in with d3's .text() or textContent, never as markup.

import { clear, el, prefersReducedMotion } from "tzoo/wheel/dom.js";
import { percent, shortToken, spokenPercent, spokenToken, visibleToken } from "tzoo/wheel/format.js";
import { landingRotation, mod360 } from "tzoo/wheel/geometry.js";

const d3 = globalThis.d3;

/** Token colours cycle through this many classes (wheel-c0 ... wheel-c8). */
export const PALETTE_SIZE = 9;
const SIZE = 440; // viewBox side
const RADIUS = 196; // outer radius of the wedges
const HUB = 46; // inner radius: the Spin button sits in this hole
const TIP_SAMPLES = 8;
let instances = 0;

/** The colour class of a segment (shared with the table's swatches). */
export function colourClass(segment) {
  return segment.kind === "other" ? "wheel-other" : `wheel-c${segment.index % PALETTE_SIZE}`;
}

/** The accessible name of a segment: "token ' Paris', 41.2 percent". */
export function segmentLabel(segment) {
  if (segment.kind === "other") {
    const n = segment.count ?? 0;
    return `other: ${n} more token${n === 1 ? "" : "s"}, ${spokenPercent(segment.probability)}`;
  }
  return `token ${spokenToken(segment.text)}, ${spokenPercent(segment.probability)}`;
}

/**
 * Draw a wheel into `host`.
 * @param {HTMLElement} host an empty element (becomes position: relative)
 * @param {{ interactive?: boolean, label?: string,
 *           onChoose?: (segment: import("./geometry.js").Segment) => void,
 *           onHover?: (segment: import("./geometry.js").Segment | null) => void }} [options]
 */
export function createWheel(host, { interactive = true, label = "Next-token wheel", onChoose = () => {}, onHover = () => {} } = {}) {
  const uid = ++instances;
  host.classList.add("wheel-host");
  const svg = d3.select(host).append("svg")
    .attr("class", "wheel-svg")
    .attr("viewBox", `${-SIZE / 2} ${-SIZE / 2} ${SIZE} ${SIZE}`)
    .attr("role", interactive ? "group" : "img")
    .attr("aria-label", label);
  const hatch = `wheel-hatch-${uid}`;
  svg.append("defs").append("pattern")
    .attr("id", hatch).attr("patternUnits", "userSpaceOnUse").attr("width", 8).attr("height", 8)
    .attr("patternTransform", "rotate(45)")
    .call((p) => {
      p.append("rect").attr("class", "wheel-hatch-bg").attr("width", 8).attr("height", 8);
      p.append("rect").attr("class", "wheel-hatch-line").attr("width", 3).attr("height", 8);
    });
  svg.append("circle").attr("class", "wheel-rim").attr("r", RADIUS + 8);
  const rotor = svg.append("g").attr("class", "wheel-rotor");
  svg.append("circle").attr("class", "wheel-hub").attr("r", HUB - 3).attr("aria-hidden", "true");
  const hubText = svg.append("text").attr("class", "wheel-hub-text").attr("text-anchor", "middle").attr("dy", "0.35em").attr("aria-hidden", "true");
  svg.append("path").attr("class", "wheel-pointer").attr("aria-hidden", "true")
    .attr("d", `M -13 ${-RADIUS - 20} L 13 ${-RADIUS - 20} L 0 ${-RADIUS + 4} Z`);
  const empty = svg.append("text").attr("class", "wheel-empty").attr("text-anchor", "middle").attr("dy", "0.35em").attr("y", -HUB - 40);

  const tip = el("div", { class: "wheel-tip", role: "tooltip", id: `wheel-tip-${uid}`, hidden: true });
  host.append(tip);

  const arc = d3.arc().innerRadius(HUB).outerRadius(RADIUS).padAngle(0.004).padRadius(RADIUS).cornerRadius(2);
  const rad = (deg) => (deg * Math.PI) / 180;
  let rotation = 0;
  /** @type {import("./geometry.js").Segment[]} */
  let segments = [];
  let highlighted = null;

  function setRotation(value) {
    rotation = value;
    rotor.attr("transform", `rotate(${value})`);
    svg.attr("data-rotation", String(mod360(value)));
  }
  setRotation(0);

  /** Draw `list`; `highlight` names a segment key to pull out and outline. */
  function render(list, { highlight = null, emptyText = "No tokens to show." } = {}) {
    const hadFocus = host.contains(document.activeElement) && document.activeElement?.classList?.contains("wheel-seg");
    const focusedIndex = hadFocus ? Number(document.activeElement.dataset.index) : -1;
    segments = list;
    highlighted = highlight;
    rotor.selectAll("*").remove();
    hideTip();
    svg.attr("data-segments", String(list.length)).attr("data-landed", null).attr("data-target", null);
    empty.text(list.length ? "" : emptyText);
    const groups = rotor.selectAll("g.wheel-seg").data(list, (s) => s.key).join("g")
      .attr("class", (s) => `wheel-seg ${colourClass(s)}${s.key === highlight ? " is-chosen" : ""}`)
      .attr("data-key", (s) => s.key)
      .attr("data-index", (s, i) => String(i))
      .attr("data-start", (s) => s.start.toFixed(4))
      .attr("data-end", (s) => s.end.toFixed(4));
    rotor.classed("has-choice", Boolean(highlight));
    if (interactive) {
      groups.attr("role", "button")
        .attr("tabindex", (s, i) => (i === Math.max(0, focusedIndex) ? "0" : "-1"))
        .attr("aria-label", segmentLabel)
        .attr("aria-describedby", (s) => (s.kind === "other" ? "wheel-other" : null));
    } else {
      groups.attr("aria-hidden", "true");
    }
    groups.append("path")
      .attr("class", "wheel-wedge")
      .attr("d", (s) => arc({ startAngle: rad(s.start), endAngle: rad(s.end) }))
      .attr("fill", (s) => (s.kind === "other" ? `url(#${hatch})` : null));
    groups.filter((s) => s.end - s.start >= 7).each(function drawLabel(s) {
      const mid = (s.start + s.end) / 2;
      const flip = mod360(mid + rotation) > 180; // on the left as drawn now: read from the rim inwards
      const text = d3.select(this).append("text")
        .attr("class", "wheel-label")
        .attr("transform", flip ? `rotate(${mid + 90}) translate(${-(RADIUS - 14)},0)` : `rotate(${mid - 90}) translate(${RADIUS - 14},0)`)
        .attr("text-anchor", flip ? "start" : "end")
        .attr("dy", "0.35em");
      const span = s.end - s.start;
      const name = s.kind === "other" ? "Other" : shortToken(s.text, span >= 30 ? 13 : span >= 14 ? 9 : 5);
      fitLabel(text, name, span >= 20 ? percent(s.probability) : null, flip);
    });
    if (interactive) {
      groups
        .on("click", (event, s) => onChoose(s))
        .on("keydown", keydown)
        .on("focus", (event, s) => { showTip(event.currentTarget, s); onHover(s); })
        .on("blur", () => { hideTip(); onHover(null); });
    }
    groups
      .on("mouseenter", (event, s) => { showTip(event.currentTarget, s); onHover(s); })
      .on("mouseleave", (event) => {
        if (event.currentTarget !== document.activeElement) { hideTip(); onHover(null); }
      });
    if (hadFocus) focusIndex(Math.min(Math.max(focusedIndex, 0), list.length - 1));
  }

  /**
   * Fill a wedge's label with the token and (room permitting) its percentage, shortening
   * the token until the label fits between the rim and the hub. The percentage sits at
   * the rim on both halves.
   */
  function fitLabel(text, name, pct, flip) {
    const room = RADIUS - HUB - 26;
    let chars = Array.from(name);
    const fill = (withPct) => {
      text.selectAll("tspan").remove();
      const label = chars.join("") + (chars.length < Array.from(name).length ? "…" : "");
      const parts = [["name", label]];
      if (withPct && pct) parts[flip ? "unshift" : "push"](["pct", pct]);
      parts.forEach(([cls, value], i) => {
        text.append("tspan").attr("class", `wheel-label-${cls}`).attr("dx", i ? "0.4em" : null).text(value);
      });
    };
    fill(true);
    const length = () => text.node().getComputedTextLength?.() || 0; // 0 while hidden: keep it all
    if (length() > room) fill(false);
    while (length() > room && chars.length > 1) {
      chars = chars.slice(0, -1);
      fill(false);
    }
  }

  /** @param {KeyboardEvent} event */
  function keydown(event, s) {
    const i = segments.indexOf(s);
    const moves = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: segments.length - 1 };
    if (event.key in moves) {
      event.preventDefault();
      focusIndex((moves[event.key] + segments.length) % segments.length);
    } else if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      onChoose(s);
    }
  }

  /** Move the roving tab stop to segment `i` and focus it. */
  function focusIndex(i) {
    const nodes = rotor.selectAll("g.wheel-seg").nodes();
    if (!nodes.length || i < 0) return;
    nodes.forEach((node, j) => node.setAttribute("tabindex", j === i ? "0" : "-1"));
    nodes[i].focus();
  }

  function showTip(node, s) {
    if (svg.classed("is-spinning")) return; // segments pass under a resting mouse
    clear(tip);
    if (s.kind === "other") {
      tip.append(el("strong", {}, `Other: ${s.count ?? 0} tokens`), el("span", { class: "wheel-tip-pct" }, ` ${percent(s.probability)}`));
      const samples = (s.samples || []).slice(0, TIP_SAMPLES);
      if (samples.length) {
        tip.append(el("div", { class: "wheel-tip-note" }, "For example:"),
          el("ul", { class: "wheel-tip-samples" }, ...samples.map((t) => el("li", {},
            el("span", { class: "wheel-token" }, shortToken(t.text, 20)), " ", el("span", { class: "wheel-tip-pct" }, percent(t.probability))))));
      }
    } else {
      tip.append(el("strong", { class: "wheel-token" }, visibleToken(s.text)),
        el("span", { class: "wheel-tip-pct" }, ` ${percent(s.probability)}`),
        el("div", { class: "wheel-tip-note" }, `token id ${s.id}`));
    }
    tip.hidden = false;
    const box = host.getBoundingClientRect();
    const seg = node.getBoundingClientRect();
    const x = seg.left + seg.width / 2 - box.left;
    const y = seg.top + seg.height / 2 - box.top;
    tip.style.left = `${Math.min(Math.max(x, 0), box.width)}px`;
    tip.style.top = `${Math.min(Math.max(y, 0), box.height)}px`;
    tip.classList.toggle("is-left", x > box.width / 2);
  }

  function hideTip() {
    tip.hidden = true;
  }

  /**
   * Spin so that `segment` ends under the pointer; resolves true when it got there, false
   * when interrupted. With reduced motion the wheel turns at once.
   * @param {import("./geometry.js").Segment} segment
   * @param {{ duration?: number, turns?: number, r?: number }} [options]
   */
  function spin(segment, { duration = 2600, turns = 5, r = Math.random() } = {}) {
    hideTip();
    rotor.interrupt();
    const from = rotation;
    const reduced = prefersReducedMotion();
    const to = landingRotation(from, segment, { turns: reduced ? 0 : turns, r });
    svg.classed("is-spinning", true).attr("data-target", segment.key);
    return new Promise((resolve) => {
      const done = (landed) => {
        svg.classed("is-spinning", false);
        if (landed) {
          setRotation(mod360(to));
          rotor.classed("has-choice", true).selectAll("g.wheel-seg").classed("is-landed", (s) => s.key === segment.key);
          svg.attr("data-landed", segment.key);
        }
        resolve(landed);
      };
      if (reduced || duration <= 0) {
        setRotation(to);
        done(true);
        return;
      }
      rotor.transition().duration(duration).ease(d3.easeCubicOut)
        .attrTween("transform", () => (t) => {
          const value = from + (to - from) * t;
          rotation = value;
          return `rotate(${value})`;
        })
        .on("end", () => done(true))
        .on("interrupt", () => done(false));
    });
  }

  return {
    svg: svg.node(),
    render,
    spin,
    /** Stop a spin in progress. */
    stop: () => rotor.interrupt(),
    /** Put the wheel back at rest with no rotation. */
    reset: () => setRotation(0),
    /** Focus the first (or the `i`-th) segment. */
    focus: (i = 0) => focusIndex(i),
    /** Turn the wheel, at once, so that the middle of `segment` sits under the pointer. */
    centre: (segment) => setRotation(mod360(-(segment.start + segment.end) / 2)),
    /** Write a short text in the hub (the replay's step number); "" clears it. */
    setHub: (text) => hubText.text(text),
    /** Set the wheel's accessible name (e.g. the replay step it shows). */
    setLabel: (text) => svg.attr("aria-label", text),
    get rotation() { return rotation; },
    get segments() { return segments; },
    get highlighted() { return highlighted; },
  };
}
