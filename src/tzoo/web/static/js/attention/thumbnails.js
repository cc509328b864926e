// Small pictures of one head's attention, drawn on a canvas: a heat map (queries down,
// keys across) or BertViz-style lines. Shared by the model view and its export.

/**
 * Heat map of `layer`'s head `h` into a square canvas of `size` device pixels. When the
 * matrix is larger than the canvas, cells are max-pooled so that a thin diagonal stays visible.
 * @param {HTMLCanvasElement} canvas
 * @param {import("tzoo/attention/data.js").AttentionLayer} layer
 * @param {number} h
 * @param {Uint8ClampedArray} lut  256 RGB triples (palette.lookupRgb)
 */
export function drawMatrix(canvas, layer, h, lut) {
  const { tq, tk } = layer;
  const size = canvas.width;
  const context = canvas.getContext("2d");
  const rows = Math.min(tq, size);
  const cols = Math.min(tk, size);
  const pooled = new Float32Array(rows * cols);
  for (let i = 0; i < tq; i++) {
    const r = Math.floor((i * rows) / tq);
    const row = layer.row(h, i);
    for (let j = 0; j < tk; j++) {
      const c = Math.floor((j * cols) / tk);
      const k = r * cols + c;
      if (row[j] > pooled[k]) pooled[k] = row[j];
    }
  }
  const image = new ImageData(cols, rows);
  for (let k = 0; k < pooled.length; k++) {
    const t = Math.max(0, Math.min(255, Math.round(pooled[k] * 255))) * 3;
    image.data[k * 4] = lut[t];
    image.data[k * 4 + 1] = lut[t + 1];
    image.data[k * 4 + 2] = lut[t + 2];
    image.data[k * 4 + 3] = 255;
  }
  const small = document.createElement("canvas");
  small.width = cols;
  small.height = rows;
  small.getContext("2d").putImageData(image, 0, 0);
  context.imageSmoothingEnabled = false;
  context.clearRect(0, 0, size, canvas.height);
  context.drawImage(small, 0, 0, size, canvas.height);
}

/**
 * BertViz-style lines: queries on the left edge, keys on the right, opacity = weight.
 * @param {HTMLCanvasElement} canvas
 * @param {import("tzoo/attention/data.js").AttentionLayer} layer
 * @param {number} h
 * @param {string} colour  the head's colour
 * @param {string} background
 */
export function drawLines(canvas, layer, h, colour, background) {
  const { tq, tk } = layer;
  const w = canvas.width;
  const ht = canvas.height;
  const pad = Math.max(2, w * 0.08);
  const context = canvas.getContext("2d");
  context.fillStyle = background;
  context.fillRect(0, 0, w, ht);
  context.strokeStyle = colour;
  context.lineWidth = Math.max(1, w / 90);
  const y = (i, n) => pad + ((i + 0.5) * (ht - 2 * pad)) / n;
  const threshold = Math.min(0.02, 0.5 / Math.max(tk, 1)); // a uniform row still shows, faintly
  for (let i = 0; i < tq; i++) {
    const row = layer.row(h, i);
    for (let j = 0; j < tk; j++) {
      if (row[j] < threshold) continue;
      context.globalAlpha = Math.min(1, row[j]);
      context.beginPath();
      context.moveTo(pad, y(i, tq));
      context.lineTo(w - pad, y(j, tk));
      context.stroke();
    }
  }
  context.globalAlpha = 1;
}
