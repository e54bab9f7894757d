import { useState } from "preact/hooks";
import { html } from "../api.js";

// The API token is checked by the first data call: a 401 comes back here with its message.
export function SignIn({ message, onSignIn }) {
  const [token, setToken] = useState("");
  const submit = (ev) => {
    ev.preventDefault();
    if (token.trim()) onSignIn(token.trim());
  };
  return html`
    <form class="signin card" onSubmit=${submit} data-testid="signin">
      <h1>expertmesh console</h1>
      <p class="muted">Sign in with the API token (<code>expertmesh up</code> prints it; it is also in
        <code>$EXPERTMESH_HOME/cluster.json</code>). It is kept in this tab only.</p>
      ${message && html`<p class="error" data-testid="signin-error">${message}</p>`}
      <input type="password" placeholder="API token" autocomplete="off" value=${token}
        onInput=${(e) => setToken(e.target.value)} data-testid="token" />
      <button type="submit" data-testid="signin-submit">Sign in</button>
    </form>
  `;
}
