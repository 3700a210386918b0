// α per layer and step: one row per weight matrix in the API's order, one column per checkpoint.
// The layer distances (views/changes.js) are drawn by the same code with their own scale.

import { setParams } from "../state.js";
import { alphaMax, esc, note, plot } from "../ui.js";

// Past this many untrusted cells, per-cell markers cost more than they tell: fade cells instead.
const MAX_MARKERS = 4000;

// opts: id (element), label (colour bar and hover), zmin, zmax, colorscale; heat.trusted may
// be left out (no cell marked).
export function drawHeatmap(heat, kindOf, opts = {}) {
  const el = document.getElementById(opts.id ?? "heatmap");
  if (!heat.layers.length) { note(el, "No layer metrics yet."); return; }
  const nRows = heat.layers.length;
  const label = opts.label ?? "α";
  // One pass over the cells: the hover's label (one string per row and trust, shared by the
  // row's cells: a long run has 150,000 of them), the untrusted cells and their count.
  const trusted = heat.trusted;
  const hover = new Array(nRows), fade = trusted ? new Array(nRows) : null;
  const xs = [], ys = [];
  let nUntrusted = 0;
  for (let i = 0; i < nRows; i += 1) {
    const kind = kindOf[heat.layers[i]] ?? "";
    const row = trusted?.[i];
    if (!row || !row.includes(false)) {
      hover[i] = new Array(heat.steps.length).fill(kind);
      if (fade) fade[i] = new Array(heat.steps.length).fill(null);
      continue;
    }
    const marked = `${kind} · untrusted`;
    hover[i] = row.map((t) => (t === false ? marked : kind));
    fade[i] = row.map((t, j) => {
      if (t !== false) return null;
      nUntrusted += 1;
      if (nUntrusted <= MAX_MARKERS) { xs.push(heat.steps[j]); ys.push(heat.layers[i]); }
      return 1;
    });
  }
  const traces = [{ type: "heatmap", x: heat.steps, y: heat.layers, z: heat.z,
    customdata: hover, colorscale: opts.colorscale ?? "Viridis", zmin: opts.zmin ?? 1,
    zmax: opts.zmax ?? alphaMax(), xgap: nRows < 60 ? 1 : 0,
    ygap: nRows < 60 ? 1 : 0, colorbar: { title: { text: label }, thickness: 14 },
    hovertemplate: `%{y}<br>step %{x}<br>${esc(label)} %{z:.3f} %{customdata}<extra></extra>` }];
  if (nUntrusted && nUntrusted <= MAX_MARKERS) {
    traces.push({ type: "scatter", mode: "markers", x: xs, y: ys, name: "untrusted",
      marker: { symbol: "x-thin", size: nRows < 60 ? 8 : 5,
        line: { color: "rgba(255,255,255,0.95)", width: 1.5 } }, hoverinfo: "skip" });
  } else if (nUntrusted) {
    traces.push({ type: "heatmap", x: heat.steps, y: heat.layers, name: "untrusted", z: fade,
      colorscale: [[0, "rgba(255,255,255,0.6)"], [1, "rgba(255,255,255,0.6)"]],
      showscale: false, hoverinfo: "skip" });
  }
  const rowPx = nRows <= 40 ? 18 : Math.max(2, Math.min(12, 900 / nRows));
  const longest = heat.layers.reduce((m, n) => Math.max(m, n.length), 0);
  plot(el, traces, { height: Math.round(Math.max(260, rowPx * nRows + 80)),
    margin: { l: Math.min(330, 12 + 6.4 * longest), r: 20, t: 10, b: 45 },
    yaxis: { autorange: "reversed", type: "category", tickfont: { size: 10 },
      showticklabels: nRows <= 120 },
    xaxis: { title: { text: "step" }, type: "category", tickangle: 0,
      nticks: Math.min(heat.steps.length, 12) }, showlegend: false });
  if (!el.dataset.bound) {
    el.dataset.bound = "1";
    el.on("plotly_click", (ev) => {
      const point = ev.points && ev.points[0];
      if (point && point.y !== undefined) setParams({ layer: point.y, step: point.x });
    });
  }
}

export function fillLayerPick(layers, current) {
  const pick = document.getElementById("layer-pick");
  const key = layers.join("\n");
  if (pick.dataset.key !== key) {
    pick.dataset.key = key;
    pick.innerHTML = '<option value="">choose…</option>' + layers.map((n) =>
      `<option value="${esc(n)}">${esc(n)}</option>`).join("");
  }
  pick.value = current && layers.includes(current) ? current : "";
}
