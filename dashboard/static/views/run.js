// Run page (#/runs/{id}): summary, trend, heatmap, layer drill-down, kinds, flags, companions
// and the checkpoint table (views/checkpoints.js). The pickers are built from the API's vocabulary.

import { api, apiOnce, apiText, kindQuery, vocabulary } from "../api.js";
import { enc, setParams, state, view } from "../state.js";
import {
  bindParamSelects, esc, fmt, gateBadge, inPanel, pct, plotlyLoaded, select, setThresholds,
  termSelect,
} from "../ui.js";
import { drawChanges } from "./changes.js";
import { crosscheckBadge, renderCheckpointTable } from "./checkpoints.js";
import { drawCompanions } from "./companions.js";
import { drawFlags } from "./flags.js";
import { drawHeatmap, fillLayerPick } from "./heatmap.js";
import { drawKinds } from "./kinds.js";
import { drawLayer } from "./layer.js";
import { drawTrend, switchOf, trendQuery } from "./trend.js";
import { drawVariantsPanel, orderOf, variantOf } from "./variants.js";

function runSkeleton(runId, params, words) {
  const kind = params.get("kind") || "all";
  const kindOptions = [["all", "all kinds"], ...words.kind_groups.map((g) => [g.name, g.label])];
  if (kind !== "all" && !words.kind_groups.some((g) => g.name === kind)) {
    kindOptions.push([kind, `kinds ${kind}`]);
  }
  return `
    <h1 id="run-title">Run <span class="muted">#${esc(runId)}</span></h1>
    <div id="run-summary" class="summary"></div>
    <div id="run-discovery" class="panel error discovery" role="alert" hidden></div>
    <div class="panel" id="run-empty" hidden></div>
    <div id="run-body">
    <div class="panel">
      <h2>Model-level α over training</h2>
      <div class="controls" role="group" aria-label="trend switches">
        ${termSelect("stat", "Statistic", words.statistics, switchOf(words, params, "stat"))}
        ${termSelect("filter", "Layers", words.filters, switchOf(words, params, "filter"))}
        ${select("kind", "Kind", kindOptions, kind)}
        ${termSelect("outliers", "Outlier rule", words.outlier_rules,
          switchOf(words, params, "outliers"))}
        ${termSelect("method", "Fit method", words.fit_methods,
          switchOf(words, params, "method"))}
      </div>
      <div id="trend" class="plot"></div>
      <p class="muted small">Line: the chosen statistic of α per checkpoint; band: 25th–75th
      percentile; dotted: 10% trimmed mean. Green band: 2 ≤ α ≤ 6. Hover a point for how many
      layers it used and why the others were left out.</p>
    </div>
    <div class="panel">
      <h2>α per layer and step</h2>
      <div class="controls">
        <span id="variant-controls"></span>
        <label>Open layer <select id="layer-pick"><option value="">choose…</option></select></label>
        <span class="muted small">Click a cell for that layer's ESD at that step.
        <span class="legend-x">×</span> / faded: untrusted fit.</span>
      </div>
      <div id="heatmap" class="plot"></div>
    </div>
    <div class="panel" id="changes-panel" hidden>
      <h2>What changed between two steps</h2>
      <div class="controls" id="changes-controls" role="group" aria-label="steps compared"></div>
      <div class="grid2"><div><h3 id="changes-title">Layers by change</h3>
        <div id="changes-bars" class="plot small"></div></div>
        <div><h3>Change from the checkpoint before, per layer and step</h3>
        <div id="distance-heatmap" class="plot small"></div></div></div>
      <div id="changes-table" class="table-scroll"></div>
      <p class="muted small">How far each weight matrix moved: ‖ΔW‖F/‖W‖F and ‖ΔW‖₂/‖W‖₂ of
      the update, and how much of its top-10 singular directions stayed (overlap 1: none
      rotated). Over several steps the changes are summed and the overlap is the smallest of
      one step's; Δα (bar label, red when α fell) beside. * : some steps of the interval were
      not compared.</p>
    </div>
    <div class="panel" id="variants-panel" hidden>
      <h2>Weights, gradients and nested widths</h2>
      <div class="grid2"><div><h3>α per variant over training</h3>
        <div id="variant-trend" class="plot small"></div></div>
        <div><h3>α per block, <span id="block-order">last block first</span></h3>
        <div id="block-trend" class="plot small"></div></div></div>
      <p class="muted small">Weights (solid) beside Adam's exp_avg, the running average of their
      gradients (dashed), and MLPs cut to their first k neurons (w&lt;k&gt;): each a statistic
      over its own rows, never mixed. Kind and statistic follow the switches above; the rows
      picker of the heatmap chooses the variant per block.</p>
    </div>
    <div class="panel" id="layer-panel" hidden>
      <div class="panel-head"><h2>Layer <code id="layer-name"></code></h2>
        <label>Step <select id="esd-step"></select></label>
        <button type="button" id="layer-close" class="link">close</button></div>
      <div class="grid2"><div><h3>α history and fit quality</h3>
        <div id="layer-history" class="plot small"></div></div>
        <div><h3>Eigenvalue spectrum (ESD), log–log</h3><div id="esd" class="plot small"></div>
        </div></div>
      <div id="layer-fit" class="table-scroll"></div>
      <div id="layer-trap" class="table-scroll"></div>
      <p class="muted small" id="layer-note"></p>
    </div>
    <div class="panel"><h2>α by layer kind</h2>
      <div id="kinds" class="plot kinds"></div></div>
    <div class="grid2">
      <div class="panel"><h2>Flags per checkpoint</h2><div id="flags" class="plot small"></div>
        <p class="muted small">Layers per checkpoint carrying each flag; a rising bar is a
        layer going wrong.</p></div>
      <div class="panel"><h2>Companion metrics (over layers)</h2>
        <div id="companion" class="plot small"></div></div>
    </div>
    </div>
    <div class="panel"><h2>Checkpoints</h2><div class="table-scroll"><table id="checkpoints">
      <thead><tr><th scope="col">Step</th><th scope="col">Status</th><th scope="col">Layers</th>
      <th scope="col">Trusted</th><th scope="col">Analysis (s)</th><th scope="col">Device</th>
      <th scope="col">Error</th></tr></thead><tbody></tbody></table></div></div>`;
}

