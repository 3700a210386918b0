// The empirical spectral density of one layer at one step, with its power-law fit.

import { C, fmt, isNum, note, plot } from "../ui.js";

export function drawEsd(esd, maxD) {
  const logs = (xs) => (xs || []).filter((x) => x > 0).map((x) => Math.log10(x));
  const evals = logs(esd.evals);
  const info = document.getElementById("layer-note");
  info.textContent = `step ${esd.step}: α ${fmt(esd.alpha)}, D ${fmt(esd.D)}` +
    `${isNum(maxD) ? ` (poor fit above ${maxD})` : ""}, ${esd.num_pl_spikes ?? "–"} eigenvalues` +
    ` in the tail, fit ${esd.fit_status}. Histogram of log₁₀ λ on a log density axis: a power` +
    " law is a straight line of slope 1−α.";
  if (!evals.length) { note("esd", "No eigenvalues were stored for this layer."); return; }
  const lo = Math.min(...evals), hi = Math.max(...evals);
  const bins = { start: lo, end: hi + 1e-9, size: Math.max((hi - lo) / 40, 1e-6) };
  const traces = [{ x: evals, type: "histogram", histnorm: "probability density", xbins: bins,
    name: "ESD", marker: { color: C.blue }, opacity: 0.75,
    hovertemplate: "log₁₀ λ %{x}<br>density %{y:.3g}<extra></extra>" }];
  if (esd.rand_evals && esd.rand_evals.length) {
    traces.push({ x: logs(esd.rand_evals), type: "histogram", histnorm: "probability density",
      name: "shuffled W", marker: { color: C.grey }, opacity: 0.45,
      hovertemplate: "shuffled: log₁₀ λ %{x}<br>density %{y:.3g}<extra></extra>" });
  }
  if (esd.fit_line && esd.fit_line.x && esd.fit_line.x.length) {
    traces.push({ x: esd.fit_line.x.map((x) => Math.log10(x)), y: esd.fit_line.y, mode: "lines",
      name: `power law α=${fmt(esd.alpha)}`, line: { color: C.vermillion, width: 2.5 },
      hovertemplate: "fit: log₁₀ λ %{x:.3f}<br>density %{y:.3g}<extra></extra>" });
  }
  const shapes = [], annotations = [];
  const vline = (x, color, label, y = 1) => {
    if (!isNum(x) || x <= 0) return;
    const lx = Math.log10(x);
    shapes.push({ type: "line", xref: "x", yref: "paper", x0: lx, x1: lx, y0: 0, y1: 1,
      line: { color, dash: "dash", width: 1.5 } });
    annotations.push({ x: lx, xref: "x", y, yref: "paper", text: label, showarrow: false,
      xanchor: "left", yanchor: "top", font: { size: 11, color } });
  };
  vline(esd.xmin, C.vermillion, " xmin");
  vline(esd.mp_bulk_max, C.green, " MP edge", 0.9);
  plot("esd", traces, { barmode: "overlay", shapes, annotations,
    xaxis: { title: { text: "log₁₀ eigenvalue λ" } },
    yaxis: { title: { text: "density" }, type: "log", exponentformat: "power", dtick: 1 },
    margin: { l: 60, r: 20, t: 30, b: 45 } });
}
