// What training changed: the layer distances the worker stores with --deltas prev (how far each
// layer moved from the checkpoint before) as a layer x step heatmap, and between two chosen
// steps the layers ranked by their change, with the change of α beside. The ranking is the
// API's (GET /runs/{id}/distances?from_step=&to_step=): the page draws it, never computes it.

import { apiOnce } from "../api.js";
import { state } from "../state.js";
import { bindParamSelects, C, esc, fmt, isNum, note, plot, select } from "../ui.js";
import { drawHeatmap } from "./heatmap.js";

export const DISTANCE_METRICS = [
  ["change_fro", "‖ΔW‖F / ‖W‖F (relative change)"],
  ["change_spectral", "‖ΔW‖₂ / ‖W‖₂ (relative spectral change)"],
  ["subspace_overlap", "top-k singular subspace overlap (1: same directions)"],
];
const SHORT = { change_fro: "‖ΔW‖F/‖W‖F", change_spectral: "‖ΔW‖₂/‖W‖₂",
  subspace_overlap: "overlap" };
// Bars drawn in the ranking; the table below it lists every layer.
const MAX_BARS = 25;

export function distanceMetricOf(params) {
  const m = params.get("dmetric");
  return DISTANCE_METRICS.some(([name]) => name === m) ? m : "change_fro";
}

// The two steps compared: the URL's when both are analysed and in order, else the last
// analysed step and the one before it.
export function stepsCompared(params, steps) {
  const to = Number(params.get("to"));
  const from = Number(params.get("from"));
  const last = steps[steps.length - 1];
  const end = steps.includes(to) && params.get("to") !== null ? to : last;
  const before = steps.filter((s) => s < end);
  const start = params.get("from") !== null && before.includes(from)
    ? from : before[before.length - 1];
  return [start, end];
}

// kindOfPromise: each layer's kind, for the labels only (asked for beside the distances).
export async function drawChanges(runId, params, method, done, kindOfPromise, token) {
  const panel = document.getElementById("changes-panel");
  const steps = done.map((c) => c.step).sort((a, b) => a - b);
  const metric = distanceMetricOf(params);
  const [from, to] = stepsCompared(params, steps);
  // Only the matrix drawn: a long run's other matrices are megabytes the page never shows.
  const query = new URLSearchParams({ method, max_points: "500", rank_by: metric,
    matrices: metric });
  if (from !== undefined) {
    query.set("from_step", String(from));
    query.set("to_step", String(to));
  }
  const [d, kindOf] = await Promise.all([apiOnce(`/runs/${runId}/distances?${query}`),
    kindOfPromise]);
  if (token !== state.renderToken) return;
  const measured = d[metric].some((row) => row.some(isNum))
    || d.ranking.some((r) => DISTANCE_METRICS.some(([name]) => isNum(r[name])));
  panel.hidden = false;
  const controls = document.getElementById("changes-controls");
  controls.innerHTML = [
    select("dmetric", "Measure", DISTANCE_METRICS, metric),
    select("from", "From step", steps.slice(0, -1).map((s) => [String(s), String(s)]),
      String(from)),
    select("to", "to step", steps.slice(1).map((s) => [String(s), String(s)]), String(to)),
  ].join(" ");
  bindParamSelects(controls);
  if (!measured) {
    note("distance-heatmap", "No layer distances stored for this run: they are measured " +
      "when the worker runs with <code>--deltas prev</code> (or <code>distances</code>).");
    note("changes-bars", "–");
    document.getElementById("changes-table").innerHTML = "";
    return;
  }
  const overlap = metric === "subspace_overlap";
  const cells = d[metric].flat().filter(isNum);
  drawHeatmap({ steps: d.steps, layers: d.layers, z: d[metric] }, kindOf, {
    id: "distance-heatmap", label: SHORT[metric], zmin: 0,
    zmax: overlap ? 1 : Math.max(1e-12, ...cells),
    colorscale: overlap ? "Viridis" : "Magma" });
  drawRanking(d, metric);
}

function drawRanking(d, metric) {
  const rows = d.ranking.filter((r) => isNum(r[metric]));
  const title = document.getElementById("changes-title");
  title.textContent = `Layers by ${SHORT[metric]} from step ${d.from_step} to ${d.to_step}`;
  if (!rows.length) {
    note("changes-bars", `No layer distance measured between steps ${esc(d.from_step)} and ${
      esc(d.to_step)}.`);
    document.getElementById("changes-table").innerHTML = "";
    return;
  }
  const bars = rows.slice(0, MAX_BARS);
  const dAlpha = (r) => (isNum(r.delta_alpha) ? `Δα ${r.delta_alpha >= 0 ? "+" : ""}${
    r.delta_alpha.toFixed(3)}` : "Δα –");
  plot("changes-bars", [{ type: "bar", orientation: "h", y: bars.map((r) => r.layer),
    x: bars.map((r) => r[metric]), text: bars.map(dAlpha), textposition: "outside",
    cliponaxis: false,
    marker: { color: bars.map((r) => (isNum(r.delta_alpha) && r.delta_alpha < 0
      ? C.vermillion : C.blue)) },
    customdata: bars.map((r) => [fmt(r.alpha_from), fmt(r.alpha_to), r.n_steps]),
    hovertemplate: `%{y}<br>${esc(SHORT[metric])} %{x:.4g}<br>α %{customdata[0]} → ` +
      "%{customdata[1]}<br>%{customdata[2]} step(s)<extra></extra>" }], {
    height: Math.max(220, 22 * bars.length + 60),
    margin: { l: Math.min(330, 12 + 6.4 * Math.max(...bars.map((r) => r.layer.length))),
      r: 90, t: 10, b: 45 },
    yaxis: { autorange: "reversed", type: "category", tickfont: { size: 10 } },
    xaxis: { title: { text: SHORT[metric] }, range: metric === "subspace_overlap"
      ? [0, 1.05] : undefined },
    showlegend: false });
  const head = ["#", "Layer", "Kind", "Block", "‖ΔW‖F/‖W‖F", "‖ΔW‖₂/‖W‖₂", "Overlap",
    "α from", "α to", "Δα", "Steps"];
  const body = rows.map((r, i) => `<tr><td>${i + 1}</td><td><code>${esc(r.layer)}</code></td>
    <td>${esc(r.kind ?? "")}</td><td>${esc(r.block ?? "")}</td><td>${fmt(r.change_fro, 4)}</td>
    <td>${fmt(r.change_spectral, 4)}</td><td>${fmt(r.subspace_overlap, 3)}</td>
    <td>${fmt(r.alpha_from)}</td><td>${fmt(r.alpha_to)}</td>
    <td class="${isNum(r.delta_alpha) && r.delta_alpha < 0 ? "fell" : "rose"}">${
      isNum(r.delta_alpha) ? (r.delta_alpha >= 0 ? "+" : "") + r.delta_alpha.toFixed(3) : "–"}</td>
    <td title="${r.complete ? "every step compared with the one before" : "some steps of the " +
      "interval have no distance: the sum is partial"}">${r.n_steps}${r.complete ? "" : " *"}</td>
    </tr>`).join("");
  document.getElementById("changes-table").innerHTML = `<table class="changes"><thead><tr>${
    head.map((h) => `<th scope="col">${h}</th>`).join("")}</tr></thead><tbody>${body}</tbody>
    </table>`;
}
