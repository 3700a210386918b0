// alphawatch dashboard: a hash-routed page that reads only the public REST API (/api/v1),
// so it shows exactly the numbers a CI gate sees. Plotly is served by the API, offline.

const API = "/api/v1";
const POLL_MS = 4000;
// Named groups of layer kinds; a URL may also carry a raw list such as kind=q,k.
const KIND_GROUPS = {
  attention: "q,k,v,o,qkv",
  mlp: "gate,up,down,fc_in,fc_out",
  embeddings: "embed,lm_head",
};
const KIND_ORDER = ["q", "k", "v", "o", "qkv", "gate", "up", "down", "fc_in", "fc_out", "embed",
  "lm_head", "conv", "other"];
// Okabe–Ito: distinguishable under the common colour-vision deficiencies.
const C = { blue: "#0072b2", orange: "#e69f00", green: "#009e73", vermillion: "#d55e00",
  purple: "#cc79a7", sky: "#56b4e9", yellow: "#f0e442", grey: "#6b7280",
  band: "rgba(0,114,178,0.16)", good: "rgba(0,158,115,0.09)" };
const PLOT_CONFIG = { displaylogo: false, responsive: true,
  modeBarButtonsToRemove: ["lasso2d", "select2d"] };
const COMPANIONS = [["log_spectral_norm", "log₁₀ spectral norm"], ["stable_rank", "stable rank"],
  ["D", "KS distance D (fit quality)"], ["distance_from_init", "distance from init"]];
const FLAG_SERIES = [["correlation_trap", "correlation trap", C.vermillion],
  ["rank_collapse", "rank collapse", C.purple], ["poor_fit", "poor fit", C.orange],
  ["tail_too_short", "tail too short", C.sky], ["unstable", "unstable fit", C.grey]];
// Past this many untrusted cells, per-cell markers cost more than they tell: fade cells instead.
const MAX_MARKERS = 4000;

const view = document.getElementById("view");
let renderToken = 0;
let pollTimer = null;
let lastSignature = null;
// What the run plots on screen were drawn from; a change of layer or step alone redraws only the
// layer panel.
let drawnKey = null;
const heavy = new Map();

// ---------------------------------------------------------------- helpers
// Servers that require a token for reads get one typed in once per browser tab; it is kept in
// sessionStorage only, never in the URL, so shared links do not leak it.
const TOKEN_KEY = "alphawatch.token";

class ApiError extends Error {
  constructor(status, message) { super(`${status}: ${message}`); this.status = status; }
}

async function api(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(API + path, { headers });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail ?? detail; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status,
      typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response.json();
}

function askToken(message) {
  view.innerHTML = `<div class="panel" id="token-form"><h2>This server needs an API token</h2>
    <p class="muted">${esc(message)}. Create one with <code>alphawatch token create NAME</code>;
    it is kept for this tab only.</p><form class="controls"><label>Token
    <input type="password" id="token-input" autocomplete="off" required></label>
    <button type="submit">Use token</button></form></div>`;
  view.querySelector("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
    render();
  });
}

// Heatmap, flags and layer lists change only when checkpoints do: keep them per signature, so
// a switch of filter or layer on a long run does not download them again.
function apiOnce(path) {
  const hit = heavy.get(path);
  if (hit && hit.signature === lastSignature) return hit.promise;
  const promise = api(path);
  heavy.set(path, { signature: lastSignature, promise });
  promise.catch(() => heavy.delete(path));
  return promise;
}

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;",
    ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const fmt = (v, digits = 3) => (isNum(v) ? v.toFixed(digits) : (v === null || v === undefined
  ? "–" : String(v)));
const pct = (v) => (isNum(v) ? `${(100 * v).toFixed(0)}%` : "–");
const enc = encodeURIComponent;

function parseHash() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  return { parts: (path || "/").split("/").filter(Boolean),
    params: new URLSearchParams(query || "") };
}

function setParams(updates) {
  const { parts, params } = parseHash();
  for (const [key, value] of Object.entries(updates)) {
    if (value === null || value === undefined || value === "") params.delete(key);
    else params.set(key, String(value));
  }
  const query = params.toString();
  const next = `#/${parts.map(enc).join("/")}${query ? `?${query}` : ""}`;
  if (next !== location.hash) location.hash = next;
}

function kindQuery(value) {
  if (!value || value === "all") return "";
  return KIND_GROUPS[value] ?? value;
}

