// Live cluster data, polled from /api/cluster and /api/events. The history (throughput,
// latency, per-expert load) is kept here, in the page: the server holds no per-session state.
// Events are followed by seq: each poll asks for the pages after the last event it has.
import { useEffect, useState } from "preact/hooks";
import { api } from "./api.js";

const POLL_MS = 2000;
const KEEP = 300; // samples (10 minutes at 2 s)
const KEEP_EVENTS = 500;

const state = { status: null, events: [], history: [], error: null, lastSeq: 0 };
const listeners = new Set();
let timer = null;

function sample(status, prev) {
  const t = Date.now() / 1000;
  const router = status.router || {};
  const load = status.expert_load || {};
  const s = {
    t,
    tokens: router.tokens_generated || 0,
    p50: (router.latency_p50_s || 0) * 1000,
    p99: (router.latency_p99_s || 0) * 1000,
    load,
    tokensPerS: 0,
    expertRate: {},
    shards: (status.shards || []).length,
  };
  if (prev) {
    const dt = Math.max(1e-3, t - prev.t);
    s.tokensPerS = Math.max(0, (s.tokens - prev.tokens) / dt);
    for (const [k, v] of Object.entries(load)) {
      s.expertRate[k] = Math.max(0, (v - (prev.load[k] || 0)) / dt);
    }
  }
  return s;
}

async function newEvents() {
  let out = [];
  for (;;) {
    const page = await api.get(`/api/events?after_seq=${state.lastSeq}`);
    if (page.last_seq < state.lastSeq) {
      // a new cluster numbers its events from 1 again: start over
      Object.assign(state, { events: [], lastSeq: 0 });
      out = [];
      continue;
    }
    out = [...out, ...page.events].slice(-KEEP_EVENTS);
    state.lastSeq = page.next;
    if (!page.has_more) return out;
  }
}

async function poll() {
  try {
    const [status, events] = await Promise.all([api.get("/api/cluster"), newEvents()]);
    state.status = status;
    if (events.length) state.events = [...state.events, ...events].slice(-KEEP_EVENTS);
    const prev = state.history[state.history.length - 1];
    state.history = [...state.history, sample(status, prev)].slice(-KEEP);
    state.error = null;
  } catch (err) {
    state.error = err.message;
  }
  for (const fn of listeners) fn({ ...state });
}

export function startPolling() {
  if (timer) return;
  poll();
  timer = setInterval(poll, POLL_MS);
}

export function stopPolling() {
  clearInterval(timer);
  timer = null;
  Object.assign(state, { status: null, events: [], history: [], error: null, lastSeq: 0 });
}

export const refreshNow = poll;

export function useCluster() {
  const [snap, setSnap] = useState({ ...state });
  useEffect(() => {
    listeners.add(setSnap);
    return () => listeners.delete(setSnap);
  }, []);
  return snap;
}

// "layer:expert" keys of the placement as a grid: rows of [layer, [experts...]]
export function layerGrid(status) {
  const layers = new Map();
  for (const key of Object.keys((status && status.placement) || {})) {
    const [l, e] = key.split(":").map(Number);
    if (!layers.has(l)) layers.set(l, []);
    layers.get(l).push(e);
  }
  return [...layers.entries()].sort((a, b) => a[0] - b[0]).map(([l, es]) => [l, es.sort((a, b) => a - b)]);
}

// max/mean of per-expert load (1.0 = perfectly even)
export function imbalance(rates) {
  const v = Object.values(rates);
  if (!v.length) return null;
  const mean = v.reduce((a, b) => a + b, 0) / v.length;
  return mean > 0 ? Math.max(...v) / mean : null;
}
