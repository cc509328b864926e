// Load and unload buttons on the home page's model table, through the REST API.
const statusLine = document.getElementById("models-status");

function mib(bytes) {
  return bytes == null ? "unknown" : `${(bytes / 1048576).toFixed(1)} MiB`;
}

async function act(button) {
  const { action, name } = button.dataset;
  const row = button.closest("tr");
  button.disabled = true;
  statusLine.textContent = `${action === "load" ? "Loading" : "Unloading"} ${name}…`;
  try {
    // Operator only: the server checks the role and this page's CSRF token.
    const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";
    const response = await fetch(`/api/models/${encodeURIComponent(name)}/${action}`, {
      method: "POST",
      headers: { "X-CSRF-Token": csrf },
    });
    const body = await response.json();
    if (!response.ok) {
      statusLine.textContent = `${name}: ${body.detail}`;
      return;
    }
    await refresh();
    statusLine.textContent = `${name} ${action === "load" ? "loaded" : "unloaded"}; ${mib(body.memory_used_bytes)} in use.`;
  } catch (error) {
    statusLine.textContent = `${name}: the server did not answer (${error}).`;
  } finally {
    button.disabled = false;
  }
}

async function refresh() {
  const response = await fetch("/api/models");
  const models = await response.json();
  for (const model of models) {
    const row = document.querySelector(`tr[data-model="${CSS.escape(model.name)}"]`);
    if (!row) continue;
    row.querySelector(".state").textContent = model.loaded ? "loaded" : "available";
    row.children[2].textContent = mib(model.size_bytes);
    const button = row.querySelector(".model-action");
    if (button) {
      button.dataset.action = model.loaded ? "unload" : "load";
      button.textContent = model.loaded ? "Unload" : "Load";
    }
  }
}

document.getElementById("models").addEventListener("click", (event) => {
  const button = event.target.closest(".model-action");
  if (button) act(button);
});
