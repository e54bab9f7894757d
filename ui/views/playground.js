import { useState } from "preact/hooks";
import { expertColour, headers, html, signOut } from "../api.js";

// POST /v1/completions with stream=true and the routing extension; calls onText(piece) per
// server-sent event. Returns the pieces, the experts of every fed token (each chunk brings its
// tokens'; the last the per-expert counts) and the usage.
async function stream(body, onText) {
  const resp = await fetch("/v1/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({
      ...body, stream: true, expertmesh_routing: true, stream_options: { include_usage: true },
    }),
  });
  if (!resp.ok) {
    const message = (await resp.json()).error.message;
    if (resp.status === 401) signOut(message);
    throw new Error(message);
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  const out = { pieces: [], trace: { token_experts: [], expert_counts: null }, usage: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut).replace(/^data: /, "");
      buf = buf.slice(cut + 2);
      if (line === "[DONE]") return out;
      const chunk = JSON.parse(line);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) out.usage = chunk.usage;
      for (const c of chunk.choices) {
        out.pieces.push(c.text);
        onText(c.text);
        const r = c.expertmesh_routing;
        if (r) {
          out.trace.token_experts.push(...r.token_experts);
          if (r.expert_counts) out.trace.expert_counts = r.expert_counts;
        }
      }
    }
  }
  return out;
}

function TraceGrid({ trace, pieces, promptTokens, nExperts }) {
  const rows = trace.token_experts;
  const label = (i) => (i < promptTokens ? `prompt ${i}` : JSON.stringify(pieces[i - promptTokens] ?? ""));
  return html`
    <table class="trace" data-testid="trace-grid">
      <thead><tr><th>token</th>${(rows[0] || []).map((_, l) => html`<th>layer ${l}</th>`)}</tr></thead>
      <tbody>${rows.map((layers, i) => html`
        <tr class=${i < promptTokens ? "muted" : ""}>
          <td class="tok">${label(i)}</td>
          ${layers.map((experts) => html`<td class="trace-cell" data-testid="trace-cell"
              style="background:${expertColour(experts[0], nExperts)}" title="experts ${experts.join(", ")}">${experts.join(",")}</td>`)}
        </tr>`)}</tbody>
    </table>`;
}

function Histogram({ counts, nExperts }) {
  return html`
    <div class="hist" data-testid="histogram">
      ${counts.map((layer, l) => {
        const max = Math.max(1, ...layer);
        return html`<div class="hist-layer"><div class="small">layer ${l}</div>
          <div class="bars">${layer.map((n, e) => html`
            <div class="bar" title="expert ${e}: ${n} tokens" style="height:${(60 * n) / max}px;background:${expertColour(e, nExperts)}"></div>`)}</div>
          <div class="small muted">${layer.map((_, e) => html`<span class="barlabel">${e}</span>`)}</div></div>`;
      })}
    </div>`;
}

function Panel({ id, initial }) {
  const [prompt, setPrompt] = useState(initial);
  const [params, setParams] = useState({ max_tokens: 16, temperature: 0, top_p: 1, seed: 0 });
  const [text, setText] = useState("");
  const [result, setResult] = useState(null);
  const [state, setState] = useState("");
  const [error, setError] = useState("");
  const set = (k) => (e) => setParams({ ...params, [k]: Number(e.target.value) });
  const run = async () => {
    setText("");
    setResult(null);
    setError("");
    setState("streaming");
    const body = { prompt, ...params, ignore_eos: true };
    try {
      let acc = "";
      const out = await stream(body, (t) => { acc += t; setText(acc); });
      // the trace is the streamed request's own: no second request
      setResult({ pieces: out.pieces, body, trace: out.trace, promptTokens: out.usage.prompt_tokens });
      setState("done");
    } catch (e) {
      setError(e.message);
      setState("");
    }
  };
  const trace = result && result.trace;
  const nExperts = trace ? Math.max(...trace.expert_counts.map((l) => l.length)) : 0;
  return html`
    <section class="card panel" data-testid="panel-${id}">
      <textarea rows="3" value=${prompt} onInput=${(e) => setPrompt(e.target.value)} data-testid="prompt"></textarea>
      <div class="row small">
        <label>max tokens <input type="number" min="1" value=${params.max_tokens} onInput=${set("max_tokens")} data-testid="max-tokens" /></label>
        <label>temperature <input type="number" step="0.1" min="0" value=${params.temperature} onInput=${set("temperature")} /></label>
        <label>top p <input type="number" step="0.05" min="0" max="1" value=${params.top_p} onInput=${set("top_p")} /></label>
        <label>seed <input type="number" value=${params.seed} onInput=${set("seed")} /></label>
        <button onClick=${run} disabled=${state === "streaming"} data-testid="run">Generate</button>
      </div>
      ${error && html`<p class="error">${error}</p>`}
      <pre class="output" data-testid="output" data-state=${state}><span class="muted">${prompt}</span>${text}</pre>
      ${trace && html`
        <h4>Expert histogram of this request</h4>
        <${Histogram} counts=${trace.expert_counts} nExperts=${nExperts} />
        <h4>Experts per token and layer (colour: first expert)</h4>
        <${TraceGrid} trace=${trace} pieces=${result.pieces} promptTokens=${result.promptTokens} nExperts=${nExperts} />
        <pre hidden data-testid="trace-json">${JSON.stringify({ request: result.body, routing: trace })}</pre>`}
    </section>`;
}

export function PlaygroundView() {
  return html`
    <p class="small muted">Two prompts side by side; output streams, then the per-token expert trace is drawn.</p>
    <div class="panels">
      <${Panel} id="a" initial="To be, or not" />
      <${Panel} id="b" initial="def main(argv):" />
    </div>`;
}
