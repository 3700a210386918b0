// alphawatch dashboard: a hash-routed page that reads only the public REST API (/api/v1),
// so it shows exactly the numbers a CI gate sees. Plotly is served by the API, offline.

const API = "/api/v1";
const POLL_MS = 5000;
const KIND_GROUPS = {
  all: "",
  attention: "q,k,v,o,qkv",
  mlp: "gate,up,down,fc_in,fc_out",
  embeddings: "embed,lm_head",
};
const COLORS = { median: "#0072b2", band: "rgba(0,114,178,0.15)", trimmed: "#e69f00",
  good: "rgba(0,158,115,0.08)", trap: "#d55e00", rank: "#cc79a7", poor: "#e69f00",
  other: "#6b7280" };
const PLOT_CONFIG = { displaylogo: false, responsive: true };

const view = document.getElementById("view");
let pollTimer = null;
let renderToken = 0;

async function api(path) {
  const response = await fetch(API + path, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail ?? detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return response.json();
}

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;",
    ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const fmt = (v, digits = 3) => (v === null || v === undefined || Number.isNaN(v)) ? "–"
  : (typeof v === "number" ? v.toFixed(digits) : String(v));
const pct = (v) => (v === null || v === undefined) ? "–" : `${(100 * v).toFixed(0)}%`;

function parseHash() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  return { parts: (path || "/").split("/").filter(Boolean), params: new URLSearchParams(query || "") };
}

function setParams(updates) {
  const { parts, params } = parseHash();
  for (const [key, value] of Object.entries(updates)) {
    if (value === null || value === undefined || value === "") params.delete(key);
    else params.set(key, value);
  }
  const next = `#/${parts.join("/")}?${params.toString()}`;
  if (next !== location.hash) location.hash = next;
}

function plot(id, traces, layout) {
  const el = document.getElementById(id);
  if (!el) return null;
  const base = { margin: { l: 55, r: 20, t: 10, b: 45 }, paper_bgcolor: "#fff",
    plot_bgcolor: "#fff", font: { size: 12 }, legend: { orientation: "h", y: -0.2 } };
  Plotly.react(el, traces, { ...base, ...layout }, PLOT_CONFIG);
  return el;
}

function emptyState(message) {
  return `<div class="empty">${message}</div>`;
}

// ---------------------------------------------------------------- runs overview
async function renderRuns(token) {
  const data = await api("/runs");
  if (token !== renderToken) return;
  if (!data.runs.length) {
    view.innerHTML = `<h1>Runs</h1><div class="panel" id="runs-empty">${emptyState(
      "No runs yet. Point alphawatch at a training run: <code>alphawatch up runs/my-model</code>" +
      " — checkpoints appear here as they are analysed.")}</div>`;
    return;
  }
  const rows = data.runs.map((run) => `
    <tr data-run="${run.id}">
      <td><a href="#/runs/${run.id}">${esc(run.name)}</a><div class="muted">${esc(run.path)}</div></td>
      <td class="num">${run.n_done ?? 0} done · ${run.n_failed ?? 0} failed · ${run.n_pending ?? 0} pending</td>
      <td class="num">${fmt(run.last_step, 0)}</td>
      <td class="num">${fmt(run.latest_alpha)}</td>
      <td class="num">${pct(run.untrusted_share)}</td>
      <td><div class="spark" id="spark-${run.id}"></div></td>
      <td id="gate-${run.id}"><span class="muted">…</span></td>
    </tr>`).join("");
  view.innerHTML = `<h1>Runs</h1><div class="panel"><table id="runs-table">
    <thead><tr><th>Run</th><th>Checkpoints</th><th>Last step</th><th>Median α (trusted)</th>
    <th>Untrusted</th><th>Trend</th><th>CI gate</th></tr></thead><tbody>${rows}</tbody></table></div>`;
  for (const run of data.runs) {
    api(`/runs/${run.id}/trend?metric=alpha&stat=median&filter=trusted&max_points=100`)
      .then((trend) => {
        if (token !== renderToken) return;
        plot(`spark-${run.id}`, [{ x: trend.points.map((p) => p.step),
          y: trend.points.map((p) => p.value), mode: "lines", line: { color: COLORS.median, width: 1.5 },
          hoverinfo: "skip" }], { margin: { l: 0, r: 0, t: 0, b: 0 }, xaxis: { visible: false },
          yaxis: { visible: false }, showlegend: false, height: 36, width: 140 });
      }).catch(() => {});
    api(`/runs/${run.id}/gate`).then((gate) => {
      const cell = document.getElementById(`gate-${run.id}`);
      if (!cell || token !== renderToken) return;
      cell.innerHTML = gate.passed ? '<span class="badge pass">pass</span>'
        : `<span class="badge fail" title="${esc((gate.violations || []).map((v) => v.message).join("\n"))}">would fail</span>`;
    }).catch(() => {
      const cell = document.getElementById(`gate-${run.id}`);
      if (cell) cell.innerHTML = '<span class="muted">–</span>';
    });
  }
}

