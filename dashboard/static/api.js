// The only way the dashboard reaches data: the public REST API under /api/v1, so the page shows
// exactly the numbers a CI gate or a script sees.

import { state } from "./state.js";
import { plotlyLoaded } from "./ui.js";

const API = "/api/v1";
// Servers that require a token for reads get one typed in once per browser tab; it is kept in
// sessionStorage only, never in the URL, so shared links do not leak it.
export const TOKEN_KEY = "alphawatch.token";

export class ApiError extends Error {
  constructor(status, message) { super(`${status}: ${message}`); this.status = status; }
}

// An answer the page only writes out as text (the vocabulary, the run's summary, the checkpoint
// table): handed over as soon as it arrives.
export async function apiText(path) {
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

// An answer that is drawn: handed over once Plotly is loaded too. Plotly is a 1.5 MB script that
// takes a core half a second to evaluate on a busy machine; asked for only when the first
// drawn answer is there, it is evaluated while the server computes the rest, instead of holding
// back every request of the page.
export async function api(path) {
  const body = await apiText(path);
  await plotlyLoaded();
  return body;
}

// Heatmap, flags and layer lists change only when checkpoints do: keep them per signature, so
// a switch of filter or layer on a long run does not download them again.
const heavy = new Map();

// text: hand the answer over without waiting for Plotly (see apiText).
export function apiOnce(path, { text = false } = {}) {
  let hit = heavy.get(path);
  if (!hit || hit.signature !== state.lastSignature) {
    hit = { signature: state.lastSignature, promise: apiText(path) };
    heavy.set(path, hit);
    hit.promise.catch(() => heavy.delete(path));
  }
  return text ? hit.promise : hit.promise.then(async (body) => {
    await plotlyLoaded();
    return body;
  });
}

// Statistics, filters, outlier rules and layer kinds are the server's: asked once per page,
// never copied here, so a name added to the API shows up in every picker.
let vocabularyPromise = null;

export function vocabulary() {
  if (!vocabularyPromise) {
    vocabularyPromise = apiText("/vocabulary");
    vocabularyPromise.catch(() => { vocabularyPromise = null; });
  }
  return vocabularyPromise;
}

// The value a picker shows when the URL names none: the API's own default.
export const defaultOf = (terms) => (terms.find((t) => t.default) ?? terms[0]).name;

// A kind group's name (kind=attention) or a raw list of kinds (kind=q,k), as the API wants it.
export function kindQuery(words, value) {
  if (!value || value === "all") return "";
  const group = words.kind_groups.find((g) => g.name === value);
  return group ? group.kinds.join(",") : value;
}
