// What the views share: the element they draw into, which render is current, and the URL state.
// Kept in one object because an ES module cannot reassign another module's exported binding.

export const view = document.getElementById("view");

export const state = {
  // Bumped by every render; a view whose answers arrive after a newer render drops them.
  renderToken: 0,
  // Checkpoint counts the views were drawn from; polling redraws when they change.
  lastSignature: null,
  // What the run plots on screen were drawn from; a change of layer or step alone redraws
  // only the layer panel.
  drawnKey: null,
};

export const enc = encodeURIComponent;

export function parseHash() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  return { parts: (path || "/").split("/").filter(Boolean),
    params: new URLSearchParams(query || "") };
}

export function setParams(updates) {
  const { parts, params } = parseHash();
  for (const [key, value] of Object.entries(updates)) {
    if (value === null || value === undefined || value === "") params.delete(key);
    else params.set(key, String(value));
  }
  const query = params.toString();
  const next = `#/${parts.map(enc).join("/")}${query ? `?${query}` : ""}`;
  if (next !== location.hash) location.hash = next;
}
