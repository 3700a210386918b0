// α by layer kind: small multiples, one panel per kind present, in the API's kind order.

import { api } from "../api.js";
import { state } from "../state.js";
import { alphaMax, C, esc, goodBand, isNum, note, plot } from "../ui.js";
import { statLabel, switchOf, trendQuery } from "./trend.js";

export async function drawKinds(runId, params, layers, words, token) {
  const seen = new Set(layers.map((l) => l.kind));
  // Kinds this server does not know yet (a newer worker) still get a panel, after the rest.
  const kinds = words.kinds.filter((k) => seen.has(k))
    .concat([...seen].filter((k) => !words.kinds.includes(k)).sort());
  const results = await Promise.all(kinds.map((kind) => api(`/runs/${runId}/trend?${
    trendQuery(words, params, "alpha", { kind, max_points: "150" })}`).catch(() => null)));
  if (token !== state.renderToken) return;
  const el = document.getElementById("kinds");
  if (!kinds.length) { note(el, "No layer kinds recorded."); return; }
  const label = statLabel(words, switchOf(words, params, "stat"));
  const filter = switchOf(words, params, "filter");
  const filterLabel = words.filters.find((f) => f.name === filter)?.label ?? filter;
  const cols = Math.min(4, kinds.length);
  const rows = Math.ceil(kinds.length / cols);
  const traces = [];
  const layout = { grid: { rows, columns: cols, pattern: "independent", xgap: 0.08, ygap: 0.35 },
    showlegend: false, height: 40 + 170 * rows, margin: { l: 45, r: 15, t: 22, b: 30 },
    annotations: [], shapes: [] };
  kinds.forEach((kind, i) => {
    const ax = i === 0 ? "" : String(i + 1);
    const t = results[i];
    const pts = t ? t.points : [];
    traces.push({ x: pts.map((p) => p.step), y: pts.map((p) => p.value), mode: "lines+markers",
      name: kind, xaxis: `x${ax}`, yaxis: `y${ax}`, line: { color: C.blue, width: 2 },
      marker: { size: 4 }, customdata: pts.map((p) => p.n_used),
      hovertemplate: `${esc(kind)}<br>step %{x}<br>${esc(label)} α %{y:.3f}<br>` +
        "%{customdata} layers<extra></extra>" });
    // Same α scale in every panel, so panels compare by eye.
    layout[`yaxis${ax}`] = { range: [1, alphaMax()], nticks: 5, matches: i ? "y" : undefined };
    layout[`xaxis${ax}`] = { nticks: 4, matches: i ? "x" : undefined };
    layout.shapes.push(...goodBand().map((b) => ({ ...b, xref: `x${ax} domain`, yref: `y${ax}` })));
    layout.annotations.push({ text: `<b>${esc(kind)}</b>`, xref: `x${ax} domain`,
      yref: `y${ax} domain`, x: 0.02, y: 1, xanchor: "left", yanchor: "bottom",
      showarrow: false, font: { size: 12 } });
    if (!pts.some((p) => isNum(p.value))) {
      layout.annotations.push({ text: `no layer passes: ${esc(filterLabel)}`,
        xref: `x${ax} domain`, yref: `y${ax} domain`, x: 0.5, y: 0.5, showarrow: false,
        font: { size: 11, color: "#5b6472" } });
    }
  });
  plot(el, traces, layout);
}