// ---------------------------------------------------------------- run page
function trendQuery(params, metric = "alpha") {
  const q = new URLSearchParams({ metric, stat: "median", filter: params.get("filter") || "trusted",
    outliers: params.get("outliers") || "none", max_points: "500" });
  const kinds = KIND_GROUPS[params.get("kind") || "all"];
  if (kinds) q.set("kind", kinds);
  return q.toString();
}

function exclusionText(point) {
  const reasons = Object.entries(point.excluded || {}).map(([k, v]) => `${k}: ${v}`).join("<br>");
  return `step ${point.step}<br>median ${fmt(point.value)}<br>used ${point.n_used} layers, ` +
    `excluded ${point.n_excluded}${reasons ? "<br>" + reasons : ""}`;
}

async function renderRun(runId, params, token) {
  const [run, checkpoints] = await Promise.all([api(`/runs/${runId}`), api(`/runs/${runId}/checkpoints`)]);
  if (token !== renderToken) return;
  const select = (name, options, value) => `<label>${name} <select data-param="${name}">${options
    .map(([v, label]) => `<option value="${v}"${v === value ? " selected" : ""}>${label}</option>`)
    .join("")}</select></label>`;
  const done = checkpoints.checkpoints.filter((c) => c.status === "done").length;
  const ckRows = checkpoints.checkpoints.map((c) => `<tr class="ck-${esc(c.status)}">
      <td class="num">${c.step}</td><td class="status-${esc(c.status)}">${esc(c.status)}</td>
      <td class="num">${c.n_layers ?? "–"}</td><td class="num">${c.n_trusted ?? "–"}</td>
      <td class="num">${fmt(c.analysis_s, 2)}</td><td>${esc(c.device ?? "")}</td>
      <td class="error">${esc(c.error ?? "")}</td></tr>`).join("");
  view.innerHTML = `
    <h1>${esc(run.name)} <span class="muted">${esc(run.path)}</span></h1>
    ${done === 0 ? `<div class="panel" id="run-empty">${emptyState(checkpoints.checkpoints.length
      ? "No checkpoint has been analysed yet; results appear here as the worker finishes them."
      : "This run has no checkpoints yet. alphawatch polls the directory and analyses each " +
        "checkpoint once it is complete (HF <code>checkpoint-&lt;step&gt;/</code>, DeepSpeed, Megatron, Lightning, safetensors).")}</div>` : ""}
    <div class="panel">
      <h2>Model-level α over training</h2>
      <div class="controls">
        ${select("filter", [["trusted", "trusted layers"], ["all", "all layers"]], params.get("filter") || "trusted")}
        ${select("kind", [["all", "all kinds"], ["attention", "attention q/k/v/o"], ["mlp", "mlp gate/up/down"], ["embeddings", "embeddings"]], params.get("kind") || "all")}
        ${select("outliers", [["none", "α > 8 only"], ["mad", "α > 8 + MAD rule"]], params.get("outliers") || "none")}
      </div>
      <div id="trend" class="plot"></div>
    </div>
    <div class="panel"><h2>α per layer and step <span class="muted">(× = untrusted; click a cell for its ESD)</span></h2>
      <div id="heatmap" class="plot"></div></div>
    <div class="grid2">
      <div class="panel"><h2>Flags per checkpoint</h2><div id="flags" class="plot small"></div></div>
      <div class="panel"><h2>Companion metrics (median)</h2><div id="companion" class="plot small"></div></div>
    </div>
    <div class="panel"><h2>Median α by layer kind</h2><div id="kinds" class="plot small"></div></div>
    <div class="panel" id="layer-panel" ${params.get("layer") ? "" : "hidden"}>
      <h2>Layer <span id="layer-name"></span></h2>
      <div class="grid2"><div id="layer-history" class="plot small"></div><div id="esd" class="plot small"></div></div>
    </div>
    <div class="panel"><h2>Checkpoints</h2><table id="checkpoints"><thead><tr><th>Step</th><th>Status</th>
      <th>Layers</th><th>Trusted</th><th>Analysis (s)</th><th>Device</th><th>Error</th></tr></thead>
      <tbody>${ckRows}</tbody></table></div>`;
  view.querySelectorAll("select[data-param]").forEach((el) =>
    el.addEventListener("change", () => setParams({ [el.dataset.param]: el.value })));
  await drawRunPlots(runId, params, token);
}