function plot(id, traces, layout = {}) {
  const el = typeof id === "string" ? document.getElementById(id) : id;
  if (!el) return null;
  const base = { margin: { l: 60, r: 20, t: 10, b: 45 }, paper_bgcolor: "#fff",
    plot_bgcolor: "#fff", font: { size: 12, family: "system-ui, sans-serif", color: "#1f2328" },
    legend: { orientation: "h", x: 0, y: 1.02, xanchor: "left", yanchor: "bottom" },
    hoverlabel: { align: "left" } };
  const full = { ...base, ...layout };
  // A zero line at step 0 reads as a data feature on a step axis.
  for (const key of Object.keys(full)) {
    if (key.startsWith("xaxis")) full[key] = { zeroline: false, ...full[key] };
  }
  if (!full.xaxis) full.xaxis = { zeroline: false };
  Plotly.react(el, traces, full, PLOT_CONFIG);
  el.dataset.rendered = "1";
  return el;
}

function note(el, message) {
  // A plot with nothing to show says so instead of drawing empty axes.
  if (typeof el === "string") el = document.getElementById(el);
  if (!el) return;
  if (el.data) Plotly.purge(el);
  el.innerHTML = `<p class="plot-note">${message}</p>`;
}

const goodBand = { type: "rect", xref: "paper", x0: 0, x1: 1, y0: 2, y1: 6,
  fillcolor: C.good, line: { width: 0 }, layer: "below" };
const goodLabel = { xref: "paper", x: 1, y: 6, text: "well trained: 2 ≤ α ≤ 6", showarrow: false,
  xanchor: "right", yanchor: "bottom", font: { color: "#00684b", size: 11 } };

function select(name, label, options, value) {
  const opts = options.map(([v, text]) =>
    `<option value="${esc(v)}"${v === value ? " selected" : ""}>${esc(text)}</option>`).join("");
  return `<label>${esc(label)} <select data-param="${esc(name)}">${opts}</select></label>`;
}

function bindParamSelects(root) {
  root.querySelectorAll("select[data-param]").forEach((el) =>
    el.addEventListener("change", () => setParams({ [el.dataset.param]: el.value })));
}

function gateBadge(gate) {
  if (!gate) return '<span class="muted">–</span>';
  const reasons = (gate.violations || []).map((v) => v.message).join("\n");
  if (gate.passed) {
    return `<span class="badge pass" title="median α ${esc(fmt(gate.value))} at step ${
      esc(gate.step)}">gate passes</span>`;
  }
  if ((gate.violations || []).every((v) => v.rule === "no_data")) {
    return `<span class="badge none" title="${esc(reasons)}">no data</span>`;
  }
  return `<span class="badge fail" title="${esc(reasons)}">⚠ gate would fail</span>` +
    `<div class="muted small">${esc(reasons)}</div>`;
}

