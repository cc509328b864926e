// The wheel's arithmetic, apart from any drawing: segments with angles proportional to
// probability, a weighted choice, and the rotation that lands a chosen segment under the
// pointer. Angles are degrees, clockwise from 12 o'clock (d3.arc's convention), and the
// pointer sits at 0°.

/**
 * One wedge of the wheel.
 * @typedef {{ key: string, kind: "token" | "other", index: number, id: number | null,
 *             text: string, probability: number, count?: number,
 *             samples?: {id: number, text: string, probability: number}[],
 *             start: number, end: number }} Segment
 */

/**
 * The wheel's segments of a next-token distribution: one per token (in the server's
 * order, most likely first) and one "Other" wedge when it holds any probability. The
 * angles share the full circle in proportion to probability.
 * @param {{ tokens: {id: number, text: string, probability: number}[],
 *           other?: {probability: number, count: number, samples?: any[]} | null }} dist
 * @returns {Segment[]}
 */
export function segmentsOf(dist) {
  /** @type {Segment[]} */
  const segments = (dist?.tokens || []).map((t, index) => ({
    key: `t${t.id}`, kind: "token", index, id: t.id, text: t.text, probability: Number(t.probability), start: 0, end: 0,
  }));
  const other = dist?.other;
  if (other && Number(other.probability) > 0) {
    segments.push({
      key: "other", kind: "other", index: segments.length, id: null, text: "Other",
      probability: Number(other.probability), count: other.count, samples: other.samples || [], start: 0, end: 0,
    });
  }
  const total = segments.reduce((sum, s) => sum + Math.max(0, s.probability), 0);
  let angle = 0;
  for (const s of segments) {
    s.start = angle;
    angle += total > 0 ? (360 * Math.max(0, s.probability)) / total : 360 / segments.length;
    s.end = angle;
  }
  if (segments.length) segments[segments.length - 1].end = 360; // no sliver from rounding
  return segments;
}

/**
 * Choose a segment with probability proportional to its size.
 * @param {Segment[]} segments
 * @param {number} [r] a uniform number in [0, 1), Math.random() by default
 * @returns {Segment | null}
 */
export function pickSegment(segments, r = Math.random()) {
  if (!segments.length) return null;
  const at = Math.min(Math.max(r, 0), 1) * 360;
  return segments.find((s) => at < s.end) || segments[segments.length - 1];
}

/** `value` modulo 360, in [0, 360). */
export function mod360(value) {
  return ((value % 360) + 360) % 360;
}

/**
 * The rotation (degrees, growing clockwise) that brings a point inside `segment` under
 * the pointer after `turns` whole turns from `current`. The point is `r` of the way
 * across the segment's middle 70 %, so the wheel never stops on a border.
 * @param {number} current the wheel's rotation now
 * @param {Segment} segment
 * @param {{ turns?: number, r?: number }} [options]
 */
export function landingRotation(current, segment, { turns = 5, r = 0.5 } = {}) {
  const width = segment.end - segment.start;
  const target = segment.start + width * (0.15 + 0.7 * Math.min(Math.max(r, 0), 1));
  // A point at angle `target` shows at `target + rotation`; the pointer is at 0.
  return current + turns * 360 + mod360(-target - current);
}

/**
 * The segment under the pointer when the wheel is turned by `rotation` degrees.
 * @param {Segment[]} segments
 * @param {number} rotation
 * @returns {Segment | null}
 */
export function segmentAtPointer(segments, rotation) {
  const at = mod360(-rotation);
  return segments.find((s) => at >= s.start && at < s.end) || null;
}
