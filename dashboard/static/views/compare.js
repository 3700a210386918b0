// Compare (#/compare): one statistic of α per checkpoint for several runs, overlaid.

import { api, vocabulary } from "../api.js";
import { setParams, state, view } from "../state.js";
import {
  bindParamSelects, C, esc, goodBand, goodLabel, note, plot, setThresholds, termSelect,
} from "../ui.js";
import { statLabel, switchOf } from "./trend.js";

export async function renderCompare(params, token) {
  const [runs, words] = await Promise.all([api("/runs?limit=1000").then((d) => d.runs),
    vocabulary()]);
  if (token !== state.renderToken) return;
  state.lastSignature = JSON.stringify(runs.map((r) => [r.id, r.n_done, r.last_step]));
  const chosen = (params.get("runs") ?? runs.slice(0, 5).map((r) => r.id).join(","))
    .split(",").filter(Boolean);
  const stat = switchOf(words, params, "stat");
  const filter = switchOf(words, params, "filter");
  const label = statLabel(words, stat);
  if (!document.getElementById("compare")) {
    view.innerHTML = `<h1>Compare runs</h1><div class="panel">
      <div class="controls" id="compare-runs" role="group" aria-label="runs to compare"></div>
      <div class="controls">${termSelect("stat", "Statistic", words.statistics, stat)}
        ${termSelect("filter", "Layers", words.filters, filter)}</div>
      <div id="compare" class="plot"></div>
      <p class="muted small">The chosen statistic of α over layers per checkpoint, one line per
      run; the green band is 2 ≤ α ≤ 6.</p></div>`;
    bindParamSelects(view);
  }
  const box = document.getElementById("compare-runs");
  box.innerHTML = runs.length ? runs.map((r) => `<label class="check"><input type="checkbox"
    value="${r.id}" ${chosen.includes(String(r.id)) ? "checked" : ""}> ${esc(r.name)}</label>`)
    .join("") : '<span class="muted">No runs yet: <code>alphawatch up RUN_DIR</code></span>';
  box.querySelectorAll("input[type=checkbox]").forEach((el) => el.addEventListener("change", () =>
    setParams({ runs: [...box.querySelectorAll("input:checked")].map((i) => i.value).join(",") })));
  if (!chosen.length) { note("compare", "Tick one or more runs to overlay their trends."); return; }
  const query = new URLSearchParams({ runs: chosen.join(","), metric: "alpha", stat, filter,
    max_points: "500" });
  const [data, first] = await Promise.all([api(`/compare?${query}`), api(`/runs/${chosen[0]}`)]);
  setThresholds(first.thresholds);
  if (token !== state.renderToken) return;
  const palette = [C.blue, C.orange, C.green, C.vermillion, C.purple, C.sky, "#000000", C.yellow];
  plot("compare", data.runs.map((r, i) => ({ x: r.points.map((p) => p.step),
    y: r.points.map((p) => p.value), mode: "lines+markers", name: r.name,
    line: { color: palette[i % palette.length], width: 2 }, marker: { size: 5 },
    customdata: r.points.map((p) => p.n_used),
    hovertemplate: `${esc(r.name)}<br>step %{x}<br>${esc(label)} α %{y:.3f}<br>` +
      "%{customdata} layers<extra></extra>" })), { xaxis: { title: { text: "step" } },
    yaxis: { title: { text: `${label} α` } }, shapes: goodBand(), annotations: goodLabel() });
}