// ---------------------------------------------------------------- runs overview
async function renderRuns(token) {
  const data = await api("/runs?limit=1000");
  if (token !== renderToken) return;
  lastSignature = JSON.stringify(data.runs.map((r) =>
    [r.id, r.n_checkpoints, r.n_done, r.n_failed, r.n_pending, r.last_step]));
  if (!data.runs.length) {
    view.innerHTML = `<h1>Runs</h1><div class="panel" id="runs-empty"><div class="empty">
      <p><strong>No runs yet.</strong></p>
      <p>Start watching a training run and its checkpoints appear here as they are analysed:</p>
      <p><code>alphawatch up RUN_DIR</code></p>
      <p class="muted">RUN_DIR is the folder your trainer saves checkpoints into
      (e.g. HF <code>checkpoint-&lt;step&gt;/</code>). This page refreshes by itself.</p>
    </div></div>`;
    return;
  }
  const rows = data.runs.map((run) => `
    <tr data-run="${run.id}">
      <td><a href="#/runs/${run.id}">${esc(run.name)}</a><div class="muted small">${
        esc(run.path)}</div></td>
      <td class="num">${run.n_done ?? 0} done${run.n_failed ? ` · <span class="status-failed">${
        run.n_failed} failed</span>` : ""}${run.n_pending ? ` · ${run.n_pending} pending` : ""}</td>
      <td class="num">${fmt(run.last_step, 0)}</td>
      <td class="num">${fmt(run.latest_alpha)}</td>
      <td class="num">${pct(run.untrusted_share)}</td>
      <td><div class="spark" id="spark-${run.id}" aria-label="median α trend of ${
        esc(run.name)}"></div></td>
      <td id="gate-${run.id}"><span class="muted">…</span></td>
    </tr>`).join("");
  view.innerHTML = `<h1>Runs</h1><div class="panel"><table id="runs-table">
    <thead><tr><th scope="col">Run</th><th scope="col">Checkpoints</th>
    <th scope="col">Last step</th><th scope="col">Median α (trusted, latest)</th>
    <th scope="col">Untrusted layers</th><th scope="col">Trend</th>
    <th scope="col">CI gate (defaults)</th></tr></thead><tbody>${rows}</tbody></table></div>
    <p class="muted">Median α over trusted layers of the latest analysed checkpoint; the gate
    fails when it leaves 2–6. Hover a badge for the reasons.</p>`;
  for (const run of data.runs) {
    api(`/runs/${run.id}/trend?metric=alpha&stat=median&filter=trusted&max_points=60`)
      .then((trend) => {
        if (token !== renderToken) return;
        const el = document.getElementById(`spark-${run.id}`);
        if (!trend.points.length) { if (el) el.innerHTML = '<span class="muted">–</span>'; return; }
        plot(el, [{ x: trend.points.map((p) => p.step), y: trend.points.map((p) => p.value),
          mode: trend.points.length > 1 ? "lines" : "markers", line: { color: C.blue, width: 1.5 },
          marker: { color: C.blue, size: 5 }, hoverinfo: "skip" }],
        { margin: { l: 0, r: 0, t: 2, b: 2 }, xaxis: { visible: false, fixedrange: true },
          yaxis: { visible: false, fixedrange: true }, showlegend: false, height: 36, width: 140 });
        el.querySelector(".modebar-container")?.remove();
      }).catch(() => {});
    api(`/runs/${run.id}/gate`).then((gate) => {
      const cell = document.getElementById(`gate-${run.id}`);
      if (cell && token === renderToken) cell.innerHTML = gateBadge(gate);
    }).catch(() => {
      const cell = document.getElementById(`gate-${run.id}`);
      if (cell) cell.innerHTML = '<span class="muted">–</span>';
    });
  }
}

// ---------------------------------------------------------------- run page
function trendQuery(params, metric = "alpha", extra = {}) {
  const q = new URLSearchParams({ metric, stat: "median", filter: params.get("filter") || "trusted",
    outliers: params.get("outliers") || "none", max_points: "500", ...extra });
  const kinds = kindQuery(params.get("kind"));
  if (kinds) q.set("kind", kinds);
  return q.toString();
}

function exclusionText(point) {
  const reasons = Object.entries(point.excluded || {}).sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `  ${k.replaceAll("_", " ")}: ${v}`).join("<br>");
  return `<b>step ${point.step}</b><br>median α ${fmt(point.value)}` +
    ` (IQR ${fmt(point.p25)}–${fmt(point.p75)})<br>trimmed mean ${fmt(point.trimmed_mean)}` +
    `<br>used ${point.n_used} layers, excluded ${point.n_excluded}` +
    (reasons ? `<br>${reasons}` : "");
}

