import { useState } from "preact/hooks";
import { api, fmt, html } from "../api.js";
import { refreshNow } from "../store.js";
import { Confirm } from "./confirm.js";

const ENDS = new Set(["scale_finished", "scale_failed"]);

// A scale runs in the controller: PUT /api/shards answers at once with its id, and the events
// carrying that scale_id (from the store's poll) show its progress and how it ended.
function scaleState(ticket, mine) {
  const end = mine.find((e) => ENDS.has(e.kind));
  if (!end) return `scaling ${ticket.from} → ${ticket.to} shards…`;
  return end.kind === "scale_finished" ? `done: ${end.shards} shards` : `failed: ${end.message}`;
}

export function ScaleView({ snap }) {
  const st = snap.status;
  const current = st ? (st.shards || []).filter((s) => !s.draining).length : 0;
  const [target, setTarget] = useState(null);
  const [plan, setPlan] = useState(null);
  const [asking, setAsking] = useState(false);
  const [ticket, setTicket] = useState(null);
  const [error, setError] = useState("");
  const want = target ?? current;
  const running = st && st.scale;
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
    setError("");
    try {
      setTicket(await api.put("/api/shards", { shards: want }));
      setPlan(null);
      refreshNow();
    } catch (e) {
      setError(e.message); // refused before anything started: the message names the limit
    }
  };
  const mine = ticket ? snap.events.filter((e) => e.scale_id === ticket.scale_id) : [];
  const adds = plan ? plan.moves.filter((m) => m.kind === "add") : [];
  const drops = plan ? plan.moves.filter((m) => m.kind === "drop") : [];
  return html`
    <section class="card">
      <h3>Shards: <span data-testid="scale-current">${current}</span> now${st && st.max_shards ? html` (at most ${st.max_shards})` : ""}</h3>
      ${running && html`<p class="small" data-testid="scale-running">Scale ${running.id} (${running.from} → ${running.to}, ${running.source}) is running.</p>`}
      <div class="row">
        <label>Target shard count <input type="number" min="1" max="1024" value=${want} data-testid="scale-target"
          onInput=${(e) => { setTarget(Number(e.target.value)); setPlan(null); }} /></label>
        <button onClick=${preview} data-testid="scale-preview">Preview placement</button>
        <button onClick=${() => setAsking(true)} disabled=${!plan || want === current || running} data-testid="scale-apply">Scale to ${want}</button>
      </div>
      ${error && html`<p class="error" data-testid="scale-error">${error}</p>`}
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
    ${ticket && html`
      <section class="card" data-testid="scale-progress">
        <h3>Progress of <code data-testid="scale-id">${ticket.scale_id}</code></h3>
        <p data-testid="scale-state">${scaleState(ticket, mine)}</p>
        <ul>${mine.map((e) => html`<li>${fmt.time(e.ts)} <b>${e.kind}</b> ${e.message}</li>`)}</ul>
      </section>`}
    ${asking && html`<${Confirm} text="Scale from ${current} to ${want} shards? ${adds.length} replicas load, ${drops.length} drop." onYes=${apply} onNo=${() => setAsking(false)} />`}`;
}