async function drawRunPlots(runId, params, token) {
  const [trend, heat, flags] = await Promise.all([
    api(`/runs/${runId}/trend?${trendQuery(params)}`),
    api(`/runs/${runId}/heatmap?metric=alpha`),
    api(`/runs/${runId}/flags`),
  ]);
  if (token !== renderToken) return;
  const steps = trend.points.map((p) => p.step);
  plot("trend", [
    { x: steps, y: trend.points.map((p) => p.p75), mode: "lines", line: { width: 0 },
      hoverinfo: "skip", showlegend: false },
    { x: steps, y: trend.points.map((p) => p.p25), mode: "lines", line: { width: 0 }, fill: "tonexty",
      fillcolor: COLORS.band, name: "25–75th percentile", hoverinfo: "skip" },
    { x: steps, y: trend.points.map((p) => p.value), mode: "lines+markers", name: "median α",
      line: { color: COLORS.median, width: 2.5 }, text: trend.points.map(exclusionText),
      hovertemplate: "%{text}<extra></extra>" },
    { x: steps, y: trend.points.map((p) => p.trimmed_mean), mode: "lines", name: "trimmed mean",
      line: { color: COLORS.trimmed, dash: "dot" } },
  ], { xaxis: { title: "step" }, yaxis: { title: "α" },
    shapes: [{ type: "rect", xref: "paper", x0: 0, x1: 1, y0: 2, y1: 6, fillcolor: COLORS.good,
      line: { width: 0 }, layer: "below" }],
    annotations: [{ xref: "paper", x: 1, y: 6, text: "2 ≤ α ≤ 6", showarrow: false,
      xanchor: "right", yanchor: "bottom", font: { color: "#00684b", size: 11 } }] });

  const untrustedX = [], untrustedY = [];
  heat.trusted.forEach((row, i) => row.forEach((t, j) => {
    if (t === false) { untrustedX.push(heat.steps[j]); untrustedY.push(heat.layers[i]); }
  }));
  const heatEl = plot("heatmap", [
    { type: "heatmap", x: heat.steps, y: heat.layers, z: heat.z, colorscale: "Viridis",
      zmin: 1, zmax: 8, colorbar: { title: "α" },
      hovertemplate: "%{y}<br>step %{x}<br>α %{z:.3f}<extra></extra>" },
    { type: "scatter", mode: "markers", x: untrustedX, y: untrustedY, name: "untrusted",
      marker: { symbol: "x-thin", size: 7, line: { color: "#fff", width: 1.5 } }, hoverinfo: "skip" },
  ], { height: Math.max(320, 16 * heat.layers.length + 80), margin: { l: 230, r: 20, t: 10, b: 45 },
    yaxis: { autorange: "reversed", type: "category" }, xaxis: { title: "step", type: "category" },
    showlegend: false });
  if (heatEl && !heatEl.dataset.bound) {
    heatEl.dataset.bound = "1";
    heatEl.on("plotly_click", (ev) => {
      const point = ev.points && ev.points[0];
      if (point) setParams({ layer: point.y, step: point.x });
    });
  }

  const fsteps = flags.points.map((p) => p.step);
  const flagTrace = (key, name, color) => ({ x: fsteps, y: flags.points.map((p) => p[key] ?? 0),
    type: "bar", name, marker: { color } });
  plot("flags", [flagTrace("correlation_trap", "correlation traps", COLORS.trap),
    flagTrace("rank_collapse", "rank collapse", COLORS.rank), flagTrace("poor_fit", "poor fit", COLORS.poor),
    flagTrace("tail_too_short", "short tail", COLORS.other)],
  { barmode: "stack", xaxis: { title: "step" }, yaxis: { title: "layers" } });

  const companionMetrics = [["log_spectral_norm", "#0072b2"], ["stable_rank", "#e69f00"],
    ["D", "#009e73"], ["distance_from_init", "#cc79a7"]];
  const companions = await Promise.all(companionMetrics.map(([m]) =>
    api(`/runs/${runId}/trend?${trendQuery(params, m)}&filter=all`).catch(() => null)));
  if (token !== renderToken) return;
  plot("companion", companions.map((c, i) => c && c.points.some((p) => p.value !== null) ? {
    x: c.points.map((p) => p.step), y: c.points.map((p) => p.value), mode: "lines+markers",
    name: companionMetrics[i][0], line: { color: companionMetrics[i][1] },
    yaxis: i === 1 ? "y2" : "y" } : null).filter(Boolean),
  { xaxis: { title: "step" }, yaxis: { title: "value", type: "log" },
    yaxis2: { title: "stable rank", overlaying: "y", side: "right" } });

  const kindGroups = Object.entries(KIND_GROUPS).filter(([k]) => k !== "all");
  const byKind = await Promise.all(kindGroups.map(([, kinds]) =>
    api(`/runs/${runId}/trend?metric=alpha&stat=median&filter=${params.get("filter") || "trusted"}&kind=${kinds}`)
      .catch(() => null)));
  if (token !== renderToken) return;
  plot("kinds", byKind.map((t, i) => t ? { x: t.points.map((p) => p.step), y: t.points.map((p) => p.value),
    mode: "lines+markers", name: kindGroups[i][0] } : null).filter(Boolean),
  { xaxis: { title: "step" }, yaxis: { title: "median α" } });

  const layer = params.get("layer");
  if (layer) await drawLayer(runId, layer, params.get("step"), token);
}