function runSkeleton(runId, params) {
  const kind = params.get("kind") || "all";
  const kindOptions = [["all", "all kinds"], ["attention", "attention q/k/v/o"],
    ["mlp", "mlp gate/up/down"], ["embeddings", "embeddings"]];
  if (!(kind in KIND_GROUPS) && kind !== "all") kindOptions.push([kind, `kinds ${kind}`]);
  return `
    <h1 id="run-title">Run <span class="muted">#${esc(runId)}</span></h1>
    <div id="run-summary" class="summary"></div>
    <div id="run-discovery" class="panel error discovery" role="alert" hidden></div>
    <div class="panel" id="run-empty" hidden></div>
    <div id="run-body">
    <div class="panel">
      <h2>Model-level α over training</h2>
      <div class="controls" role="group" aria-label="trend switches">
        ${select("filter", "Layers", [["trusted", "trusted only"], ["all", "all layers"]],
          params.get("filter") || "trusted")}
        ${select("kind", "Kind", kindOptions, kind)}
        ${select("outliers", "Outlier rule", [["none", "none (α > 8 dropped)"],
          ["mad", "MAD, 3 scaled MADs"]], params.get("outliers") || "none")}
      </div>
      <div id="trend" class="plot"></div>
      <p class="muted small">Line: median α per checkpoint; band: 25th–75th percentile; dotted:
      10% trimmed mean. Green band: 2 ≤ α ≤ 6. Hover a point for how many layers it used and why
      the others were left out.</p>
    </div>
    <div class="panel">
      <h2>α per layer and step</h2>
      <div class="controls">
        <label>Open layer <select id="layer-pick"><option value="">choose…</option></select></label>
        <span class="muted small">Click a cell for that layer's ESD at that step.
        <span class="legend-x">×</span> / faded: untrusted fit.</span>
      </div>
      <div id="heatmap" class="plot"></div>
    </div>
    <div class="panel" id="layer-panel" hidden>
      <div class="panel-head"><h2>Layer <code id="layer-name"></code></h2>
        <label>Step <select id="esd-step"></select></label>
        <button type="button" id="layer-close" class="link">close</button></div>
      <div class="grid2"><div><h3>α history and fit quality</h3>
        <div id="layer-history" class="plot small"></div></div>
        <div><h3>Eigenvalue spectrum (ESD), log–log</h3><div id="esd" class="plot small"></div>
        </div></div>
      <p class="muted small" id="layer-note"></p>
    </div>
    <div class="panel"><h2>Median α by layer kind</h2>
      <div id="kinds" class="plot kinds"></div></div>
    <div class="grid2">
      <div class="panel"><h2>Flags per checkpoint</h2><div id="flags" class="plot small"></div>
        <p class="muted small">Layers per checkpoint carrying each flag; a rising bar is a
        layer going wrong.</p></div>
      <div class="panel"><h2>Companion metrics (median over layers)</h2>
        <div id="companion" class="plot small"></div></div>
    </div>
    </div>
    <div class="panel"><h2>Checkpoints</h2><div class="table-scroll"><table id="checkpoints">
      <thead><tr><th scope="col">Step</th><th scope="col">Status</th><th scope="col">Layers</th>
      <th scope="col">Trusted</th><th scope="col">Analysis (s)</th><th scope="col">Device</th>
      <th scope="col">Error</th></tr></thead><tbody></tbody></table></div></div>`;
}

async function renderRun(runId, params, token) {
  view.innerHTML = runSkeleton(runId, params);
  view.dataset.run = String(runId);
  drawnKey = null;
  bindParamSelects(view);
  document.getElementById("layer-pick").addEventListener("change", (ev) => {
    if (ev.target.value) setParams({ layer: ev.target.value });
  });
  document.getElementById("esd-step").addEventListener("change", (ev) =>
    setParams({ step: ev.target.value }));
  document.getElementById("layer-close").addEventListener("click", () =>
    setParams({ layer: null, step: null }));
  await refreshRun(runId, params, token);
}

async function refreshRun(runId, params, token) {
  const [run, checkpoints, gate] = await Promise.all([api(`/runs/${runId}`),
    api(`/runs/${runId}/checkpoints`), api(`/runs/${runId}/gate`).catch(() => null)]);
  if (token !== renderToken) return;
  lastSignature = JSON.stringify([run.n_checkpoints, run.n_done, run.n_failed, run.n_pending,
    run.last_step, run.discovery_error]);
  document.title = `${run.name} · alphawatch`;
  document.getElementById("run-title").innerHTML =
    `${esc(run.name)} <span class="muted small">${esc(run.path)}</span>`;
  document.getElementById("run-summary").innerHTML = `
    <span><b>${run.n_done ?? 0}</b> analysed</span>
    <span class="${run.n_failed ? "status-failed" : ""}"><b>${run.n_failed ?? 0}</b> failed</span>
    <span><b>${run.n_pending ?? 0}</b> pending</span>
    <span>last step <b>${fmt(run.last_step, 0)}</b></span>
    <span>median α <b>${fmt(run.latest_alpha)}</b></span>
    <span>untrusted <b>${pct(run.untrusted_share)}</b></span>
    <span id="run-gate">${gateBadge(gate)}</span>`;
  // What discovery refused without a checkpoint to show it on (or why it could not list the
  // run at all): shown above everything, since it can hide checkpoints from the table.
  const discovery = document.getElementById("run-discovery");
  discovery.hidden = !run.discovery_error;
  discovery.innerHTML = run.discovery_error
    ? `<b>Discovery problems in this run</b><pre>${esc(run.discovery_error)}</pre>` : "";
  renderCheckpointTable(checkpoints.checkpoints);
  const done = checkpoints.checkpoints.filter((c) => c.status === "done");
  const empty = document.getElementById("run-empty");
  const body = document.getElementById("run-body");
  if (!done.length) {
    empty.hidden = false;
    body.hidden = true;
    empty.innerHTML = `<div class="empty">${checkpoints.checkpoints.length
      ? "<p><strong>No checkpoint has been analysed yet.</strong></p><p>Results appear here as" +
        " the worker finishes them; see the table below for failures.</p>"
      : "<p><strong>This run has no checkpoints yet.</strong></p><p>alphawatch polls the run" +
        " directory and analyses each checkpoint once it is complete (HF" +
        " <code>checkpoint-&lt;step&gt;/</code>, DeepSpeed, Megatron, Lightning, safetensors)." +
        " Is a worker running? <code>alphawatch up RUN_DIR</code></p>"}
      <p class="muted">This page updates by itself when one arrives.</p></div>`;
    return;
  }
  empty.hidden = true;
  body.hidden = false;
  await drawRunPlots(runId, params, token, run, done);
}

