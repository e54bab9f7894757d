import { useEffect, useState } from "preact/hooks";
import { api, fmt, html } from "../api.js";
import { refreshNow } from "../store.js";
import { Confirm } from "./confirm.js";

const KEY_METRICS = 4;

function isServing(node, st) {
  return !!st && st.model === node.name && String(st.version) === node.version;
}

function findNode(roots, ref) {
  for (const n of roots) {
    if (n.ref === ref) return n;
    const hit = findNode(n.children, ref);
    if (hit) return hit;
  }
  return null;
}

function Version({ node, st, mlflow, ask }) {
  const serving = isServing(node, st);
  const metrics = Object.entries(node.metrics || {}).slice(0, KEY_METRICS);
  return html`
    <li>
      <div class="version card ${serving ? "serving" : ""}" data-testid="version" data-ref=${node.ref}>
        <div class="row">
          <strong>${node.ref}</strong>
          <span class="pill">${node.pipeline || "registered"}</span>
          ${serving && html`<span class="pill ok" data-testid="serving-badge">serving</span>`}
          ${node.aliases.map((a) => html`<span class="pill">@${a}</span>`)}
          ${!serving && st && st.model && html`<button class="small" data-testid="upgrade"
              onClick=${() => ask(`Upgrade the cluster from ${st.model}/${st.version} to ${node.ref}? Requests in flight finish on the old version.`, node.ref)}>
              Upgrade to this version</button>`}
          ${mlflow && html`<a class="small" target="_blank" rel="noopener"
              href="${mlflow}/#/models/${encodeURIComponent(node.name)}/versions/${node.version}">MLflow</a>`}
        </div>
        <div class="small muted">
          ${node.trained_parts && `trained: ${node.trained_parts} · `}
          ${node.domains.length > 0 && `domains: ${node.domains.join(", ")} · `}
          ${node.run_id ? `run ${node.run_id.slice(0, 8)}` : "no run"}
        </div>
        ${metrics.length > 0 && html`<div class="small">${metrics.map(([k, v]) => html`<span class="chip">${k} ${fmt.num(v, 3)}</span>`)}</div>`}
      </div>
      ${node.children.length > 0 && html`<ul class="tree">${node.children.map((c) => html`<${Version} node=${c} st=${st} mlflow=${mlflow} ask=${ask} />`)}</ul>`}
    </li>`;
}

export function ModelsView({ snap, config }) {
  const st = snap.status;
  const names = config.registered_models;
  const [name, setName] = useState(null);
  const [data, setData] = useState(null);
  const [error, setError] = useState("");
  const [pending, setPending] = useState(null); // [text, ref]
  const [busy, setBusy] = useState("");
  const chosen = name || (st && names.includes(st.model) ? st.model : names[0]);
  const load = () => chosen && api.get(`/api/models/${encodeURIComponent(chosen)}/versions`).then(setData, (e) => setError(e.message));
  useEffect(() => { load(); }, [chosen]);
  const upgrade = async (ref) => {
    setPending(null);
    setBusy(`upgrading to ${ref}…`);
    setError("");
    try {
      const out = await api.put("/api/model", { model: ref });
      setBusy(`now serving ${out.model}/${out.version}`);
      await refreshNow();
      load();
    } catch (e) {
      setBusy("");
      setError(e.message);
    }
  };
  if (!names.length) return html`<p class="muted">No registered models in MLflow (${config.tracking_uri}).</p>`;
  const servingNode = data && st ? findNode(data.versions, `${st.model}/${st.version}`) : null;
  return html`
    <section class="row">
      <label>Registered model
        <select value=${chosen} onChange=${(e) => setName(e.target.value)}>
          ${names.map((n) => html`<option value=${n}>${n}</option>`)}
        </select></label>
      ${servingNode && servingNode.parent && html`<button data-testid="rollback"
          onClick=${() => setPending([`Roll back from ${servingNode.ref} to its parent ${servingNode.parent}?`, servingNode.parent])}>
          Roll back to ${servingNode.parent}</button>`}
      ${config.mlflow_ui_url && html`<a target="_blank" rel="noopener" href="${config.mlflow_ui_url}/#/models/${encodeURIComponent(chosen)}">Open in MLflow</a>`}
    </section>
    ${busy && html`<p class="banner" data-testid="models-busy">${busy}</p>`}
    ${error && html`<p class="error">${error}</p>`}
    ${data ? html`<ul class="tree root" data-testid="lineage">${data.versions.map((n) => html`<${Version} node=${n} st=${st} mlflow=${config.mlflow_ui_url} ask=${(t, r) => setPending([t, r])} />`)}</ul>`
           : html`<p class="muted">Loading versions…</p>`}
    ${pending && html`<${Confirm} text=${pending[0]} onYes=${() => upgrade(pending[1])} onNo=${() => setPending(null)} />`}`;
}
