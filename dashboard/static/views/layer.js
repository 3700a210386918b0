// Layer drill-down: one layer's α over steps with its fit quality, and the ESD at a step.

import { api, apiOnce } from "../api.js";
import { enc, setParams, state } from "../state.js";
import { C, esc, fmt, goodBand, isNum, note, plot } from "../ui.js";
import { drawEsd } from "./esd.js";

export async function drawLayer(runId, layer, step, run, token, method) {
  const m = `method=${enc(method)}`;
  const panel = document.getElementById("layer-panel");
  const wasHidden = panel.hidden;
  panel.hidden = false;
  document.getElementById("layer-name").textContent = layer;
  let history;
  try {
    history = await api(
      `/runs/${runId}/layers/${enc(layer)}/history?metric=alpha&max_points=500&${m}`);
  } catch (err) {
    if (token !== state.renderToken) return;
    note("layer-history", esc(err.message));
    note("esd", "");
    return;
  }
  if (token !== state.renderToken) return;
  const pts = history.points;
  const atStep = step !== null && pts.some((p) => String(p.step) === String(step))
    ? Number(step) : (pts.length ? pts[pts.length - 1].step : null);
  const stepPick = document.getElementById("esd-step");
  stepPick.innerHTML = pts.map((p) =>
    `<option value="${p.step}"${p.step === atStep ? " selected" : ""}>${p.step}</option>`).join("");
  const maxD = run?.thresholds?.max_ks_distance;
  drawHistory(pts, maxD);
  if (wasHidden) panel.scrollIntoView({ block: "nearest" });
  if (atStep === null) { note("esd", "This layer has no analysed step."); return; }
  let esd, rows;
  try {
    [esd, rows] = await Promise.all([
      api(`/runs/${runId}/checkpoints/${atStep}/layers/${enc(layer)}/esd?${m}`),
      apiOnce(`/runs/${runId}/checkpoints/${atStep}/layers?${m}`)]);
  } catch (err) {
    if (token === state.renderToken) note("esd", esc(err.message));
    return;
  }
  if (token !== state.renderToken) return;
  drawEsd(esd, maxD);
  drawFit(rows.layers.find((l) => l.name === layer), method, atStep);
  drawTrap(esd);
}

// Where a correlation trap sits: for W's top singular pairs, how many neurons carry each
// vector (participation ratio: 1 = one neuron) and which, with their share of the vector.
function drawTrap(esd) {
  const el = document.getElementById("layer-trap");
  if (!el) return;
  const loc = esd.trap_localisation;
  if (!esd.correlation_trap || !loc || !loc.vectors || !loc.vectors.length) {
    el.innerHTML = ""; return;
  }
  const side = (w, of) => `PR ${fmt(w.participation, 1)} of ${of}: ` + w.neurons.map((n, i) =>
    `<span class="neuron">${esc(n)}</span>&nbsp;(${(100 * w.weights[i]).toFixed(0)}%)`)
    .join(", ");
  el.innerHTML = `<table class="fit-table trap-table"><caption class="muted small">Correlation
    trap at step ${esc(esd.step)}: where W's top singular vectors live (W is ${
      esc(loc.shape[0])}×${esc(loc.shape[1])}, rows = output neurons)</caption><thead><tr>
    <th scope="col">σ</th><th scope="col">Rows (output neurons)</th>
    <th scope="col">Columns (input neurons)</th></tr></thead><tbody>${loc.vectors.map((v) =>
    `<tr><td>${fmt(v.sigma)}</td><td>${side(v.rows, loc.shape[0])}</td><td>${
      side(v.cols, loc.shape[1])}</td></tr>`).join("")}</tbody></table>`;
}

