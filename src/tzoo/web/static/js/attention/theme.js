// Light/dark theme for the explorer. On the site, the page's own theme.js owns the nav
// toggle; here we only follow `data-theme` on <html>. A standalone export has no nav, so
// it gets its own toggle (#tzv-theme-toggle) and remembers the choice where it can.

const root = document.documentElement;

function remembered() {
  try {
    return localStorage.getItem("tzoo-theme");
  } catch {
    return null; // a sandboxed iframe (Jupyter) has no storage
  }
}

function remember(theme) {
  try {
    localStorage.setItem("tzoo-theme", theme);
  } catch {
    /* sandboxed: the choice lasts for this page only */
  }
}

/** Apply the saved or system theme and wire the standalone toggle button, if any. */
export function initStandaloneTheme(button = document.getElementById("tzv-theme-toggle")) {
  if (!button) return;
  const prefersDark = window.matchMedia?.("(prefers-color-scheme: dark)").matches;
  root.dataset.theme = remembered() || (prefersDark ? "dark" : "light");
  button.addEventListener("click", () => {
    root.dataset.theme = root.dataset.theme === "dark" ? "light" : "dark";
    remember(root.dataset.theme);
  });
}

/**
 * Call `callback` whenever `data-theme` changes (canvases must redraw their colours).
 * @param {() => void} callback
 */
export function onThemeChange(callback) {
  const observer = new MutationObserver(() => callback());
  observer.observe(root, { attributes: true, attributeFilter: ["data-theme"] });
  return () => observer.disconnect();
}
