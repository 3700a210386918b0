// Formatting, escaping, colours and the Plotly wrapper every view draws with.

import { setParams, state } from "./state.js";

// Okabe–Ito: distinguishable under the common colour-vision deficiencies.
export const C = { blue: "#0072b2", orange: "#e69f00", green: "#009e73", vermillion: "#d55e00",
  purple: "#cc79a7", sky: "#56b4e9", yellow: "#f0e442", grey: "#6b7280",
  band: "rgba(0,114,178,0.16)", good: "rgba(0,158,115,0.09)" };
const PLOT_CONFIG = { displaylogo: false, responsive: true,
  modeBarButtonsToRemove: ["lasso2d", "select2d"] };

export function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;",
    ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
export const isNum = (v) => typeof v === "number" && Number.isFinite(v);
export const fmt = (v, digits = 3) => (isNum(v) ? v.toFixed(digits) : (v === null || v === undefined
  ? "–" : String(v)));
export const pct = (v) => (isNum(v) ? `${(100 * v).toFixed(0)}%` : "–");

// Plotly, loaded once (index.html only preloads it): when a page has asked for what it draws, or
// else when the first answer to draw has arrived.
let plotlyPromise = null;

export function plotlyLoaded() {
  if (window.Plotly) return Promise.resolve();
  if (!plotlyPromise) {
    plotlyPromise = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = "/static/vendor/plotly.min.js";
      script.onload = () => resolve();
      script.onerror = () => {
        plotlyPromise = null;
        script.remove();
        reject(new Error("could not load /static/vendor/plotly.min.js"));
      };
      document.head.append(script);
    });
  }
  return plotlyPromise;
}

export function plot(id, traces, layout = {}) {
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

export function note(el, message) {
  // A plot with nothing to show says so instead of drawing empty axes.
  if (typeof el === "string") el = document.getElementById(el);
  if (!el) return;
  if (el.data) Plotly.purge(el);
  el.innerHTML = `<p class="plot-note">${message}</p>`;
}

// A panel whose request failed says so in its own place (role=alert), the rest of the page
// drawn as usual.
export function failed(el, err) {
  if (typeof el === "string") el = document.getElementById(el);
  if (!el) return;
  if (el.data) Plotly.purge(el);
  delete el.dataset.rendered;
  el.innerHTML = `<p class="plot-note error panel-error" role="alert">Could not load: ${
    esc(err?.message ?? err)}</p>`;
}

// Runs one panel's requests and drawing; a failure is shown in that panel (element `id`) only.
// Resolves to whether the panel was drawn. A missing or refused token is the page's business:
// it is passed on, so the page asks for one.
export async function inPanel(id, token, task) {
  try {
    await task();
    return true;
  } catch (err) {
    if (err.status === 401 || err.status === 403) throw err;
    if (token === state.renderToken) failed(id, err);
    return false;
  }
}

// The trust thresholds the server applies (GET /runs/{id} reports them): the well-trained band
// and the α scale follow them, so a changed ALPHAWATCH_TRUST__* setting shows here too.
let thresholds = null;

export function setThresholds(t) { if (t) thresholds = t; }

export function alphaMax() { return thresholds?.alpha_max ?? 8; }

export function goodBand() {
  if (!thresholds) return [];
  return [{ type: "rect", xref: "paper", x0: 0, x1: 1, y0: thresholds.over_trained_below,
    y1: thresholds.under_trained_above, fillcolor: C.good, line: { width: 0 }, layer: "below" }];
}

export function goodLabel() {
  if (!thresholds) return [];
  const lo = thresholds.over_trained_below, hi = thresholds.under_trained_above;
  return [{ xref: "paper", x: 1, y: hi, text: `well trained: ${lo} ≤ α ≤ ${hi}`,
    showarrow: false, xanchor: "right", yanchor: "bottom", font: { color: "#00684b", size: 11 } }];
}

export function select(name, label, options, value) {
  const opts = options.map(([v, text]) =>
    `<option value="${esc(v)}"${v === value ? " selected" : ""}>${esc(text)}</option>`).join("");
  return `<label>${esc(label)} <select data-param="${esc(name)}">${opts}</select></label>`;
}

// A picker over terms the API served ({name, label}), showing the URL's value or the default.
export function termSelect(name, label, terms, value) {
  return select(name, label, terms.map((t) => [t.name, t.label]), value);
}

export function bindParamSelects(root) {
  root.querySelectorAll("select[data-param]").forEach((el) =>
    el.addEventListener("change", () => setParams({ [el.dataset.param]: el.value })));
}

export function gateBadge(gate) {
  if (!gate) return '<span class="muted">–</span>';
  const reasons = (gate.violations || []).map((v) => v.message).join("\n");
  if (gate.passed) {
    // The run's gate rules choose the statistic: name the one the verdict used.
    return `<span class="badge pass" title="${esc(gate.stat)} α ${esc(fmt(gate.value))} at step ${
      esc(gate.step)}">gate passes</span>`;
  }
  if ((gate.violations || []).every((v) => v.rule === "no_data")) {
    return `<span class="badge none" title="${esc(reasons)}">no data</span>`;
  }
  return `<span class="badge fail" title="${esc(reasons)}">⚠ gate would fail</span>` +
    `<div class="muted small">${esc(reasons)}</div>`;
}