async function drawLayer(runId, layer, step, token) {
  const panel = document.getElementById("layer-panel");
  panel.hidden = false;
  document.getElementById("layer-name").textContent = layer + (step ? ` at step ${step}` : "");
  const history = await api(`/runs/${runId}/layers/${encodeURIComponent(layer)}/history?metric=alpha`);
  if (token !== renderToken) return;
  const pts = history.points;
  plot("layer-history", [
    { x: pts.map((p) => p.step), y: pts.map((p) => p.value), mode: "lines+markers", name: "α",
      error_y: { type: "data", array: pts.map((p) => p.D ?? 0), visible: true, color: "#94a3b8" },
      marker: { color: pts.map((p) => (p.trusted ? COLORS.median : COLORS.trap)) },
      text: pts.map((p) => `${p.fit_status}, D=${fmt(p.D)}`),
      hovertemplate: "step %{x}<br>α %{y:.3f}<br>%{text}<extra></extra>" },
  ], { xaxis: { title: "step" }, yaxis: { title: "α (bars: KS distance D)" }, showlegend: false });
  const atStep = step ?? (pts.length ? pts[pts.length - 1].step : null);
  if (atStep === null) return;
  const esd = await api(`/runs/${runId}/checkpoints/${atStep}/layers/${encodeURIComponent(layer)}/esd`);
  if (token !== renderToken) return;
  const positive = (xs) => (xs || []).filter((x) => x > 0).map((x) => Math.log10(x));
  const traces = [{ x: positive(esd.evals), type: "histogram", histnorm: "probability density",
    name: "ESD", marker: { color: COLORS.median }, opacity: 0.75, nbinsx: 60 }];
  if (esd.rand_evals) {
    traces.push({ x: positive(esd.rand_evals), type: "histogram", histnorm: "probability density",
      name: "shuffled W", marker: { color: COLORS.other }, opacity: 0.45, nbinsx: 60 });
  }
  const lines = [];
  const vline = (x, color, label) => {
    if (x > 0) lines.push({ type: "line", xref: "x", yref: "paper", x0: Math.log10(x),
      x1: Math.log10(x), y0: 0, y1: 1, line: { color, dash: "dash" }, name: label });
  };
  vline(esd.xmin, COLORS.trap, "xmin");
  vline(esd.mp_bulk_max, "#009e73", "MP edge");
  if (esd.fit_line && esd.fit_line.x && esd.fit_line.x.length) {
    traces.push({ x: esd.fit_line.x.map((x) => Math.log10(x)), y: esd.fit_line.y, mode: "lines",
      name: `power law α=${fmt(esd.alpha)}`, line: { color: COLORS.trap, width: 2 } });
  }
  plot("esd", traces, { barmode: "overlay", shapes: lines,
    xaxis: { title: "log10 eigenvalue (dashed: xmin, MP edge)" }, yaxis: { title: "density" } });
}

