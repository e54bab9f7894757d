"""Training tokens/s: one process against Ray Train with 1 and 2 workers, side by side.

Trains the ``--config`` model (``configs/tiny.yaml``: the demo model) for ``--steps`` steps three
ways in one run: the single-process loop (:func:`expertmesh.platform.training.train`), Ray Train
with one worker and Ray Train with two DDP workers (gloo), each worker at the config's batch (so
two workers train on twice the tokens per step). All three run the same step function; the
tokens/s are the loops' own ``tokens_per_s`` (MLflow), the median over the logged intervals after
the first one (warm-up). Also prints, for the Ray runs, the seconds from the ``trainer.fit()``
call to the first training step (worker group start, process group, fetching the token shards
from the object store, model build) and, apart, Ray Data's read of the shards into the object
store just before ``fit()``. One local Ray cluster serves both Ray runs of a round; its start
is not counted, and it is stopped while the single process runs.

Threads: the single process and the 1-worker run use ``--threads`` torch threads (default: every
core) and the 1 worker reserves as many logical CPUs; each of the 2 workers gets half.
Target: Ray Train with 1 worker within 10 % of the single process (ratio >= 0.90).

    .venv/bin/python bench/train_throughput.py [--steps 60] [--rounds 2] [--log-every 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
from dataclasses import replace

import mlflow
import ray

from expertmesh.pipelines.train_ray import RayTrainOptions, train_on_ray
from expertmesh.platform.config import ExperimentConfig, load_config
from expertmesh.platform.data import prepare
from expertmesh.platform.tracking import Tracker
from expertmesh.platform.training import train
from expertmesh.runtime import LocalRayOptions, init_ray

EXPERIMENT = "bench-train-throughput"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def steady_tokens_per_s(client: mlflow.MlflowClient, run_id: str) -> float:
    points = sorted(client.get_metric_history(run_id, "tokens_per_s"), key=lambda m: m.step)
    values = [m.value for m in points]
    return statistics.median(values[1:] if len(values) > 1 else values)


def first_value(client: mlflow.MlflowClient, run_id: str, key: str) -> float:
    return client.get_metric_history(run_id, key)[0].value


def bench_cfg(base: ExperimentConfig, args: argparse.Namespace, threads: int, out: str):
    train_cfg = replace(
        base.train,
        steps=args.steps,
        log_every=args.log_every,
        eval_every=args.steps,  # one evaluation and one checkpoint, at the end, in every mode
        checkpoint_every=args.steps,
        threads=threads,
        output_dir=out,
        experiment=EXPERIMENT,
    )
    return replace(base, train=train_cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--log-every", type=int, default=10, help="steps per tokens/s interval")
    p.add_argument("--rounds", type=int, default=2, help="repeat the three runs, alternating")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.threads < 1 or args.log_every < 1:
        p.error("--steps, --rounds, --threads and --log-every must be >= 1")

    base = load_config(args.config)
    prepare(base.data, progress=False)
    half = max(1, args.threads // 2)
    args.log_every = min(args.log_every, args.steps)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(
        f"model {args.config}, batch {base.train.batch_size} x seq {base.train.seq_len} per "
        f"worker, {args.steps} steps, tokens/s every {args.log_every} steps, {args.rounds} round(s)"
    )
    print(f"threads: single {args.threads}, Ray 1 worker {args.threads}, Ray 2 workers {half} each")

    tracker = Tracker()
    client = tracker.client
    tmp = tempfile.mkdtemp(prefix="expertmesh-bench-train-")
    modes = {
        "single process": None,
        "Ray Train, 1 worker": RayTrainOptions(
            workers=1, cpus_per_worker=args.threads, checkpoint_root=tmp, max_failures=0
        ),
        "Ray Train, 2 workers": RayTrainOptions(
            workers=2, cpus_per_worker=half, checkpoint_root=tmp, max_failures=0
        ),
    }
    tok_s: dict[str, list[float]] = {m: [] for m in modes}
    startup: dict[str, list[float]] = {m: [] for m in modes}
    read: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for r in range(args.rounds):
            for mode, opts in modes.items():
                threads = args.threads if opts is None or opts.workers == 1 else half
                cfg = bench_cfg(base, args, threads, f"{tmp}/single-{r}")
                if opts is None:
                    # NOTE: no Ray running next to the single process: its idle daemons would
                    # slow the baseline and flatter the ratio
                    ray.shutdown()
                    run_id = train(cfg, tracker=tracker, progress=False, register=False).run_id
                else:
                    # one cluster for both Ray runs of a round; its start is not measured
                    init_ray(local=LocalRayOptions(num_cpus=max(4, args.threads + 2)))
                    run_id = train_on_ray(cfg, opts, tracker=tracker, register=False).run_id
                    startup[mode].append(first_value(client, run_id, "submit_to_first_step_s"))
                    read[mode].append(first_value(client, run_id, "data_read_s"))
                tok_s[mode].append(steady_tokens_per_s(client, run_id))
                print(f"  round {r + 1}: {mode}: {tok_s[mode][-1]:,.0f} tokens/s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    ref = statistics.median(tok_s["single process"])
    print(
        f"\n{'mode':<22} {'tokens/s':>10} {'vs single':>10} {'fit->1st step s':>16} {'read s':>7}"
    )
    for mode in modes:
        med = statistics.median(tok_s[mode])
        first = f"{statistics.median(startup[mode]):.1f}" if startup[mode] else "-"
        rd = f"{statistics.median(read[mode]):.1f}" if read[mode] else "-"
        print(f"{mode:<22} {med:>10,.0f} {med / ref:>10.3f} {first:>16} {rd:>7}")
    one = statistics.median(tok_s["Ray Train, 1 worker"]) / ref
    two = statistics.median(tok_s["Ray Train, 2 workers"])
    print(f"\n2 workers / 1 worker: {two / statistics.median(tok_s['Ray Train, 1 worker']):.3f}")
    verdict = "met" if one >= 0.90 else "missed"
    print(f"target Ray Train 1 worker >= 0.90 x single process: {one:.3f} ({verdict})")


if __name__ == "__main__":
    main()