// The fit at the chosen step: the method's power law, the truncated power law, and powerlaw's
// likelihood-ratio tests against both alternatives (R > 0 favours the power law).
function drawFit(row, method, step) {
  const el = document.getElementById("layer-fit");
  if (!el) return;
  if (!row) { el.innerHTML = ""; return; }
  const test = (r, p) => (isNum(r)
    ? `R = ${fmt(r, 2)}, p = ${isNum(p) ? p.toExponential(1) : "–"}${
      r < 0 && isNum(p) && p < 0.05 ? ` <span class="status-failed">(alternative better)</span>`
        : ""}` : "–");
  const fingers = isNum(row.num_fingers) && row.num_fingers > 0
    ? `, ${row.num_fingers} finger${row.num_fingers > 1 ? "s" : ""} clipped` : "";
  el.innerHTML = `<table class="fit-table"><caption class="muted small">step ${esc(step)}
    </caption><tbody>
    <tr><th scope="row">Power law (${esc(method)})</th><td>α = ${fmt(row.alpha)}, D = ${
      fmt(row.D)}, xmin = ${fmt(row.xmin, 4)}, tail ${row.num_pl_spikes ?? "–"}${fingers}; ${
      esc(row.fit_status)}${row.trusted ? "" : " (untrusted)"}</td></tr>
    <tr><th scope="row">Truncated power law</th><td>α = ${fmt(row.tpl_alpha)}, Λ = ${
      isNum(row.tpl_lambda) ? row.tpl_lambda.toExponential(2) : "–"}</td></tr>
    <tr><th scope="row">PL vs truncated PL</th><td>${test(row.pl_vs_tpl_R, row.pl_vs_tpl_p)}
      </td></tr>
    <tr><th scope="row">MP bulk, weightwatcher's fit</th><td>${row.num_spikes ?? "–"} spikes,
      soft rank ${fmt(row.mp_softrank)}; shuffle: ${row.num_traps ?? "–"} traps, distance ${
      fmt(row.rand_distance)}</td></tr>
    <tr><th scope="row">MP bulk, W's entry variance</th><td>${row.edge_spikes ?? "–"} spikes,
      soft rank ${fmt(row.edge_softrank)}; shuffle: ${row.shuffle_traps ?? "–"} traps${
      row.correlation_trap ? " (correlation trap)" : ""}, distance ${
      fmt(row.shuffle_distance)}</td></tr>
    <tr><th scope="row">PL vs lognormal</th><td>${
      test(row.pl_vs_lognormal_R, row.pl_vs_lognormal_p)}</td></tr>
    ${isNum(row.crosscheck_diff) ? `<tr><th scope="row">weightwatcher cross-check</th><td>` +
      `relative Δα ${row.crosscheck_diff.toExponential(1)}</td></tr>` : ""}
    </tbody></table>`;
}

function drawHistory(pts, maxD) {
  const hist = document.getElementById("layer-history");
  plot(hist, [
    { x: pts.map((p) => p.step), y: pts.map((p) => p.D), name: "KS distance D", yaxis: "y2",
      mode: "lines", fill: "tozeroy", line: { color: "rgba(107,114,128,0.6)", width: 1 },
      fillcolor: "rgba(107,114,128,0.15)",
      hovertemplate: "step %{x}<br>D %{y:.3f}<extra></extra>" },
    { x: pts.map((p) => p.step), y: pts.map((p) => p.value), name: "α", mode: "lines+markers",
      line: { color: C.blue, width: 2 },
      marker: { size: 8, color: pts.map((p) => (p.trusted ? C.blue : "#fff")),
        symbol: pts.map((p) => (p.trusted ? "circle" : "x")),
        line: { color: pts.map((p) => (p.trusted ? C.blue : C.vermillion)), width: 2 } },
      text: pts.map((p) => `${p.fit_status}${p.trusted ? "" : " (untrusted)"}`),
      hovertemplate: "step %{x}<br>α %{y:.3f}<br>%{text}<extra></extra>" },
  ], { xaxis: { title: { text: "step" } }, yaxis: { title: { text: "α" } },
    yaxis2: { title: { text: "D (lower = better fit)" }, overlaying: "y", side: "right",
      rangemode: "tozero", showgrid: false, nticks: 5, tickformat: ".2f",
      range: [0, Math.max(0.3, ...pts.map((p) => p.D ?? 0))] },
    shapes: [...goodBand(), ...(isNum(maxD) ? [{ type: "line", xref: "paper", x0: 0, x1: 1,
      yref: "y2", y0: maxD, y1: maxD, line: { color: C.grey, dash: "dot", width: 1 } }] : [])],
    margin: { l: 55, r: 60, t: 30, b: 45 } });
  if (!hist.dataset.bound) {
    hist.dataset.bound = "1";
    hist.on("plotly_click", (ev) => {
      const point = ev.points && ev.points[0];
      if (point) setParams({ step: point.x });
    });
  }
}
