import { useEffect, useState } from "preact/hooks";
import { api, fmt, html } from "../api.js";

function parseArgs(text) {
  const args = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const [k, ...rest] = line.split("=");
    const v = rest.join("=").trim();
    args[k.trim()] = v === "" ? true : /^-?\d+$/.test(v) ? Number(v) : v;
  }
  return args;
}

const EXAMPLES = {
  train: "config=tiny\nsteps=50",
  finetune: "model=expertmesh-tiny\ntrain=router\nsteps=50",
  add_expert: "model=expertmesh-tiny\nlayers=1\nsteps=50",
  federated: "config=federated",
};

function SubmitForm({ config, onDone }) {
  const [pipeline, setPipeline] = useState(config.pipelines[0]);
  const [args, setArgs] = useState(EXAMPLES[config.pipelines[0]] || "");
  const [msg, setMsg] = useState("");
  const submit = async (ev) => {
    ev.preventDefault();
    try {
      const job = await api.post("/api/jobs", { pipeline, args: parseArgs(args) });
      setMsg(`submitted ${job.submission_id}`);
      onDone();
    } catch (e) {
      setMsg(e.message);
    }
  };
  return html`
    <form class="card" onSubmit=${submit} data-testid="job-form">
      <h3>Submit a pipeline</h3>
      <div class="row">
        <select value=${pipeline} onChange=${(e) => { setPipeline(e.target.value); setArgs(EXAMPLES[e.target.value] || ""); }}>
          ${config.pipelines.map((p) => html`<option value=${p}>${p}</option>`)}
        </select>
        <button type="submit" disabled=${!config.job_server}>Submit as a Ray job</button>
      </div>
      <textarea rows="4" value=${args} onInput=${(e) => setArgs(e.target.value)} placeholder="flag=value, one a line"></textarea>
      ${msg && html`<p class="small">${msg}</p>`}
    </form>`;
}

export function JobsView({ config }) {
  const [runs, setRuns] = useState(null);
  const [jobs, setJobs] = useState(null);
  const [logs, setLogs] = useState(null);
  const [error, setError] = useState("");
  const load = () => {
    api.get("/api/runs?limit=50").then(setRuns, (e) => setError(e.message));
    api.get("/api/jobs").then(setJobs, (e) => setError(e.message));
  };
  useEffect(() => {
    load();
    const t = setInterval(load, 5000);
    return () => clearInterval(t);
  }, []);
  const showLogs = (id) => api.get(`/api/jobs/${id}/logs`).then(setLogs, (e) => setError(e.message));
  return html`
    ${error && html`<p class="error">${error}</p>`}
    <section class="card">
      <h3>Pipeline runs (MLflow)</h3>
      <table data-testid="runs">
        <thead><tr><th>experiment</th><th>run</th><th>status</th><th>started</th><th>metrics</th></tr></thead>
        <tbody>${(runs || []).map((r) => html`
          <tr data-testid="run">
            <td>${r.experiment}</td>
            <td>${config.mlflow_ui_url ? html`<a target="_blank" rel="noopener" href="${config.mlflow_ui_url}/#/experiments/0/runs/${r.run_id}">${r.run_name || r.run_id}</a>` : r.run_name || r.run_id}</td>
            <td><span class="pill ${r.status === "FINISHED" ? "ok" : r.status === "FAILED" ? "dead" : ""}">${r.status}</span></td>
            <td>${fmt.ms(r.start_time)}</td>
            <td class="small">${Object.entries(r.metrics).slice(0, 4).map(([k, v]) => `${k} ${fmt.num(v, 3)}`).join(" · ")}</td>
          </tr>`)}</tbody>
      </table>
      ${runs && !runs.length && html`<p class="muted">No runs yet.</p>`}
    </section>
    <section class="card">
      <h3>Ray jobs</h3>
      ${jobs && !jobs.job_server && html`<p class="muted" data-testid="no-job-server">${jobs.message}</p>`}
      <table data-testid="jobs">
        <thead><tr><th>job</th><th>pipeline</th><th>status</th><th>started</th><th></th></tr></thead>
        <tbody>${((jobs && jobs.jobs) || []).map((j) => html`
          <tr data-testid="job">
            <td>${j.submission_id}</td><td>${j.pipeline || j.entrypoint}</td>
            <td><span class="pill ${j.status === "SUCCEEDED" ? "ok" : j.status === "FAILED" ? "dead" : ""}">${j.status}</span></td>
            <td>${fmt.ms(j.start_time)}</td>
            <td><button class="small" onClick=${() => showLogs(j.submission_id)}>logs</button></td>
          </tr>`)}</tbody>
      </table>
      ${logs && html`<h4>Logs of ${logs.submission_id}</h4><pre class="logs" data-testid="job-logs">${logs.logs}</pre>`}
    </section>
    <${SubmitForm} config=${config} onDone=${load} />`;
}