// ---------------------------------------------------------------- compare
async function renderCompare(params, token) {
  const runs = (await api("/runs")).runs;
  if (token !== renderToken) return;
  const chosen = (params.get("runs") || runs.slice(0, 5).map((r) => r.id).join(",")).split(",").filter(Boolean);
  view.innerHTML = `<h1>Compare runs</h1><div class="panel">
    <div class="controls">${runs.map((r) => `<label><input type="checkbox" value="${r.id}"
      ${chosen.includes(String(r.id)) ? "checked" : ""}> ${esc(r.name)}</label>`).join("")}</div>
    <div id="compare" class="plot"></div></div>`;
  view.querySelectorAll("input[type=checkbox]").forEach((el) => el.addEventListener("change", () => {
    const ids = [...view.querySelectorAll("input:checked")].map((i) => i.value);
    setParams({ runs: ids.join(",") });
  }));
  if (!chosen.length) return;
  const data = await api(`/compare?runs=${chosen.join(",")}&metric=alpha&stat=median`);
  if (token !== renderToken) return;
  plot("compare", data.runs.map((r) => ({ x: r.points.map((p) => p.step), y: r.points.map((p) => p.value),
    mode: "lines+markers", name: r.name })), { xaxis: { title: "step" }, yaxis: { title: "median α" } });
}

// ---------------------------------------------------------------- routing and live updates
async function render({ quiet = false } = {}) {
  const token = ++renderToken;
  const { parts, params } = parseHash();
  try {
    if (parts[0] === "runs" && parts[1]) {
      if (quiet && document.getElementById("trend")) await drawRunPlots(parts[1], params, token);
      else await renderRun(parts[1], params, token);
    } else if (parts[0] === "compare") {
      if (!quiet) await renderCompare(params, token);
    } else {
      await renderRuns(token);
    }
  } catch (err) {
    if (token === renderToken && !quiet) {
      view.innerHTML = `<div class="panel error" id="error">Could not load: ${esc(err.message)}</div>`;
    }
  }
}

function startPolling() {
  clearInterval(pollTimer);
  document.getElementById("live").classList.add("on");
  pollTimer = setInterval(() => { if (!document.hidden) render({ quiet: true }); }, POLL_MS);
}

window.addEventListener("hashchange", () => render());
render().then(startPolling);
