// The API client: the bearer token lives in sessionStorage; a 401 signs the user out.
import { h } from "preact";
import htm from "htm";

export const html = htm.bind(h);
const KEY = "expertmesh.token";

export const getToken = () => sessionStorage.getItem(KEY);
export const setToken = (t) => sessionStorage.setItem(KEY, t);

export function signOut(message) {
  sessionStorage.removeItem(KEY);
  window.dispatchEvent(new CustomEvent("expertmesh-signout", { detail: message || "" }));
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function headers(extra = {}) {
  return { Authorization: `Bearer ${getToken()}`, ...extra };
}

// fetch with the token; the API's JSON error becomes an ApiError carrying its message
export async function request(path, { method = "GET", body, raw = false } = {}) {
  const opts = { method, headers: headers() };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try {
      message = (await resp.json()).error.message;
    } catch (_) { /* not the API's JSON error */ }
    if (resp.status === 401) signOut(message);
    throw new ApiError(resp.status, message);
  }
  return raw ? resp : resp.json();
}

export const api = {
  get: (path) => request(path),
  put: (path, body) => request(path, { method: "PUT", body }),
  post: (path, body) => request(path, { method: "POST", body }),
};

export const fmt = {
  num: (x, d = 1) => (x == null || Number.isNaN(x) ? "–" : Number(x).toFixed(d)),
  time: (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "–"),
  ms: (ms) => (ms ? new Date(ms).toLocaleString() : "–"),
};

// a stable colour per expert id (the playground grid and the load heatmap legend)
export function expertColour(e, n) {
  const hue = Math.round((e * 360) / Math.max(1, n)) % 360;
  return `hsl(${hue} 65% 55%)`;
}
