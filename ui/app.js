// The expertmesh console: sign-in, then one view per hash route (#/cluster, #/load, ...).
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, getToken, html, setToken, signOut } from "./api.js";
import { startPolling, stopPolling, useCluster } from "./store.js";
import { ClusterView } from "./views/cluster.js";
import { JobsView } from "./views/jobs.js";
import { LoadView } from "./views/load.js";
import { MetricsView } from "./views/metrics.js";
import { ModelsView } from "./views/models.js";
import { PlaygroundView } from "./views/playground.js";
import { ScaleView } from "./views/scale.js";
import { SignIn } from "./views/signin.js";

const VIEWS = [
  ["cluster", "Cluster", ClusterView],
  ["load", "Expert load", LoadView],
  ["metrics", "Throughput & latency", MetricsView],
  ["models", "Models", ModelsView],
  ["jobs", "Runs & jobs", JobsView],
  ["playground", "Playground", PlaygroundView],
  ["scale", "Scale", ScaleView],
];

const currentView = () => {
  const name = location.hash.replace(/^#\/?/, "");
  return VIEWS.some(([n]) => n === name) ? name : "cluster";
};

function Shell({ config }) {
  const [view, setView] = useState(currentView());
  const snap = useCluster();
  useEffect(() => {
    const onHash = () => setView(currentView());
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);
  const [, , View] = VIEWS.find(([n]) => n === view);
  const status = snap.status;
  return html`
    <header>
      <span class="brand">expertmesh</span>
      <span class="muted" data-testid="serving">
        ${status && status.model ? `serving ${status.model}${status.version ? "/" + status.version : ""}` : "no model deployed"}
      </span>
      <nav>
        ${VIEWS.map(([n, label]) => html`<a href="#/${n}" class=${n === view ? "active" : ""} data-testid="nav-${n}">${label}</a>`)}
      </nav>
      <span class="links">
        ${config.ray_dashboard_url && html`<a href=${config.ray_dashboard_url} target="_blank" rel="noopener">Ray dashboard</a>`}
        ${config.mlflow_ui_url && html`<a href=${config.mlflow_ui_url} target="_blank" rel="noopener">MLflow UI</a>`}
        <button class="link" onClick=${() => signOut("")}>Sign out</button>
      </span>
    </header>
    ${snap.error && html`<div class="banner error">${snap.error}</div>`}
    <main data-testid="view-${view}">
      <${View} snap=${snap} config=${config} />
    </main>
  `;
}

function App() {
  const [token, setTok] = useState(getToken());
  const [config, setConfig] = useState(null);
  const [message, setMessage] = useState("");
  useEffect(() => {
    const onOut = (ev) => {
      stopPolling();
      setConfig(null);
      setTok(null);
      setMessage(ev.detail ? `Signed out: ${ev.detail}` : "");
    };
    window.addEventListener("expertmesh-signout", onOut);
    return () => window.removeEventListener("expertmesh-signout", onOut);
  }, []);
  useEffect(() => {
    if (!token) return;
    api.get("/api/console/config").then(
      (c) => {
        setConfig(c);
        startPolling();
      },
      (err) => err.status !== 401 && setMessage(err.message),
    );
  }, [token]);
  if (!token) {
    return html`<${SignIn} message=${message} onSignIn=${(t) => { setMessage(""); setToken(t); setTok(t); }} />`;
  }
  if (!config) return html`<div class="centre muted">${message || "Connecting…"}</div>`;
  return html`<${Shell} config=${config} />`;
}

render(html`<${App} />`, document.getElementById("app"));
