import { useState } from "preact/hooks";
import { fmt, html } from "../api.js";
import { imbalance, layerGrid } from "../store.js";
import { LineChart } from "./chart.js";

const WINDOW = 5; // samples the heatmap averages (10 s)

function rates(history) {
  const recent = history.slice(-WINDOW).filter((s) => Object.keys(s.expertRate).length);
  const out = {};
  for (const s of recent) {
    for (const [k, v] of Object.entries(s.expertRate)) out[k] = (out[k] || 0) + v / recent.length;
  }
  return out;
}

function heat(v, max) {
  if (!max || !v) return "var(--cell)";
  const a = Math.min(1, v / max);
  return `rgba(230, 90, 40, ${0.12 + 0.88 * a})`;
}

function ExpertDetail({ keyName, st, history }) {
  const replicas = (st.placement || {})[keyName] || [];
  const xs = history.map((s) => s.t);
  const ys = history.map((s) => s.expertRate[keyName] || 0);
  return html`
    <section class="card" data-testid="expert-detail">
      <h3>Expert ${keyName.replace(":", " / ")} <span class="muted small">(layer / expert)</span></h3>
      <p>${replicas.length} replicas: ${replicas.map((r) => html`<span class="chip">${r}</span>`)}</p>
      <p class="small muted">${(st.expert_load || {})[keyName] || 0} tokens served since start</p>
      <${LineChart} title="tokens/s" xs=${xs} series=${[["tokens/s", ys, "#e65a28"]]} height=${160} />
    </section>`;
}

export function LoadView({ snap }) {
  const [picked, setPicked] = useState(null);
  const st = snap.status;
  if (!st) return html`<p class="muted">Loading…</p>`;
  const grid = layerGrid(st);
  const r = rates(snap.history);
  const max = Math.max(0, ...Object.values(r));
  const score = imbalance(r);
  const nExperts = Math.max(0, ...grid.map(([, es]) => es.length));
  return html`
    <section class="summary">
      <div class="stat"><b data-testid="imbalance">${score == null ? "–" : fmt.num(score, 2)}</b> imbalance (max/mean tokens/s)</div>
      <div class="stat"><b>${fmt.num(Object.values(r).reduce((a, b) => a + b, 0))}</b> expert-tokens/s</div>
      <div class="stat">${grid.length} layers × ${nExperts} experts</div>
    </section>
    <table class="heatmap" data-testid="heatmap">
      <thead><tr><th>layer \\ expert</th>${Array.from({ length: nExperts }, (_, e) => html`<th>${e}</th>`)}</tr></thead>
      <tbody>
        ${grid.map(([l, es]) => html`
          <tr>
            <th>${l}</th>
            ${es.map((e) => {
              const k = `${l}:${e}`;
              const reps = (st.placement[k] || []).length;
              return html`<td class="cell ${picked === k ? "picked" : ""}" data-testid="heat-cell" data-key=${k}
                style="background:${heat(r[k], max)}" title="layer ${l} expert ${e}: ${fmt.num(r[k] || 0)} tokens/s, ${reps} replicas"
                onClick=${() => setPicked(k)}>
                <div>${fmt.num(r[k] || 0, 0)}</div><div class="small">×${reps}</div></td>`;
            })}
          </tr>`)}
      </tbody>
    </table>
    <p class="small muted">Cell: tokens/s over the last ${WINDOW * 2} s; ×N: replicas. Click an expert for its replicas and load over time.</p>
    ${picked && html`<${ExpertDetail} keyName=${picked} st=${st} history=${snap.history} />`}`;
}
