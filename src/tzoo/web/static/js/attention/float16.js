// IEEE 754 half-precision decoding, and base64 to bytes. No DOM, no d3: testable anywhere.
// Float16Array is not in every browser yet, so the views decode the bytes themselves.

/**
 * The value of one float16 bit pattern.
 * @param {number} bits 0..65535
 * @returns {number}
 */
export function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24; // zero and subnormals
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/** @type {Float32Array | null} every bit pattern's value, built on first use (256 KiB) */
let table = null;

function lookupTable() {
  if (!table) {
    table = new Float32Array(65536);
    for (let bits = 0; bits < 65536; bits++) table[bits] = halfToFloat(bits);
  }
  return table;
}

/**
 * Little-endian float16 bytes to float32 values. Reads byte pairs, so it works on any
 * host byte order and any buffer offset.
 * @param {ArrayBuffer | Uint8Array} bytes
 * @returns {Float32Array}
 */
export function decodeFloat16(bytes) {
  const u8 = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  if (u8.length % 2) throw new RangeError(`float16 data has an odd byte count (${u8.length})`);
  const values = lookupTable();
  const out = new Float32Array(u8.length / 2);
  for (let i = 0, b = 0; i < out.length; i++, b += 2) out[i] = values[u8[b] | (u8[b + 1] << 8)];
  return out;
}

/**
 * Standard base64 (as Python's base64.b64encode writes it) to bytes.
 * @param {string} text
 * @returns {Uint8Array}
 */
export function base64ToBytes(text) {
  const binary = atob(text);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}
