// Runs overview (#/): one row per run with its latest median α, a sparkline and the CI gate.

import { api, defaultOf, vocabulary } from "../api.js";
import { state, view } from "../state.js";
import { C, esc, fmt, gateBadge, isNum, pct, plot } from "../ui.js";

// A wait in the unit a person reads at a glance: seconds are noise, days are rare.
function waited(seconds) {
  if (!isNum(seconds) || seconds < 60) return "< 1 min";
  const minutes = Math.floor(seconds / 60);
  return minutes < 120 ? `${minutes} min` : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

// Analysis behind training: how many checkpoints wait, and for how long the oldest has.
function lagBadge(run) {
  if (!run.lag_checkpoints) return "";
  const n = run.lag_checkpoints;
  const last = isNum(run.last_analysis_lag_seconds)
    ? `; the latest analysis came ${waited(run.last_analysis_lag_seconds)} after its checkpoint`
    : "";
  return ` <span class="badge lag" id="lag-${run.id}" title="${esc(`${n} checkpoint${
    n === 1 ? "" : "s"} queued or being analysed${last}`)}">behind by ${n} checkpoint${
    n === 1 ? "" : "s"} / ${waited(run.lag_oldest_seconds)}</span>`;
}

export async function renderRuns(token) {
  const [data, words] = await Promise.all([api("/runs?limit=1000"), vocabulary()]);
  if (token !== state.renderToken) return;
  state.lastSignature = JSON.stringify(data.runs.map((r) =>
    [r.id, r.n_checkpoints, r.n_done, r.n_failed, r.n_pending, r.n_skipped, r.last_step]));
  if (!data.runs.length) {
    view.innerHTML = `<h1>Runs</h1><div class="panel" id="runs-empty"><div class="empty">
      <p><strong>No runs yet.</strong></p>
      <p>Start watching a training run and its checkpoints appear here as they are analysed:</p>
      <p><code>alphawatch up RUN_DIR</code></p>
      <p class="muted">RUN_DIR is the folder your trainer saves checkpoints into
      (e.g. HF <code>checkpoint-&lt;step&gt;/</code>). This page refreshes by itself.</p>
    </div></div>`;
    return;
  }
  const rows = data.runs.map((run) => `
    <tr data-run="${run.id}">
      <td><a href="#/runs/${run.id}">${esc(run.name)}</a><div class="muted small">${
        esc(run.path)}</div></td>
      <td class="num">${run.n_done ?? 0} done${run.n_failed ? ` · <span class="status-failed">${
        run.n_failed} failed</span>` : ""}${run.n_pending ? ` · ${run.n_pending} pending` : ""}${
        run.n_skipped ? ` · <span class="status-skipped" title="passed over by the keep-up ` +
        `policy">${run.n_skipped} skipped</span>` : ""}${
        lagBadge(run)}</td>
      <td class="num">${fmt(run.last_step, 0)}</td>
      <td class="num">${fmt(run.latest_alpha)}</td>
      <td class="num">${pct(run.untrusted_share)}</td>
      <td><div class="spark" id="spark-${run.id}" aria-label="median α trend of ${
        esc(run.name)}"></div></td>
      <td id="gate-${run.id}"><span class="muted">…</span></td>
    </tr>`).join("");
  view.innerHTML = `<h1>Runs</h1><div class="panel"><table id="runs-table">
    <thead><tr><th scope="col">Run</th><th scope="col">Checkpoints</th>
    <th scope="col">Last step</th><th scope="col">Median α (trusted, latest)</th>
    <th scope="col">Untrusted layers</th><th scope="col">Trend</th>
    <th scope="col">CI gate (defaults)</th></tr></thead><tbody>${rows}</tbody></table></div>
    <p class="muted">Median α over trusted layers of the latest analysed checkpoint; the gate
    fails when it leaves 2–6. Hover a badge for the reasons.</p>`;
  // The sparkline draws what the table states: the API's default statistic and filter.
  const trendOf = new URLSearchParams({ metric: "alpha", stat: defaultOf(words.statistics),
    filter: defaultOf(words.filters), max_points: "60" });
  for (const run of data.runs) {
    api(`/runs/${run.id}/trend?${trendOf}`).then((trend) => {
      if (token !== state.renderToken) return;
      const el = document.getElementById(`spark-${run.id}`);
      if (!trend.points.length) { if (el) el.innerHTML = '<span class="muted">–</span>'; return; }
      plot(el, [{ x: trend.points.map((p) => p.step), y: trend.points.map((p) => p.value),
        mode: trend.points.length > 1 ? "lines" : "markers", line: { color: C.blue, width: 1.5 },
        marker: { color: C.blue, size: 5 }, hoverinfo: "skip" }],
      { margin: { l: 0, r: 0, t: 2, b: 2 }, xaxis: { visible: false, fixedrange: true },
        yaxis: { visible: false, fixedrange: true }, showlegend: false, height: 36, width: 140 });
      el.querySelector(".modebar-container")?.remove();
    }).catch(() => {});
    api(`/runs/${run.id}/gate`).then((gate) => {
      const cell = document.getElementById(`gate-${run.id}`);
      if (cell && token === state.renderToken) cell.innerHTML = gateBadge(gate);
    }).catch(() => {
      const cell = document.getElementById(`gate-${run.id}`);
      if (cell) cell.innerHTML = '<span class="muted">–</span>';
    });
  }
}
