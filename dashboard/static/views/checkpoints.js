// The run page's checkpoint table (newest first, re-analyses and errors beside each status) and
// its cross-check badge.

import { esc, fmt } from "../ui.js";

// The live cross-check with weightwatcher (ALPHAWATCH_CROSSCHECK__SHARE): how many layers were
// re-analysed, the largest relative α difference, and a warning when any exceeds the tolerance.
export function crosscheckBadge(check) {
  if (!check || !check.layers) return "";
  const over = check.over_tolerance > 0;
  return `<span id="run-crosscheck" class="${over ? "status-failed" : ""}" title="layers ` +
    `re-analysed with weightwatcher 0.7.7; tolerance ${esc(check.tolerance)}">cross-checked ` +
    `<b>${check.layers}</b> layers, max Δα <b>${esc(check.max_diff?.toExponential(1) ?? "–")}` +
    `</b>${over ? ` — ⚠ ${check.over_tolerance} above ${esc(check.tolerance)}` : ""}</span>`;
}

export function renderCheckpointTable(list) {
  const tbody = document.querySelector("#checkpoints tbody");
  if (!tbody) return;
  // Newest first, so a long run shows its latest state without scrolling.
  const rows = [...list].sort((a, b) => b.step - a.step).map((c) => `<tr class="ck-${
    esc(c.status)}"><td class="num">${c.step}</td><td class="status-${esc(c.status)}">${
    esc(c.status)}${reanalysed(c)}</td><td class="num">${c.n_layers ?? "–"}</td><td class="num">${
    c.n_trusted ?? "–"}</td><td class="num">${fmt(c.analysis_s, 2)}</td><td>${
    esc(c.device ?? "")}</td><td class="error">${esc(checkpointError(c))}</td></tr>`).join("");
  tbody.innerHTML = rows || '<tr><td colspan="7" class="muted">no checkpoints</td></tr>';
}

// A checkpoint whose files changed in place is analysed again; say so beside its status.
function reanalysed(c) {
  if (!(c.analysis_count > 1)) return "";
  const when = c.rewritten_at ? ` (files changed ${new Date(c.rewritten_at).toLocaleString()})`
    : "";
  return ` <span class="muted small" title="analysed ${c.analysis_count} times${esc(when)}">` +
    `re-analysed ×${c.analysis_count - 1}</span>`;
}

function checkpointError(c) {
  // Refused at discovery: error and discovery_error are the same text, shown once.
  if (c.discovery_error && c.discovery_error !== c.error) {
    return [c.error, `discovery: ${c.discovery_error}`].filter(Boolean).join(" · ");
  }
  return c.error ?? "";
}
