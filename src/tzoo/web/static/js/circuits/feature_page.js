// The page of one stored feature dashboard (/features/{slug}): fetch it and draw it.

import { getJSON } from "tzoo/circuits/api.js";
import { renderDashboard } from "tzoo/circuits/dashboard_view.js";

export async function start() {
  const page = JSON.parse(document.getElementById("cg-feature").textContent);
  const status = document.getElementById("cg-dashboard-status");
  const body = document.getElementById("cg-dashboard-body");
  const section = body.closest("section");
  try {
    const dashboard = await getJSON(page.api);
    body.append(renderDashboard(dashboard, { permalink: false }));
    status.textContent = "";
    section.dataset.state = "ready";
  } catch (failure) {
    status.textContent = failure.message || String(failure);
    section.dataset.state = "error";
  }
}
