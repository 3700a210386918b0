// Flags per checkpoint: how many layers carry each warning, stacked.

import { C, plot } from "../ui.js";

const FLAG_SERIES = [["correlation_trap", "correlation trap", C.vermillion],
  ["rank_collapse", "rank collapse", C.purple], ["poor_fit", "poor fit", C.orange],
  ["tail_too_short", "tail too short", C.sky], ["unstable", "unstable fit", C.grey]];

export function drawFlags(points) {
  const steps = points.map((p) => p.step);
  const traces = FLAG_SERIES.filter(([key]) => points.some((p) => p[key]))
    .map(([key, name, color]) => ({ x: steps, y: points.map((p) => p[key] ?? 0), type: "bar",
      name, marker: { color },
      hovertemplate: `step %{x}<br>${name}: %{y} layers<extra></extra>` }));
  if (!traces.length) {
    // Still draw the axis so "no flags" is visibly a measured zero, not a missing plot.
    traces.push({ x: steps, y: steps.map(() => 0), type: "bar", name: "no flags raised",
      marker: { color: C.green }, hovertemplate: "step %{x}: no flags<extra></extra>" });
  }
  plot("flags", traces, { barmode: "stack", xaxis: { title: { text: "step" } },
    yaxis: { title: { text: "layers" }, rangemode: "tozero" }, showlegend: true, height: 400,
    margin: { l: 60, r: 20, t: 30, b: 45 } });
}
