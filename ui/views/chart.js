// uPlot line charts; events (ts, kind) are drawn over them as labelled vertical lines.
import uPlot from "uplot";
import { useEffect, useRef } from "preact/hooks";
import { html } from "../api.js";

export const EVENT_COLOURS = {
  shard_failed: "#d33", node_left: "#d33", warning: "#d90",
  shard_started: "#2a7", spare_ready: "#2a7", node_joined: "#2a7",
  scaled_out: "#36c", scaled_in: "#36c", shard_stopped: "#36c",
  rebalanced: "#93c", upgrade_started: "#c60", router_switched: "#c60", upgrade_finished: "#c60",
  scale_started: "#36c", scale_finished: "#36c", scale_failed: "#d33",
};

function eventsPlugin(getEvents) {
  return {
    hooks: {
      draw: (u) => {
        const { ctx } = u;
        const [lo, hi] = [u.scales.x.min, u.scales.x.max];
        ctx.save();
        ctx.font = `${10 * devicePixelRatio}px sans-serif`;
        let i = 0;
        for (const ev of getEvents()) {
          if (ev.ts < lo || ev.ts > hi) continue;
          const row = i++ % 4; // labels of close events stack instead of overlapping
          const x = Math.round(u.valToPos(ev.ts, "x", true));
          ctx.strokeStyle = ctx.fillStyle = EVENT_COLOURS[ev.kind] || "#777";
          ctx.lineWidth = devicePixelRatio;
          ctx.setLineDash([4, 3]);
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.fillText(ev.kind, x + 3, u.bbox.top + (12 + 12 * row) * devicePixelRatio);
        }
        ctx.restore();
      },
    },
  };
}

export function LineChart({ title, xs, series, events = [], height = 220 }) {
  const box = useRef(null);
  const plot = useRef(null);
  const evRef = useRef(events);
  evRef.current = events;
  const data = [xs, ...series.map(([, ys]) => ys)];
  useEffect(() => {
    const opts = {
      title,
      width: Math.max(300, box.current.clientWidth),
      height,
      plugins: [eventsPlugin(() => evRef.current)],
      series: [{}, ...series.map(([label, , stroke]) => ({ label, stroke, width: 2 }))],
      axes: [{}, { size: 60 }],
    };
    plot.current = new uPlot(opts, data, box.current);
    return () => plot.current.destroy();
  }, []);
  useEffect(() => {
    if (plot.current) plot.current.setData(data);
  });
  return html`<div class="chart" ref=${box}></div>`;
}
