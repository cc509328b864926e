// How tokens and numbers read on the lens page. Token strings arrive decoded (" Paris",
// "\n"); on labels their invisible characters get visible stand-ins.

const STAND_INS = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };
const SPOKEN = { " ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return" };

/**
 * A token as a label: a leading space becomes "␣", newlines "↵", tabs "⇥"; a token of
 * only whitespace shows every character; the empty token shows "∅".
 * @param {string} text
 */
export function visibleToken(text) {
  const raw = String(text ?? "");
  if (raw === "") return "∅";
  if (raw.trim() === "") return Array.from(raw, (ch) => STAND_INS[ch] ?? ch).join("");
  const lead = raw.startsWith(" ") ? "␣" + raw.slice(1) : raw;
  return lead.replace(/[\n\t\r]/g, (ch) => STAND_INS[ch]);
}

/** `visibleToken`, cut with an ellipsis past `max` characters. */
export function shortToken(text, max = 8) {
  const chars = Array.from(visibleToken(text));
  return chars.length > max ? chars.slice(0, max - 1).join("") + "…" : chars.join("");
}

/** A token for a screen reader: its text in quotes, or the names of its whitespace. */
export function spokenToken(text) {
  const raw = String(text ?? "");
  if (raw === "") return "empty token";
  if (raw.trim() !== "") return `'${raw.replace(/\n/g, "↵")}'`;
  return Array.from(raw, (ch) => SPOKEN[ch] || "whitespace").join(" ");
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

/** A quantity in nats: two decimals, one from 100 on ("–" when not a number). */
export function nats(x) {
  const value = Number(x);
  if (x == null || !Number.isFinite(value)) return "–";
  return value.toFixed(Math.abs(value) >= 100 ? 1 : 2);
}

/** Seconds as "0.42 s" / "12.3 s" / "125 s". */
export function seconds(s) {
  const value = Number(s);
  if (!Number.isFinite(value)) return "–";
  return `${value.toFixed(value < 10 ? 2 : value < 100 ? 1 : 0)} s`;
}

/**
 * A lens row's label: layer 0 is the embedding output ("embed"), the last the model's
 * own output ("output"), the others the output of that many blocks.
 * @param {number} layer
 * @param {number} last the largest layer index (the model's block count)
 */
export function layerLabel(layer, last) {
  if (layer === 0) return "embed";
  if (layer === last) return "output";
  return String(layer);
}

/** The same, for a screen reader: "the embeddings", "layer 3", "the output". */
export function spokenLayer(layer, last) {
  if (layer === 0) return "the embeddings (layer 0)";
  if (layer === last) return `the output (layer ${layer})`;
  return `layer ${layer}`;
}

/**
 * Where a request stands in the queue: position 0 is running now.
 * @param {number} position 1-based; 0 = running
 * @param {number} size requests in the queue
 */
export function queueText(position, size) {
  if (!position) return "Running…";
  return `Queued — position ${position} of ${size}`;
}
