// Colours that follow the light/dark theme: read from CSS custom properties, so the
// stylesheet stays the one place that defines them.

const d3 = globalThis.d3;

/**
 * The current theme's colours (CSS variables on the explorer's root).
 * @returns {{ dark: boolean, bg: string, card: string, fg: string, muted: string, line: string,
 *             accent: string, rampLow: string, rampHigh: string, negative: string, positive: string }}
 */
export function themeColors(node = document.querySelector(".tzv") || document.documentElement) {
  const css = getComputedStyle(node);
  const get = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  return {
    dark: document.documentElement.dataset.theme === "dark",
    bg: get("--bg", "#fbfbfd"),
    card: get("--card", "#ffffff"),
    fg: get("--fg", "#1d1f24"),
    muted: get("--muted", "#5d6370"),
    line: get("--line", "#dcdfe6"),
    accent: get("--accent", "#2f5bd3"),
    rampLow: get("--tzv-ramp-low", "#ffffff"),
    rampHigh: get("--tzv-ramp-high", "#08306b"),
    negative: get("--tzv-negative", "#2166ac"),
    positive: get("--tzv-positive", "#b2182b"),
  };
}

/**
 * One distinct colour per head: Tableau 10 up to ten heads (BertViz uses a 10-colour
 * scheme too); beyond that, hues evenly spaced in HCL with alternating lightness so that
 * neighbours differ. Brighter on dark backgrounds.
 * @param {number} count
 * @param {boolean} dark
 * @returns {string[]}
 */
export function headColors(count, dark) {
  if (count <= 10) {
    return d3.schemeTableau10.slice(0, count).map((c) => (dark ? d3.hcl(c).brighter(0.35).formatHex() : c));
  }
  return Array.from({ length: count }, (_, h) => {
    const hue = (250 + (h * 360) / count) % 360;
    const lightness = (dark ? 70 : 55) + (h % 2 ? -8 : 0);
    return d3.hcl(hue, dark ? 55 : 62, lightness).formatHex();
  });
}

/**
 * Attention weight (0..1) to colour, from the card colour to a strong ink. A gamma below
 * one lifts small weights so that diffuse heads stay visible.
 * @returns {(t: number) => string}
 */
export function attentionRamp(colors = themeColors()) {
  const mix = d3.interpolateLab(colors.rampLow, colors.rampHigh);
  return (t) => mix(Math.pow(Math.min(1, Math.max(0, t)), 0.5));
}

/**
 * A 256-entry RGB lookup table of a colour function over 0..1, for canvas pixel loops.
 * @param {(t: number) => string} colour
 * @returns {Uint8ClampedArray} r,g,b triples
 */
export function lookupRgb(colour) {
  const table = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const c = d3.rgb(colour(i / 255));
    table.set([c.r, c.g, c.b], i * 3);
  }
  return table;
}

/**
 * Signed value (-1..1) to colour: negative hue, the card colour at zero, positive hue.
 * @returns {(t: number) => string}
 */
export function divergingRamp(colors = themeColors()) {
  const neg = d3.interpolateLab(colors.rampLow, colors.negative);
  const pos = d3.interpolateLab(colors.rampLow, colors.positive);
  return (t) => (t < 0 ? neg(Math.min(1, -t)) : pos(Math.min(1, t)));
}

/** Perceptually uniform sequential colours for statistics (viridis, readable in both themes). */
export function statRamp() {
  return d3.interpolateViridis;
}

/** Black or white, whichever reads better on `background`. */
export function textOn(background) {
  const c = d3.rgb(background);
  const luminance = (0.2126 * c.r + 0.7152 * c.g + 0.0722 * c.b) / 255;
  return luminance > 0.55 ? "#111318" : "#ffffff";
}
