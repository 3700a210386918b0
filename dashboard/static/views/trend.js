// Model-level trend of the run page: the chosen robust statistic of α per checkpoint, the
// interquartile band and the trimmed mean, with each point's exclusions on hover.

import { defaultOf, kindQuery } from "../api.js";
import { C, fmt, goodBand, goodLabel, isNum, note, plot } from "../ui.js";

// The trend switches in the URL, as the API's query; absent ones take the API's defaults, and
// extra overrides both.
export function trendQuery(words, params, metric = "alpha", extra = {}) {
  const q = new URLSearchParams({ metric, stat: switchOf(words, params, "stat"),
    filter: switchOf(words, params, "filter"), outliers: switchOf(words, params, "outliers"),
    method: switchOf(words, params, "method"), max_points: "500" });
  const kinds = kindQuery(words, params.get("kind"));
  if (kinds) q.set("kind", kinds);
  for (const [key, value] of Object.entries(extra)) q.set(key, value);
  return q.toString();
}

const TERMS = { stat: "statistics", filter: "filters", outliers: "outlier_rules",
  method: "fit_methods" };

// The value of one trend switch: the URL's, else the API's default.
export function switchOf(words, params, name) {
  return params.get(name) || defaultOf(words[TERMS[name]]);
}

export function statLabel(words, stat) {
  return words.statistics.find((s) => s.name === stat)?.label ?? stat;
}

function exclusionText(point, label) {
  const reasons = Object.entries(point.excluded || {}).sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `  ${k.replaceAll("_", " ")}: ${v}`).join("<br>");
  return `<b>step ${point.step}</b><br>${label} α ${fmt(point.value)}` +
    ` (IQR ${fmt(point.p25)}–${fmt(point.p75)})<br>trimmed mean ${fmt(point.trimmed_mean)}` +
    `<br>used ${point.n_used} layers, excluded ${point.n_excluded}` +
    (reasons ? `<br>${reasons}` : "");
}

export function drawTrend(trend, words) {
  const pts = trend.points;
  if (!pts.some((p) => isNum(p.value))) {
    note("trend", "No layer passes this filter at any checkpoint; try <b>all layers</b>.");
    return;
  }
  const label = statLabel(words, trend.stat);
  const steps = pts.map((p) => p.step);
  const values = pts.flatMap((p) => [p.p25, p.p75, p.value, p.trimmed_mean]).filter(isNum);
  // Keep the 2–6 band in view as a band, with room for points outside it.
  const range = [Math.min(1.5, ...values) - 0.2, Math.max(6.5, ...values) + 0.2];
  plot("trend", [
    { x: steps, y: pts.map((p) => p.p75), mode: "lines", line: { width: 0, color: C.blue },
      hoverinfo: "skip", showlegend: false },
    { x: steps, y: pts.map((p) => p.p25), mode: "lines", line: { width: 0, color: C.blue },
      fill: "tonexty", fillcolor: C.band, name: "25–75th percentile", hoverinfo: "skip" },
    { x: steps, y: pts.map((p) => p.value), mode: "lines+markers", name: `${label} α`,
      line: { color: C.blue, width: 2.5 }, marker: { size: pts.length > 80 ? 3 : 6 },
      text: pts.map((p) => exclusionText(p, label)), customdata: pts.map((p) => p.n_used),
      hovertemplate: "%{text}<extra></extra>" },
    { x: steps, y: pts.map((p) => p.trimmed_mean), mode: "lines", name: "trimmed mean",
      line: { color: C.orange, dash: "dot", width: 2 }, hoverinfo: "skip" },
  ], { xaxis: { title: { text: "step" } }, yaxis: { title: { text: "α" }, range },
    shapes: goodBand(), annotations: goodLabel(), hovermode: "closest",
    margin: { l: 60, r: 20, t: 30, b: 45 } });
}