function renderCheckpointTable(list) {
  const tbody = document.querySelector("#checkpoints tbody");
  if (!tbody) return;
  // Newest first, so a long run shows its latest state without scrolling.
  const rows = [...list].sort((a, b) => b.step - a.step).map((c) => `<tr class="ck-${
    esc(c.status)}"><td class="num">${c.step}</td><td class="status-${esc(c.status)}">${
    esc(c.status)}${reanalysed(c)}</td><td class="num">${c.n_layers ?? "–"}</td><td class="num">${
    c.n_trusted ?? "–"}</td><td class="num">${fmt(c.analysis_s, 2)}</td><td>${
    esc(c.device ?? "")}</td><td class="error">${esc(checkpointError(c))}</td></tr>`).join("");
  tbody.innerHTML = rows || '<tr><td colspan="7" class="muted">no checkpoints</td></tr>';
}

// A checkpoint whose files changed in place is analysed again; say so beside its status.
function reanalysed(c) {
  if (!(c.analysis_count > 1)) return "";
  const when = c.rewritten_at ? ` (files changed ${new Date(c.rewritten_at).toLocaleString()})`
    : "";
  return ` <span class="muted small" title="analysed ${c.analysis_count} times${esc(when)}">` +
    `re-analysed ×${c.analysis_count - 1}</span>`;
}

function checkpointError(c) {
  // Refused at discovery: error and discovery_error are the same text, shown once.
  if (c.discovery_error && c.discovery_error !== c.error) {
    return [c.error, `discovery: ${c.discovery_error}`].filter(Boolean).join(" · ");
  }
  return c.error ?? "";
}

async function drawRunPlots(runId, params, token, run, done) {
  const layer = params.get("layer");
  const layerTask = layer ? drawLayer(runId, layer, params.get("step"), run, token) : null;
  if (!layer) document.getElementById("layer-panel").hidden = true;
  const key = JSON.stringify([runId, lastSignature, params.get("filter"), params.get("kind"),
    params.get("outliers")]);
  if (key === drawnKey) {
    const pick = document.getElementById("layer-pick");
    pick.value = layer && [...pick.options].some((o) => o.value === layer) ? layer : "";
    await layerTask;
    return;
  }
  const lastStep = done.reduce((m, c) => Math.max(m, c.step), -Infinity);
  const [trend, heat, flags, latest] = await Promise.all([
    api(`/runs/${runId}/trend?${trendQuery(params)}`),
    apiOnce(`/runs/${runId}/heatmap?metric=alpha&max_points=500`),
    apiOnce(`/runs/${runId}/flags`),
    apiOnce(`/runs/${runId}/checkpoints/${lastStep}/layers`),
  ]);
  if (token !== renderToken) return;
  drawTrend(trend);
  const kindOf = Object.fromEntries(latest.layers.map((l) => [l.name, l.kind]));
  drawHeatmap(heat, kindOf);
  drawFlags(flags.points);
  fillLayerPick(heat.layers, layer);
  await Promise.all([drawKinds(runId, params, latest.layers, token),
    drawCompanions(runId, params, token), layerTask]);
  if (token === renderToken) drawnKey = key;
}

