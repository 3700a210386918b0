// Weights beside their gradients (Adam exp_avg) and nested widths (MatFormer w<k>): one robust
// trend per variant, and one trend per block starting from the last. Shown only for runs that
// were analysed with --optimizer-state or --nested-widths; variants are never averaged together.

import { api, apiOnce } from "../api.js";
import { state } from "../state.js";
import {
  bindParamSelects, C, esc, failed, fmt, goodBand, inPanel, isNum, note, plot,
} from "../ui.js";
import { statLabel, switchOf, trendQuery } from "./trend.js";

const COLORS = [C.blue, C.vermillion, C.green, C.orange, "#cc79a7", "#56b4e9", "#f0e442", "#000"];

// The variant and layer order the heatmap and the per-block trends show: the URL's, else the
// API's defaults (weights, first block first).
export function variantOf(words, params) {
  return params.get("variant") || (words.sources.find((s) => s.default) ?? words.sources[0]).name;
}
export function orderOf(words, params) {
  return params.get("order") || (words.orders.find((o) => o.default) ?? words.orders[0]).name;
}
// The per-block trends start from the last block unless the URL asks otherwise.
export function blockOrderOf(words, params) {
  return params.get("order") || (words.orders.find((o) => !o.default) ?? words.orders[0]).name;
}

export function variantControls(words, params, variants) {
  const current = variantOf(words, params);
  const options = variants.map((v) =>
    `<option value="${esc(v.name)}"${v.name === current ? " selected" : ""}>${esc(v.label)}` +
    `</option>`).join("");
  const order = orderOf(words, params);
  const orders = words.orders.map((o) =>
    `<option value="${esc(o.name)}"${o.name === order ? " selected" : ""}>${esc(o.label)}` +
    `</option>`).join("");
  return `<label>Rows <select data-param="variant" id="variant-pick">${options}</select></label>
    <label>Order <select data-param="order" id="order-pick">${orders}</select></label>`;
}

// One line per variant of the chosen statistic of α: weights and gradients side by side, and
// α per nested width over training.
export async function drawVariantTrends(runId, params, words, variants, token) {
  const el = document.getElementById("variant-trend");
  if (!el) return;
  const answers = await Promise.all(variants.map((v) =>
    api(`/runs/${runId}/trend?${trendQuery(words, params, "alpha", { variant: v.name })}`)));
  if (token !== state.renderToken) return;
  const label = statLabel(words, switchOf(words, params, "stat"));
  const traces = answers.map((trend, i) => ({
    x: trend.points.map((p) => p.step), y: trend.points.map((p) => p.value),
    mode: "lines+markers", name: variants[i].label,
    // Gradients (a variant named as a source, not the default) dashed beside the solid weights
    // and nested widths.
    line: { color: COLORS[i % COLORS.length], width: 2, dash: words.sources.some((s) =>
      !s.default && s.name === variants[i].name) ? "dash" : "solid" },
    text: trend.points.map((p) => `${esc(variants[i].label)}<br>step ${p.step}<br>${label} α ${
      fmt(p.value)}<br>used ${p.n_used}, excluded ${p.n_excluded}`),
    hovertemplate: "%{text}<extra></extra>",
  }));
  if (!traces.some((t) => t.y.some(isNum))) {
    note(el, "No layer of any variant passes this filter; try <b>all layers</b>.");
    return;
  }
  plot(el, traces, { xaxis: { title: { text: "step" } }, yaxis: { title: { text: `${label} α` } },
    shapes: goodBand(), margin: { l: 60, r: 20, t: 20, b: 45 }, legend: { orientation: "h" } });
}

// One line per block for the chosen variant and kind, in the chosen order (last block first
// by default here: where gradients arrive first).
export async function drawBlockTrends(runId, params, words, token) {
  const el = document.getElementById("block-trend");
  if (!el) return;
  const q = new URLSearchParams(trendQuery(words, params, "alpha", {
    variant: variantOf(words, params), order: blockOrderOf(words, params) }));
  const body = await api(`/runs/${runId}/blocks?${q}`);
  if (token !== state.renderToken) return;
  el.dataset.blocks = body.blocks.map((b) => b.block).join(",");
  if (!body.blocks.length) { note(el, "No layer of this variant belongs to a block."); return; }
  const n = body.blocks.length;
  const traces = body.blocks.map((b, i) => ({
    x: b.points.map((p) => p.step), y: b.points.map((p) => p.value), mode: "lines",
    name: `block ${b.block}`,
    // The first block listed is drawn darkest: the eye starts where the order starts.
    line: { width: 2, color: `rgba(0,114,178,${(1 - 0.8 * i / Math.max(1, n - 1)).toFixed(2)})` },
    hovertemplate: `block ${b.block}<br>step %{x}<br>α %{y:.3f}<extra></extra>`,
  }));
  plot(el, traces, { xaxis: { title: { text: "step" } }, yaxis: { title: { text: "α" } },
    shapes: goodBand(), margin: { l: 60, r: 20, t: 20, b: 45 } });
}

// The variant pickers and panel, only for runs analysed with gradients or nested widths.
// Resolves to whether everything in it was drawn.
export async function drawVariantsPanel(runId, params, words, m, token) {
  const controls = document.getElementById("variant-controls");
  const panel = document.getElementById("variants-panel");
  let variants;
  try {
    variants = (await apiOnce(`/runs/${runId}/variants?${m}`)).variants;
  } catch (err) {
    if (err.status === 401 || err.status === 403) throw err;
    if (token !== state.renderToken) return false;
    panel.hidden = false;
    failed("variant-trend", err);
    return false;
  }
  if (token !== state.renderToken) return false;
  const present = variants.filter((v) => v.name === "weight" || v.n_layers > 0);
  if (present.length < 2) {
    controls.innerHTML = "";
    panel.hidden = true;
    return true;
  }
  controls.innerHTML = variantControls(words, params, present);
  bindParamSelects(controls);
  panel.hidden = false;
  const order = blockOrderOf(words, params);
  document.getElementById("block-order").textContent =
    words.orders.find((o) => o.name === order)?.label ?? order;
  const drawn = await Promise.all([
    inPanel("variant-trend", token, () => drawVariantTrends(runId, params, words, present, token)),
    inPanel("block-trend", token, () => drawBlockTrends(runId, params, words, token)),
  ]);
  return drawn.every(Boolean);
}
