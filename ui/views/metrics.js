import { fmt, html } from "../api.js";
import { EVENT_COLOURS, LineChart } from "./chart.js";

export function MetricsView({ snap }) {
  const h = snap.history;
  const xs = h.map((s) => s.t);
  const lo = xs[0] || 0;
  const events = snap.events;
  return html`
    <section class="card" data-testid="throughput-chart">
      <${LineChart} title="Throughput (tokens/s)" xs=${xs} events=${events}
        series=${[["tokens/s", h.map((s) => s.tokensPerS), "#36c"]]} />
    </section>
    <section class="card" data-testid="latency-chart">
      <${LineChart} title="Request latency (ms, the router's last requests)" xs=${xs} events=${events}
        series=${[["p50", h.map((s) => s.p50), "#2a7"], ["p99", h.map((s) => s.p99), "#d33"]]} />
    </section>
    <section class="card">
      <h3>Event timeline</h3>
      <p class="small muted">Events since this console opened are drawn on the charts; all the controller keeps are listed.</p>
      <table class="events" data-testid="timeline">
        <thead><tr><th>time</th><th>event</th><th>what happened</th></tr></thead>
        <tbody>
          ${[...events].reverse().map((ev) => html`
            <tr data-testid="event" data-kind=${ev.kind} class=${ev.ts >= lo ? "" : "muted"}>
              <td>${fmt.time(ev.ts)}</td>
              <td><span class="pill" style="background:${EVENT_COLOURS[ev.kind] || "#777"};color:#fff">${ev.kind}</span></td>
              <td>${ev.message}</td>
            </tr>`)}
        </tbody>
      </table>
    </section>`;
}
