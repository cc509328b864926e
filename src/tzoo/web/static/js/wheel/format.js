// How tokens and numbers read on the wheel pages. Token texts arrive decoded (" Paris",
// "\n"); on labels their invisible characters get visible stand-ins, while the generated
// text shows them exactly (white-space: pre-wrap).

const STAND_INS = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };

/**
 * A token as a label: a leading space becomes "␣", newlines "↵", tabs "⇥"; a token of
 * only whitespace shows every character; the empty token shows "∅".
 * @param {string} text
 * @returns {string}
 */
export function visibleToken(text) {
  const raw = String(text ?? "");
  if (raw === "") return "∅";
  if (raw.trim() === "") return Array.from(raw, (ch) => STAND_INS[ch] ?? ch).join("");
  const lead = raw.startsWith(" ") ? "␣" + raw.slice(1) : raw;
  return lead.replace(/[\n\t\r]/g, (ch) => STAND_INS[ch]);
}

/** `visibleToken`, cut with an ellipsis past `max` characters. */
export function shortToken(text, max = 12) {
  const chars = Array.from(visibleToken(text));
  return chars.length > max ? chars.slice(0, max - 1).join("") + "…" : chars.join("");
}

const SPOKEN = { " ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return" };

/**
 * A token for a screen reader: its text in quotes, or the names of its whitespace
 * ("newline", "2 spaces").
 * @param {string} text
 */
export function spokenToken(text) {
  const raw = String(text ?? "");
  if (raw === "") return "empty token";
  if (raw.trim() !== "") return `'${raw.replace(/\n/g, "↵")}'`;
  const names = Array.from(raw, (ch) => SPOKEN[ch] || "whitespace");
  if (names.every((n) => n === names[0]) && names.length > 1) return `${names.length} ${names[0]}s`;
  return names.join(" ");
}

/**
 * A probability as a percentage: one decimal, two below 1 %, "<0.01%" below that.
 * @param {number} p probability in 0..1
 */
export function percent(p) {
  const value = Number(p) * 100;
  if (!Number.isFinite(value)) return "–";
  if (value > 0 && value < 0.01) return "<0.01%";
  return `${value.toFixed(value < 1 ? 2 : 1)}%`;
}

/** A probability as words for aria-labels: "41.2 percent". */
export function spokenPercent(p) {
  return percent(p).replace("<", "less than ").replace("%", " percent");
}

const PARAM_NAMES = { temperature: "temperature", top_k: "top-k", top_p: "top-p" };

/**
 * Sampling parameters as a phrase: `{temperature: 0.7, top_k: 40}` ->
 * "temperature 0.7, top-k 40"; empty -> "".
 * @param {Record<string, number> | null | undefined} params
 */
export function paramsText(params) {
  return Object.entries(params || {})
    .filter(([name, value]) => name in PARAM_NAMES && value != null)
    .map(([name, value]) => `${PARAM_NAMES[name]} ${value}`)
    .join(", ");
}
