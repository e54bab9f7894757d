import { fmt, html } from "../api.js";

function dashboardLinks(dash, shard, node) {
  if (!dash || !shard.pid || !node) return null;
  const q = `pid=${shard.pid}&ip=${node.address}`;
  return html`
    <span class="links small">
      <a href="${dash}/#/logs" target="_blank" rel="noopener">logs</a>
      <a href="${dash}/worker/cpu_profile?${q}&duration=5&format=flamegraph" target="_blank" rel="noopener">flame graph</a>
      <a href="${dash}/worker/traceback?${q}&native=0" target="_blank" rel="noopener">stack</a>
    </span>`;
}

function health(shard, breakers) {
  if (shard.error) return ["dead", `unreachable (${shard.error})`];
  const b = breakers[shard.shard_id];
  if (b) return ["warn", `breaker ${b.state} (${b.failures} failed ${b.timed_out ? "slow " : ""}calls)`];
  if (shard.draining) return ["warn", "draining"];
  return ["ok", "healthy"];
}

function Shard({ shard, breakers, dash, node }) {
  const [cls, label] = health(shard, breakers);
  const experts = (shard.experts || []).map(([l, e]) => `L${l}:E${e}`);
  return html`
    <div class="shard card" data-testid="shard" data-shard=${shard.shard_id}>
      <div class="row">
        <strong>${shard.shard_id}</strong>
        <span class="pill ${cls}">${label}</span>
        ${dashboardLinks(dash, shard, node)}
      </div>
      <div class="small muted">
        ${fmt.num(shard.mean_call_ms, 2)} ms/call · queue ${shard.queue_depth ?? "–"} ·
        ${shard.calls ?? 0} calls · ${shard.device || ""}
      </div>
      <div class="chips">${experts.map((x) => html`<span class="chip">${x}</span>`)}</div>
    </div>`;
}

export function ClusterView({ snap, config }) {
  const st = snap.status;
  if (!st) return html`<p class="muted">Loading cluster…</p>`;
  const router = st.router || {};
  const failed = router.failed_shards || [];
  const breakers = router.open_breakers || {};
  const byNode = new Map((st.nodes || []).map((n) => [n.node_id, []]));
  for (const s of st.shards || []) {
    const nid = s.node_id || "?";
    if (!byNode.has(nid)) byNode.set(nid, []);
    byNode.get(nid).push(s);
  }
  const nodes = new Map((st.nodes || []).map((n) => [n.node_id, n]));
  return html`
    <section class="summary">
      <div class="stat"><b data-testid="shard-count">${(st.shards || []).length}</b> shards</div>
      <div class="stat"><b>${Object.keys(st.placement || {}).length}</b> experts</div>
      <div class="stat"><b>${(st.spares || []).length}</b> warm spares (want ${st.warm_shards})</div>
      <div class="stat"><b data-testid="open-breakers">${Object.keys(breakers).length}</b> open breakers</div>
      <div class="stat"><b>${fmt.num((router.latency_p50_s || 0) * 1000)}</b> ms p50</div>
      <div class="stat"><b>${router.running ?? 0}/${router.waiting ?? 0}</b> running/waiting</div>
      <div class="stat">placement v${st.placement_version} · min ${st.min_replicas} replicas</div>
    </section>
    ${(st.spares || []).length > 0 && html`<p class="small">Warm spares: ${st.spares.join(", ")}</p>`}
    ${failed.length > 0 && html`<p class="small muted">Calls have failed since the router started on: ${failed.join(", ")}</p>`}
    <div class="nodes">
      ${[...byNode.entries()].map(([nid, shards]) => {
        const n = nodes.get(nid) || {};
        return html`
          <section class="node card" data-testid="node">
            <h3>Node ${nid.slice(0, 8)} ${n.head ? html`<span class="pill">head</span>` : ""}
              <span class="pill ${n.alive === false ? "dead" : "ok"}">${n.alive === false ? "dead" : "alive"}</span></h3>
            <div class="small muted">${n.address || ""} · ${n.cpus ?? "?"} CPUs
              ${nid === st.controller_node_id ? " · controller" : ""}${nid === router.node_id ? " · router" : ""}</div>
            ${shards.map((s) => html`<${Shard} shard=${s} breakers=${breakers} dash=${config.ray_dashboard_url} node=${n} />`)}
          </section>`;
      })}
    </div>`;
}