export async function renderRun(runId, params, token) {
  // The run and its checkpoints do not depend on the vocabulary: asked beside it.
  const early = [`/runs/${runId}`, `/runs/${runId}/checkpoints`].map((path) => apiText(path));
  early.forEach((answer) => answer.catch(() => {}));
  const words = await vocabulary();
  if (token !== state.renderToken) return;
  view.innerHTML = runSkeleton(runId, params, words);
  view.dataset.run = String(runId);
  state.drawnKey = null;
  bindParamSelects(view);
  document.getElementById("layer-pick").addEventListener("change", (ev) => {
    if (ev.target.value) setParams({ layer: ev.target.value });
  });
  document.getElementById("esd-step").addEventListener("change", (ev) =>
    setParams({ step: ev.target.value }));
  document.getElementById("layer-close").addEventListener("click", () =>
    setParams({ layer: null, step: null }));
  await refreshRun(runId, params, token, early);
}

// early: the run's and its checkpoints' answers when already asked for (renderRun).
export async function refreshRun(runId, params, token, early = null) {
  const words = await vocabulary();
  const method = enc(switchOf(words, params, "method"));
  const [run, checkpoints, gate] = await Promise.all([
    early ? early[0] : apiText(`/runs/${runId}`),
    early ? early[1] : apiText(`/runs/${runId}/checkpoints`),
    apiText(`/runs/${runId}/gate?method=${method}`).catch(() => null)]);
  if (token !== state.renderToken) return;
  setThresholds(run.thresholds);
  state.lastSignature = JSON.stringify([run.n_checkpoints, run.n_done, run.n_failed,
    run.n_pending, run.n_skipped, run.last_step, run.discovery_error]);
  document.title = `${run.name} · alphawatch`;
  document.getElementById("run-title").innerHTML =
    `${esc(run.name)} <span class="muted small">${esc(run.path)}</span>`;
  document.getElementById("run-summary").innerHTML = `
    <span><b>${run.n_done ?? 0}</b> analysed</span>
    <span class="${run.n_failed ? "status-failed" : ""}"><b>${run.n_failed ?? 0}</b> failed</span>
    <span><b>${run.n_pending ?? 0}</b> pending</span>
    ${run.n_skipped ? `<span class="status-skipped" id="run-skipped" title="passed over by the ` +
      `keep-up policy (ALPHAWATCH_KEEP_UP): not analysed, not waiting"><b>${run.n_skipped}` +
      `</b> skipped</span>` : ""}
    <span>last step <b>${fmt(run.last_step, 0)}</b></span>
    <span>median α <b>${fmt(run.latest_alpha)}</b></span>
    <span>untrusted <b>${pct(run.untrusted_share)}</b></span>
    <span id="run-gate">${gateBadge(gate)}</span>
    ${crosscheckBadge(run.crosscheck)}`;
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
  await drawRunPlots(runId, params, words, token, run, done);
}

async function drawRunPlots(runId, params, words, token, run, done) {
  const layer = params.get("layer");
  const method = switchOf(words, params, "method");
  const layerTask = layer
    ? drawLayer(runId, layer, params.get("step"), run, token, method) : null;
  if (!layer) document.getElementById("layer-panel").hidden = true;
  const variant = variantOf(words, params);
  const order = orderOf(words, params);
  const key = JSON.stringify([runId, state.lastSignature, trendQuery(words, params), variant,
    order, params.get("dmetric"), params.get("from"), params.get("to")]);
  if (key === state.drawnKey) {
    const pick = document.getElementById("layer-pick");
    pick.value = layer && [...pick.options].some((o) => o.value === layer) ? layer : "";
    await layerTask;
    return;
  }
  const lastStep = done.reduce((m, c) => Math.max(m, c.step), -Infinity);
  // 3 decimals: what the colours and the hover (%{z:.3f}) show; half the bytes.
  const heatQuery = new URLSearchParams({ metric: "alpha", max_points: "500", variant, order,
    method, digits: "3" });
  const kinds = kindQuery(words, params.get("kind"));
  if (kinds) heatQuery.set("kind", kinds);
  const m = `method=${enc(method)}`;
  const latest = apiOnce(`/runs/${runId}/checkpoints/${lastStep}/layers?${m}`, { text: true });
  // Each panel asks for its own data and shows its own failure: one refused request (a bad
  // variant in the URL, a layer the server cannot answer for) never blanks the page.
  const panels = [
    inPanel("trend", token, async () => {
      const trend = await api(`/runs/${runId}/trend?${trendQuery(words, params)}`);
      if (token === state.renderToken) drawTrend(trend, words);
    }),
    inPanel("heatmap", token, async () => {
      const heat = await apiOnce(`/runs/${runId}/heatmap?${heatQuery}`);
      // The kinds only label the cells: the heatmap is drawn without them.
      const rows = await latest.catch(() => ({ layers: [] }));
      if (token !== state.renderToken) return;
      drawHeatmap(heat, Object.fromEntries(rows.layers.map((l) => [l.name, l.kind])));
      fillLayerPick(heat.layers, layer);
    }),
    inPanel("changes-bars", token, () => drawChanges(runId, params, method, done,
      latest.then((rows) => Object.fromEntries(rows.layers.map((l) => [l.name, l.kind])),
        () => ({})), token)),
    inPanel("flags", token, async () => {
      const flags = await apiOnce(`/runs/${runId}/flags?${m}`);
      if (token === state.renderToken) drawFlags(flags.points);
    }),
    drawVariantsPanel(runId, params, words, m, token),
    inPanel("kinds", token, async () => {
      // Kinds of the weights: gradient and nested rows share them, and the failed row
      // recording a refused optimizer state is no layer of the model.
      const rows = await latest;
      if (token !== state.renderToken) return;
      const weights = rows.layers.filter((l) => !l.name.includes(words.variant_separator));
      await drawKinds(runId, params, weights, words, token);
    }),
    inPanel("companion", token, () => drawCompanions(runId, params, words, token)),
    inPanel("layer-history", token, async () => { await layerTask; }),
  ];
  // Every panel has asked for its answer: Plotly is evaluated while the server computes them.
  plotlyLoaded().catch(() => {});
  const drawn = await Promise.all(panels);
  // A failed panel is asked again on the next refresh.
  if (token === state.renderToken && drawn.every(Boolean)) state.drawnKey = key;
}
