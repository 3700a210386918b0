// alphawatch dashboard: a hash-routed page that reads only the public REST API (/api/v1), so it
// shows exactly the numbers a CI gate sees. Plotly is served by the API, offline. One module per
// view under views/; api.js is the only one that talks to the server.

import { apiText } from "./api.js";
import { parseHash, state, view } from "./state.js";
import { esc } from "./ui.js";
import { renderCompare } from "./views/compare.js";
import { refreshRun, renderRun } from "./views/run.js";
import { renderRuns } from "./views/runs.js";
import { askToken } from "./views/token.js";

const POLL_MS = 4000;
let pollTimer = null;

async function render({ quiet = false } = {}) {
  const token = ++state.renderToken;
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
    if (token !== state.renderToken) return;
    if (quiet) { setLive(false, err.message); return; }
    if (err.status === 401 || err.status === 403) { askToken(err.message, render); return; }
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
  const before = state.lastSignature;
  try {
    let now;
    if (parts[0] === "runs" && parts[1]) {
      const run = await apiText(`/runs/${parts[1]}`);
      now = JSON.stringify([run.n_checkpoints, run.n_done, run.n_failed, run.n_pending,
        run.n_skipped, run.last_step, run.discovery_error]);
    } else {
      const runs = (await apiText("/runs?limit=1000")).runs;
      now = JSON.stringify(parts[0] === "compare"
        ? runs.map((r) => [r.id, r.n_done, r.last_step])
        : runs.map((r) => [r.id, r.n_checkpoints, r.n_done, r.n_failed, r.n_pending, r.n_skipped,
          r.last_step]));
    }
    setLive(true);
    if (now !== before && before === state.lastSignature) await render({ quiet: true });
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
