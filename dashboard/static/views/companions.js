// Companion metrics: the trend's statistic of other layer metrics, one small panel each.

import { api } from "../api.js";
import { state } from "../state.js";
import { C, isNum, note, plot } from "../ui.js";
import { trendQuery } from "./trend.js";

const COMPANIONS = [["log_spectral_norm", "log₁₀ spectral norm"], ["stable_rank", "stable rank"],
  ["D", "KS distance D (fit quality)"], ["distance_from_init", "distance from init"]];

export async function drawCompanions(runId, params, words, token) {
  const results = await Promise.all(COMPANIONS.map(([m]) =>
    api(`/runs/${runId}/trend?${trendQuery(words, params, m, { max_points: "300" })}`)
      .catch(() => null)));
  if (token !== state.renderToken) return;
  const present = COMPANIONS.map(([metric, label], i) => ({ metric, label, t: results[i] }))
    .filter(({ t }) => t && t.points.some((p) => isNum(p.value)));
  if (!present.length) { note("companion", "No companion metric recorded."); return; }
  const traces = [];
  const cols = present.length > 1 ? 2 : 1;
  const rows = Math.ceil(present.length / cols);
  const layout = { grid: { rows, columns: cols, pattern: "independent", xgap: 0.2, ygap: 0.3 },
    showlegend: false, height: 400, margin: { l: 50, r: 15, t: 24, b: 40 }, annotations: [] };
  const colours = [C.blue, C.orange, C.green, C.purple];
  present.forEach(({ label, t }, i) => {
    const ax = i === 0 ? "" : String(i + 1);
    traces.push({ x: t.points.map((p) => p.step), y: t.points.map((p) => p.value),
      mode: "lines+markers", name: label, xaxis: `x${ax}`, yaxis: `y${ax}`,
      line: { color: colours[i % colours.length], width: 2 }, marker: { size: 4 },
      hovertemplate: `step %{x}<br>${label}: %{y:.4g}<extra></extra>` });
    layout[`yaxis${ax}`] = { nticks: 4 };
    layout[`xaxis${ax}`] = { nticks: 4, matches: i ? "x" : undefined,
      title: i >= present.length - cols ? { text: "step" } : undefined };
    layout.annotations.push({ text: label, xref: `x${ax} domain`, yref: `y${ax} domain`, x: 0,
      y: 1, xanchor: "left", yanchor: "bottom", showarrow: false,
      font: { size: 11, color: "#4b5563" } });
  });
  plot("companion", traces, layout);
}
