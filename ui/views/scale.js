import { useState } from "preact/hooks";
import { api, fmt, html } from "../api.js";
import { refreshNow } from "../store.js";
import { Confirm } from "./confirm.js";

const SCALE_EVENTS = new Set(["scaled_out", "scaled_in", "shard_started", "shard_stopped", "spare_ready", "warning"]);

export function ScaleView({ snap }) {
  const st = snap.status;
  const current = st ? (st.shards || []).filter((s) => !s.draining).length : 0;
  const [target, setTarget] = useState(null);
  const [plan, setPlan] = useState(null);
  const [asking, setAsking] = useState(false);
  const [since, setSince] = useState(null);
  const [state, setState] = useState("");
  const [error, setError] = useState("");
  const want = target ?? current;
  const preview = async () => {
    setError("");
    try {
      setPlan(await api.get(`/api/placement/preview?shards=${want}`));
    } catch (e) {
      setError(e.message);
    }
  };
  const apply = async () => {
    setAsking(false);
    setSince(Date.now() / 1000 - 1);
    setState(`scaling to ${want} shards…`);
    try {
      const out = await api.put("/api/shards", { shards: want });
      setState(`done: ${out.shards.length} shards`);
      setPlan(null);
      refreshNow();
    } catch (e) {
      setState("");
      setError(e.message);
    }
  };
  const progress = since ? snap.events.filter((e) => e.ts >= since && SCALE_EVENTS.has(e.kind)) : [];
  const adds = plan ? plan.moves.filter((m) => m.kind === "add") : [];
  const drops = plan ? plan.moves.filter((m) => m.kind === "drop") : [];
  return html`
    <section class="card">
      <h3>Shards: <span data-testid="scale-current">${current}</span> now</h3>
      <div class="row">
        <label>Target shard count <input type="number" min="1" max="1024" value=${want} data-testid="scale-target"
          onInput=${(e) => { setTarget(Number(e.target.value)); setPlan(null); }} /></label>
        <button onClick=${preview} data-testid="scale-preview">Preview placement</button>
        <button onClick=${() => setAsking(true)} disabled=${!plan || want === current} data-testid="scale-apply">Scale to ${want}</button>
      </div>
      ${error && html`<p class="error">${error}</p>`}
    </section>
    ${plan && html`
      <section class="card" data-testid="scale-plan">
        <h3>${plan.current_shards} → ${plan.target_shards} shards</h3>
        ${plan.new_shards.length > 0 && html`<p>New shards: ${plan.new_shards.join(", ")} (warm spares serve first when there are any)</p>`}
        ${plan.drain.length > 0 && html`<p>Drained, then stopped: ${plan.drain.join(", ")}</p>`}
        <p><b>${adds.length}</b> replicas added, <b>${drops.length}</b> dropped</p>
        <div class="chips">
          ${adds.map((m) => html`<span class="chip add" data-testid="plan-add">+ L${m.layer}:E${m.expert} → ${m.shard_id}</span>`)}
          ${drops.map((m) => html`<span class="chip drop">− L${m.layer}:E${m.expert} ✕ ${m.shard_id}</span>`)}
        </div>
        ${plan.warnings.map((w) => html`<p class="error small">${w}</p>`)}
      </section>`}
    ${since && html`
      <section class="card" data-testid="scale-progress">
        <h3>Progress</h3>
        <p data-testid="scale-state">${state}</p>
        <ul>${progress.map((e) => html`<li>${fmt.time(e.ts)} <b>${e.kind}</b> ${e.message}</li>`)}</ul>
      </section>`}
    ${asking && html`<${Confirm} text="Scale from ${current} to ${want} shards? ${adds.length} replicas load, ${drops.length} drop." onYes=${apply} onNo=${() => setAsking(false)} />`}`;
}
