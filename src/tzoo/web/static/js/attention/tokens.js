// How tokens read on screen: byte-level BPE and SentencePiece markers made visible.

const MARKERS = [
  [/^Ġ/, "␣"], // GPT-2 / llama byte-level: a leading space
  [/^▁/, "␣"], // SentencePiece (T5, llama): a leading space
];
const BYTES = { Ċ: "↵", ĉ: "⇥", "\n": "↵", "\t": "⇥", Ġ: "␣" };

/**
 * The label to draw for a token: leading-space markers become "␣", newlines "↵".
 * @param {string} token
 * @returns {string}
 */
export function displayToken(token) {
  let text = String(token ?? "");
  for (const [pattern, shown] of MARKERS) text = text.replace(pattern, shown);
  text = Array.from(text, (ch) => BYTES[ch] ?? ch).join("");
  if (text === "") return "∅";
  return text.trim() === "" ? text.replace(/ /g, "␣") : text; // a token of spaces stays visible
}

/** `displayToken`, shortened with an ellipsis past `max` characters. */
export function shortToken(token, max = 18) {
  const text = displayToken(token);
  const chars = Array.from(text);
  return chars.length > max ? chars.slice(0, max - 1).join("") + "…" : text;
}

/** The query and key positions a pair filter ("all", "ab", "ba", "aa", "bb") keeps. */
export function filterPositions(filter, tq, tk, bStart) {
  const all = (n) => Array.from({ length: n }, (_, i) => i);
  if (bStart == null || !filter || filter === "all") return { queries: all(tq), keys: all(tk) };
  const pick = (n, side) => all(n).filter((i) => (i >= bStart ? "b" : "a") === side);
  return { queries: pick(tq, filter[0]), keys: pick(tk, filter[1]) };
}