function drawTrend(trend) {
  const pts = trend.points;
  if (!pts.some((p) => isNum(p.value))) {
    note("trend", "No layer passes this filter at any checkpoint; try <b>all layers</b>.");
    return;
  }
  const steps = pts.map((p) => p.step);
  const values = pts.flatMap((p) => [p.p25, p.p75, p.value, p.trimmed_mean]).filter(isNum);
  // Keep the 2–6 band in view as a band, with room for points outside it.
  const range = [Math.min(1.5, ...values) - 0.2, Math.max(6.5, ...values) + 0.2];
  plot("trend", [
    { x: steps, y: pts.map((p) => p.p75), mode: "lines", line: { width: 0, color: C.blue },
      hoverinfo: "skip", showlegend: false },
    { x: steps, y: pts.map((p) => p.p25), mode: "lines", line: { width: 0, color: C.blue },
      fill: "tonexty", fillcolor: C.band, name: "25–75th percentile", hoverinfo: "skip" },
    { x: steps, y: pts.map((p) => p.value), mode: "lines+markers", name: "median α",
      line: { color: C.blue, width: 2.5 }, marker: { size: pts.length > 80 ? 3 : 6 },
      text: pts.map(exclusionText), customdata: pts.map((p) => p.n_used),
      hovertemplate: "%{text}<extra></extra>" },
    { x: steps, y: pts.map((p) => p.trimmed_mean), mode: "lines", name: "trimmed mean",
      line: { color: C.orange, dash: "dot", width: 2 }, hoverinfo: "skip" },
  ], { xaxis: { title: { text: "step" } }, yaxis: { title: { text: "α" }, range },
    shapes: [goodBand], annotations: [goodLabel], hovermode: "closest",
    margin: { l: 60, r: 20, t: 30, b: 45 } });
}

function drawHeatmap(heat, kindOf) {
  const el = document.getElementById("heatmap");
  if (!heat.layers.length) { note(el, "No layer metrics yet."); return; }
  const nRows = heat.layers.length;
  const hover = heat.trusted.map((row, i) => row.map((t) =>
    `${kindOf[heat.layers[i]] ?? ""}${t === false ? " · untrusted" : ""}`));
  const traces = [{ type: "heatmap", x: heat.steps, y: heat.layers, z: heat.z,
    customdata: hover, colorscale: "Viridis", zmin: 1, zmax: 8, xgap: nRows < 60 ? 1 : 0,
    ygap: nRows < 60 ? 1 : 0, colorbar: { title: { text: "α" }, thickness: 14 },
    hovertemplate: "%{y}<br>step %{x}<br>α %{z:.3f} %{customdata}<extra></extra>" }];
  let nUntrusted = 0;
  heat.trusted.forEach((row) => row.forEach((t) => { if (t === false) nUntrusted += 1; }));
  if (nUntrusted && nUntrusted <= MAX_MARKERS) {
    const xs = [], ys = [];
    heat.trusted.forEach((row, i) => row.forEach((t, j) => {
      if (t === false) { xs.push(heat.steps[j]); ys.push(heat.layers[i]); }
    }));
    traces.push({ type: "scatter", mode: "markers", x: xs, y: ys, name: "untrusted",
      marker: { symbol: "x-thin", size: nRows < 60 ? 8 : 5,
        line: { color: "rgba(255,255,255,0.95)", width: 1.5 } }, hoverinfo: "skip" });
  } else if (nUntrusted) {
    traces.push({ type: "heatmap", x: heat.steps, y: heat.layers, name: "untrusted",
      z: heat.trusted.map((row) => row.map((t) => (t === false ? 1 : null))),
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

function fillLayerPick(layers, current) {
  const pick = document.getElementById("layer-pick");
  const key = layers.join("\n");
  if (pick.dataset.key !== key) {
    pick.dataset.key = key;
    pick.innerHTML = '<option value="">choose…</option>' + layers.map((n) =>
      `<option value="${esc(n)}">${esc(n)}</option>`).join("");
  }
  pick.value = current && layers.includes(current) ? current : "";
}

function drawFlags(points) {
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

async function drawCompanions(runId, params, token) {
  const results = await Promise.all(COMPANIONS.map(([m]) =>
    api(`/runs/${runId}/trend?${trendQuery(params, m, { max_points: "300" })}`)
      .catch(() => null)));
  if (token !== renderToken) return;
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

async function drawKinds(runId, params, layers, token) {
  const seen = new Set(layers.map((l) => l.kind));
  const kinds = KIND_ORDER.filter((k) => seen.has(k))
    .concat([...seen].filter((k) => !KIND_ORDER.includes(k)).sort());
  const filter = params.get("filter") || "trusted";
  const outliers = params.get("outliers") || "none";
  const results = await Promise.all(kinds.map((k) =>
    api(`/runs/${runId}/trend?metric=alpha&stat=median&filter=${filter}&outliers=${outliers}` +
      `&kind=${enc(k)}&max_points=150`).catch(() => null)));
  if (token !== renderToken) return;
  const el = document.getElementById("kinds");
  if (!kinds.length) { note(el, "No layer kinds recorded."); return; }
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
      hovertemplate: `${kind}<br>step %{x}<br>median α %{y:.3f}<br>%{customdata} layers` +
        "<extra></extra>" });
    // Same α scale in every panel, so panels compare by eye.
    layout[`yaxis${ax}`] = { range: [1, 8], nticks: 5, matches: i ? "y" : undefined };
    layout[`xaxis${ax}`] = { nticks: 4, matches: i ? "x" : undefined };
    layout.shapes.push({ ...goodBand, xref: `x${ax} domain`, yref: `y${ax}` });
    layout.annotations.push({ text: `<b>${esc(kind)}</b>`, xref: `x${ax} domain`,
      yref: `y${ax} domain`, x: 0.02, y: 1, xanchor: "left", yanchor: "bottom",
      showarrow: false, font: { size: 12 } });
    if (!pts.some((p) => isNum(p.value))) {
      layout.annotations.push({ text: filter === "trusted" ? "no trusted layer" : "no value",
        xref: `x${ax} domain`, yref: `y${ax} domain`, x: 0.5, y: 0.5, showarrow: false,
        font: { size: 11, color: "#5b6472" } });
    }
  });
  plot(el, traces, layout);
}

async function drawLayer(runId, layer, step, run, token) {
  const panel = document.getElementById("layer-panel");
  const wasHidden = panel.hidden;
  panel.hidden = false;
  document.getElementById("layer-name").textContent = layer;
  let history;
  try {
    history = await api(`/runs/${runId}/layers/${enc(layer)}/history?metric=alpha&max_points=500`);
  } catch (err) {
    if (token !== renderToken) return;
    note("layer-history", esc(err.message));
    note("esd", "");
    return;
  }
  if (token !== renderToken) return;
  const pts = history.points;
  const atStep = step !== null && pts.some((p) => String(p.step) === String(step))
    ? Number(step) : (pts.length ? pts[pts.length - 1].step : null);
  const stepPick = document.getElementById("esd-step");
  stepPick.innerHTML = pts.map((p) =>
    `<option value="${p.step}"${p.step === atStep ? " selected" : ""}>${p.step}</option>`).join("");
  const maxD = run?.thresholds?.max_ks_distance;
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
      rangemode: "tozero", showgrid: false, nticks: 5, tickformat: ".2f", range: [0, Math.max(0.3, ...pts.map((p) => p.D ?? 0))] },
    shapes: [goodBand, ...(isNum(maxD) ? [{ type: "line", xref: "paper", x0: 0, x1: 1,
      yref: "y2", y0: maxD, y1: maxD, line: { color: C.grey, dash: "dot", width: 1 } }] : [])],
    margin: { l: 55, r: 60, t: 30, b: 45 } });
  if (!hist.dataset.bound) {
    hist.dataset.bound = "1";
    hist.on("plotly_click", (ev) => {
      const point = ev.points && ev.points[0];
      if (point) setParams({ step: point.x });
    });
  }
  if (wasHidden) panel.scrollIntoView({ block: "nearest" });
  if (atStep === null) { note("esd", "This layer has no analysed step."); return; }
  let esd;
  try {
    esd = await api(`/runs/${runId}/checkpoints/${atStep}/layers/${enc(layer)}/esd`);
  } catch (err) {
    if (token === renderToken) note("esd", esc(err.message));
    return;
  }
  if (token !== renderToken) return;
  drawEsd(esd, maxD);
}

