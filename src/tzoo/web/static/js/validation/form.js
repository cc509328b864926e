// The /validate form: post the model (a catalogue name or an uploaded model.py) as a job,
// follow its progress, and open the stored report when it is done.

const POLL_MS = 700;

function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]')?.getAttribute("content") || "";
}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function start() {
  const form = document.getElementById("val-form");
  const error = document.getElementById("val-error");
  const submit = document.getElementById("val-submit");
  const job = document.getElementById("val-job");
  const bar = document.getElementById("val-progress");
  const status = document.getElementById("val-job-status");

  async function follow(url) {
    for (;;) {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (!response.ok) throw new Error(await detail(response));
      const state = await response.json();
      if (state.total) {
        bar.max = state.total;
        bar.value = state.done;
      }
      if (state.state === "queued") status.textContent = `Queued (position ${state.position ?? "?"}).`;
      else if (state.state === "running") status.textContent = `Running ${state.done} of ${state.total || "?"}: ${state.what || "starting"}`;
      else if (state.state === "done") {
        status.textContent = "Done; opening the report.";
        window.location.assign(state.url);
        return;
      } else {
        throw new Error(state.error?.detail || "The validation failed.");
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const data = new FormData(form);
    const tiers = data.getAll("tier");
    data.delete("tier");
    if (!tiers.length) {
      error.textContent = "Choose at least one tier.";
      return;
    }
    data.set("tiers", tiers.join(","));
    const file = form.querySelector("#val-file");
    const hasFile = file && file.files.length > 0;
    if (hasFile) data.delete("model_name");
    else {
      data.delete("model_file");
      data.delete("config_file");
      if (!data.get("model_name")) {
        error.textContent = "Choose a catalogue model or a model.py file.";
        return;
      }
    }
    submit.disabled = true;
    job.hidden = false;
    bar.removeAttribute("value");
    status.textContent = "Submitting…";
    try {
      const headers = { Accept: "application/json" };
      const token = csrfToken();
      if (token) headers["X-CSRF-Token"] = token;
      const response = await fetch("/api/validations", { method: "POST", body: data, headers, credentials: "same-origin" });
      if (!response.ok) throw new Error(await detail(response));
      await follow(response.headers.get("Location"));
    } catch (failure) {
      job.hidden = true;
      error.textContent = failure.message || String(failure);
      submit.disabled = false;
    }
  });
}

start();
