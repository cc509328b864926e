// How tokens and numbers read on the lens page. Token strings arrive decoded (" Paris",
// "\n"); on labels their invisible characters get visible stand-ins.

import { shortToken as shortWheelToken } from "tzoo/wheel/format.js";

// Tokens and probabilities read as on the wheel pages.
export { percent, spokenToken, visibleToken } from "tzoo/wheel/format.js";

/** `visibleToken`, cut with an ellipsis past `max` characters (heat-map cells are narrow). */
export function shortToken(text, max = 8) {
  return shortWheelToken(text, max);
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