function drawEsd(esd, maxD) {
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

// ---------------------------------------------------------------- compare
async function renderCompare(params, token) {
  const runs = (await api("/runs?limit=1000")).runs;
  if (token !== renderToken) return;
  lastSignature = JSON.stringify(runs.map((r) => [r.id, r.n_done, r.last_step]));
  const chosen = (params.get("runs") ?? runs.slice(0, 5).map((r) => r.id).join(","))
    .split(",").filter(Boolean);
  const filter = params.get("filter") || "trusted";
  if (!document.getElementById("compare")) {
    view.innerHTML = `<h1>Compare runs</h1><div class="panel">
      <div class="controls" id="compare-runs" role="group" aria-label="runs to compare"></div>
      <div class="controls">${select("filter", "Layers", [["trusted", "trusted only"],
        ["all", "all layers"]], filter)}</div>
      <div id="compare" class="plot"></div>
      <p class="muted small">Median α over layers per checkpoint, one line per run; the green
      band is 2 ≤ α ≤ 6.</p></div>`;
    bindParamSelects(view);
  }
  const box = document.getElementById("compare-runs");
  box.innerHTML = runs.length ? runs.map((r) => `<label class="check"><input type="checkbox"
    value="${r.id}" ${chosen.includes(String(r.id)) ? "checked" : ""}> ${esc(r.name)}</label>`)
    .join("") : '<span class="muted">No runs yet: <code>alphawatch up RUN_DIR</code></span>';
  box.querySelectorAll("input[type=checkbox]").forEach((el) => el.addEventListener("change", () =>
    setParams({ runs: [...box.querySelectorAll("input:checked")].map((i) => i.value).join(",") })));
  if (!chosen.length) { note("compare", "Tick one or more runs to overlay their trends."); return; }
  const data = await api(`/compare?runs=${chosen.join(",")}&metric=alpha&stat=median` +
    `&filter=${filter}&max_points=500`);
  if (token !== renderToken) return;
  const palette = [C.blue, C.orange, C.green, C.vermillion, C.purple, C.sky, "#000000", C.yellow];
  plot("compare", data.runs.map((r, i) => ({ x: r.points.map((p) => p.step),
    y: r.points.map((p) => p.value), mode: "lines+markers", name: r.name,
    line: { color: palette[i % palette.length], width: 2 }, marker: { size: 5 },
    customdata: r.points.map((p) => p.n_used),
    hovertemplate: `${esc(r.name)}<br>step %{x}<br>median α %{y:.3f}<br>%{customdata} layers` +
      "<extra></extra>" })), { xaxis: { title: { text: "step" } },
    yaxis: { title: { text: "median α" } }, shapes: [goodBand], annotations: [goodLabel] });
}

// ---------------------------------------------------------------- routing and live updates
async function render({ quiet = false } = {}) {
  const token = ++renderToken;
  const { parts, params } = parseHash();
  if (!(parts[0] === "runs" && parts[1])) view.dataset.run = "";
  document.querySelectorAll(".top nav a").forEach((a) => a.classList.toggle("active",
    (parts[0] || "runs") === (a.dataset.nav || "")));
  try {
    if (parts[0] === "runs" && parts[1]) {
      if (quiet && document.getElementById("run-body")) await refreshRun(parts[1], params, token);
      else await renderRun(parts[1], params, token);
    } else if (parts[0] === "compare") {
      if (!quiet) view.innerHTML = "";
      await renderCompare(params, token);
    } else {
      if (!quiet) document.title = "alphawatch";
      await renderRuns(token);
    }
    setLive(true);
  } catch (err) {
    if (token !== renderToken) return;
    if (quiet) { setLive(false, err.message); return; }
    if (err.status === 401 || err.status === 403) { askToken(err.message); return; }
    view.innerHTML = `<div class="panel error" id="error" role="alert">Could not load: ${
      esc(err.message)}</div>`;
  }
}

function setLive(ok, why = "") {
  const el = document.getElementById("live");
  el.classList.toggle("on", ok);
  el.classList.toggle("off", !ok);
  el.textContent = ok ? "live" : "offline";
  el.title = ok ? `refreshes every ${POLL_MS / 1000} s` : `last refresh failed: ${why}`;
}

// Polls a cheap summary and redraws only when checkpoints changed, so an idle page costs one
// small request per tick even on a run with hundreds of checkpoints and layers.
async function poll() {
  if (document.hidden) return;
  const { parts } = parseHash();
  const before = lastSignature;
  try {
    let now;
    if (parts[0] === "runs" && parts[1]) {
      const run = await api(`/runs/${parts[1]}`);
      now = JSON.stringify([run.n_checkpoints, run.n_done, run.n_failed, run.n_pending,
        run.last_step, run.discovery_error]);
    } else {
      const runs = (await api("/runs?limit=1000")).runs;
      now = JSON.stringify(parts[0] === "compare"
        ? runs.map((r) => [r.id, r.n_done, r.last_step])
        : runs.map((r) => [r.id, r.n_checkpoints, r.n_done, r.n_failed, r.n_pending, r.last_step]));
    }
    setLive(true);
    if (now !== before && before === lastSignature) await render({ quiet: true });
  } catch (err) {
    setLive(false, err.message);
  }
}

window.addEventListener("hashchange", () => {
  const { parts } = parseHash();
  // Switches on the same run page keep the skeleton and redraw in place, without a jump.
  const samePage = parts[0] === "runs" && parts[1] && document.getElementById("run-body")
    && view.dataset.run === parts[1];
  render({ quiet: Boolean(samePage) });
});
render().then(() => {
  clearInterval(pollTimer);
  pollTimer = setInterval(poll, POLL_MS);
});
