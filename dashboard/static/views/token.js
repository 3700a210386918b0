// The token form a server that protects its reads asks for.

import { TOKEN_KEY } from "../api.js";
import { view } from "../state.js";
import { esc } from "../ui.js";

export function askToken(message, onToken) {
  view.innerHTML = `<div class="panel" id="token-form"><h2>This server needs an API token</h2>
    <p class="muted">${esc(message)}. Create one with <code>alphawatch token create NAME</code>;
    it is kept for this tab only.</p><form class="controls"><label>Token
    <input type="password" id="token-input" autocomplete="off" required></label>
    <button type="submit">Use token</button></form></div>`;
  view.querySelector("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
    onToken();
  });
}
