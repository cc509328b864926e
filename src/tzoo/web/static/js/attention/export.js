// Save the current view as SVG or PNG. SVG views are cloned with their computed styles
// inlined (the file must look the same without our stylesheet); canvas views (the model
// view) are saved as PNG directly, or as an SVG that embeds that PNG.

/** Style properties that decide how SVG content looks. */
const STYLE_PROPS = [
  "fill", "fill-opacity", "stroke", "stroke-width", "stroke-opacity", "stroke-dasharray", "stroke-linecap",
  "opacity", "font-family", "font-size", "font-weight", "font-style", "text-anchor", "dominant-baseline",
  "text-transform", "letter-spacing", "font-variant-numeric",
  "visibility", "display", "image-rendering", "shape-rendering",
];

/**
 * A standalone SVG document of `svg` with computed styles inlined and a background.
 * @param {SVGSVGElement} svg
 * @param {string} background
 * @returns {{ text: string, width: number, height: number }}
 */
export function serializeSvg(svg, background) {
  const clone = /** @type {SVGSVGElement} */ (svg.cloneNode(true));
  const originals = [svg, ...svg.querySelectorAll("*")];
  const copies = [clone, ...clone.querySelectorAll("*")];
  originals.forEach((node, k) => {
    const computed = getComputedStyle(node);
    const inline = STYLE_PROPS.map((p) => `${p}:${computed.getPropertyValue(p)}`).join(";");
    copies[k].style.cssText = inline; // CSSOM: the page's CSP allows no style attributes
    copies[k].removeAttribute("class");
    copies[k].removeAttribute("tabindex");
  });
  const width = Number(svg.getAttribute("width")) || svg.getBoundingClientRect().width;
  const height = Number(svg.getAttribute("height")) || svg.getBoundingClientRect().height;
  clone.setAttribute("xmlns", "http://www.w3.org/2000/svg");
  clone.setAttribute("width", String(width));
  clone.setAttribute("height", String(height));
  const backdrop = document.createElementNS("http://www.w3.org/2000/svg", "rect");
  backdrop.setAttribute("width", "100%");
  backdrop.setAttribute("height", "100%");
  backdrop.setAttribute("fill", background);
  clone.insertBefore(backdrop, clone.firstChild);
  return { text: new XMLSerializer().serializeToString(clone), width, height };
}

/** Draw an SVG document into a canvas at `scale`x and return it as a PNG blob. */
export async function svgToPng({ text, width, height }, scale = 2) {
  const image = new Image();
  image.decoding = "sync";
  const loaded = new Promise((resolve, reject) => {
    image.onload = resolve;
    image.onerror = () => reject(new Error("The browser could not render this view as an image."));
  });
  image.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(text);
  await loaded;
  const canvas = document.createElement("canvas");
  canvas.width = Math.ceil(width * scale);
  canvas.height = Math.ceil(height * scale);
  const context = canvas.getContext("2d");
  context.scale(scale, scale);
  context.drawImage(image, 0, 0, width, height);
  return canvasToBlob(canvas);
}

/** @returns {Promise<Blob>} */
export function canvasToBlob(canvas) {
  return new Promise((resolve, reject) =>
    canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("The image is too large to save."))), "image/png"));
}

/** An SVG document that shows a canvas (embedded as a PNG data URL) at its CSS size. */
export function canvasToSvg(canvas, scale = 2) {
  const width = canvas.width / scale;
  const height = canvas.height / scale;
  const href = canvas.toDataURL("image/png");
  const text = `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">` +
    `<image href="${href}" width="${width}" height="${height}"/></svg>`;
  return { text, width, height };
}

/** Offer `blob` as a file download named `filename`. */
export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.rel = "noopener";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** A file name safe on every system. */
export function fileName(...parts) {
  return parts.filter(Boolean).join("-").replace(/[^A-Za-z0-9._-]+/g, "_").slice(0, 120);
}

/**
 * Save a view's export target in `format` ("svg" | "png").
 * @param {{ svg?: SVGSVGElement, canvas?: HTMLCanvasElement, name: string }} target
 * @param {"svg" | "png"} format
 * @param {{ background: string, prefix: string }} options
 */
export async function saveView(target, format, { background, prefix }) {
  const name = fileName(prefix, target.name) + "." + format;
  if (target.canvas) {
    if (format === "png") return download(await canvasToBlob(target.canvas), name);
    return download(new Blob([canvasToSvg(target.canvas).text], { type: "image/svg+xml" }), name);
  }
  const doc = serializeSvg(target.svg, background);
  if (format === "svg") return download(new Blob([doc.text], { type: "image/svg+xml" }), name);
  return download(await svgToPng(doc), name);
}
