"""Live upgrade under load on a real local Ray cluster: a registered version grown by
add_expert's surgery (one expert added, one retrained) replaces the serving one with no failed
request; requests keep the version they started on; only changed experts are read; the old
version's weights go after its last request; ``@serving`` follows; rollback is an upgrade to
the parent; bad targets are refused over HTTP with the serving version unchanged."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from mlflow import MlflowClient

import expertmesh
from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.engine import Engine
from expertmesh.platform.grow import domain_stats, grow
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from expertmesh.platform.storage import tracking_uri
from expertmesh.platform.tracking import Tracker
from expertmesh.types import UpgradeInProgressError
from tests.integration.helpers import PROMPTS, api_cluster, tiny_checkpoint

pytestmark = pytest.mark.integration

NAME = "upgrade-tiny"
TOKEN = "upgrade-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_TOKENS = 12
# the request in flight across the switch: long enough (of max_seq_len 1024) that the upgrade's
# drain outlasts a second upgrade's HTTP round trip through Serve on a loaded 2-core machine
MAX_SEQ_LEN = 1024
LONG = 900
CHANGED = [(0, 2), (1, 8)]  # v2: expert 2 of layer 0 retrained, layer 1 grown by expert 8


def grown_version(v1: str, root: Path) -> str:
    """v1 grown by one expert in layer 1 (add_expert's surgery) with the new expert and
    expert (0, 2) changed as training would change them; saved as v1's child."""
    model, _ = ckpt.load_model(v1)
    g = torch.Generator().manual_seed(3)
    vocab = model.cfg.vocab_size
    new, base = (torch.randint(2, vocab, (2, 16), generator=g) for _ in range(2))
    child, added = grow(model, [1], 1, domain_stats(model, [new], [base], [1]))
    assert added == {1: [8]}
    moe = child.moe_layers()
    with torch.no_grad():
        for layer, e in CHANGED:
            t = moe[layer].experts.expert_tensors(e)
            moe[layer].experts.load_expert(
                e, {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in t.items()}
            )
    return ckpt.save_checkpoint(
        str(root), "v2", child.eval(), tokenizer_path=f"{v1}/tokenizer.json", parent=v1
    )


def in_process(uri: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    model, tok = load_for_inference(uri)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [s.output_ids for s in Engine(model, tok).generate(prompts, params)]


@dataclass
class Setup:
    cluster: expertmesh.Cluster
    http: httpx.Client
    uris: dict[str, str]  # registry version -> checkpoint URI


@pytest.fixture(scope="module")
def setup(state_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("upgrade-ckpt")
    v1 = tiny_checkpoint(root, max_seq_len=MAX_SEQ_LEN)
    v2 = grown_version(v1, root)
    wide = tiny_checkpoint(
        tmp_path_factory.mktemp("upgrade-narrow"), d_model=32, max_seq_len=MAX_SEQ_LEN
    )
    tracker = Tracker()
    for uri, parent in ((v1, None), (v2, f"{NAME}/1"), (wide, None)):
        tracker.register_version(NAME, source=uri, run_id=None, tags={"parent": parent or ""})
    deploy = {"shards": 4, "replicas": 2, "warm_shards": 0}
    with (
        api_cluster(f"{NAME}/1", TOKEN, prefix="emup-", deploy=deploy) as (cluster, url),
        httpx.Client(base_url=url, timeout=300.0, headers=AUTH) as http,
    ):
        yield Setup(cluster=cluster, http=http, uris={"1": v1, "2": v2, "3": wide})


@dataclass
class Done:
    prompt: int
    start: float
    end: float
    tokens: list[int] | None
    error: str | None = None


def closed_loop(cluster, clients: int, results: list[Done], stop: threading.Event):
    """``clients`` callers, each sending its next request when the last one ended, until
    ``stop`` is set."""
    counter = itertools.count()

    def client() -> None:
        while not stop.is_set():
            p, t0 = next(counter) % len(PROMPTS), time.time()
            try:
                out = cluster.generate(PROMPTS[p], max_tokens=MAX_TOKENS, ignore_eos=True)
                results.append(Done(p, t0, time.time(), out.token_ids))
            except Exception as exc:
                results.append(Done(p, t0, time.time(), None, repr(exc)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def events_of(cluster, since: float) -> dict[str, dict]:
    return {e["kind"]: e for e in cluster.events(since)}


def upgrade_under_load(s: Setup, target: str, upgrade, after: int = 24) -> tuple[list, dict]:
    """Run ``upgrade()`` while 8 closed-loop clients and one long request run, and the load
    goes on until ``after`` requests started once the upgrade returned; returns the load's
    results, the long request's and the upgrade's events."""
    results: list[Done] = []
    stop = threading.Event()
    t_begin = time.time()
    threads = closed_loop(s.cluster, 8, results, stop)
    deadline = time.time() + 300
    while len(results) < 30 and time.time() < deadline:
        time.sleep(0.05)
    long: list[Done] = []

    def long_request() -> None:  # in flight across the switch: it must end on the old version
        t0 = time.time()
        out = s.cluster.generate(PROMPTS[0], max_tokens=LONG, ignore_eos=True)
        long.append(Done(0, t0, time.time(), out.token_ids))

    lt = threading.Thread(target=long_request)
    lt.start()
    time.sleep(0.2)
    try:
        summary = upgrade(target)
        t_done = time.time()
        while sum(r.start > t_done for r in list(results)) < after and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        lt.join(timeout=300)
        for t in threads:
            t.join(timeout=300)
    assert [r.error for r in results if r.error] == []  # zero failed requests
    assert sum(r.start > t_done for r in results) >= after
    return results + long, {**events_of(s.cluster, t_begin), "summary": summary}


def check_versions(results: list[Done], ev: dict, old: dict, new: dict) -> None:
    """Each request ran on one version: sent after the switch, the new one; sent before the
    upgrade began, the old one, however long it ran; in between, exactly one of the two."""
    switched, started = ev["router_switched"]["ts"], ev["upgrade_started"]["ts"]
    n_new = 0
    for r in results:
        key = (r.prompt, len(r.tokens))
        assert r.tokens in (old[key], new[key])
        if r.start > switched:
            assert r.tokens == new[key]
            n_new += 1
        if r.start < started:
            assert r.tokens == old[key]
    assert n_new > 0


def oracles(uri: str) -> dict[tuple[int, int], list[int]]:
    short = in_process(uri, PROMPTS, MAX_TOKENS)
    out = {(i, MAX_TOKENS): t for i, t in enumerate(short)}
    out[(0, LONG)] = in_process(uri, [PROMPTS[0]], LONG)[0]
    return out


def test_upgrade_under_load_then_rollback(setup: Setup) -> None:
    s = setup
    v1, v2 = oracles(s.uris["1"]), oracles(s.uris["2"])
    assert v1 != v2 and v1[(0, LONG)] != v2[(0, LONG)]  # the versions answer differently
    refused: dict[str, object] = {}

    def upgrade_v2(target: str) -> dict:
        # A second upgrade while this one runs is refused (409), by the SDK and over HTTP, both
        # sent at once as soon as it started. Its target does not exist: had the window been
        # missed the answer would be a 404 that names the miss, not a second upgrade.
        def sdk() -> None:
            try:
                s.cluster.upgrade(f"{NAME}/99")
            except UpgradeInProgressError as exc:
                refused["sdk"] = exc
            except Exception as exc:  # reported by the assertion below
                refused["sdk"] = f"not refused as in progress: {exc!r}"

        def http() -> None:
            resp = s.http.put("/api/model", json={"model": f"{NAME}/99"})
            refused["http"] = (resp.status_code, resp.text)

        def second() -> None:
            while "upgrade_started" not in events_of(s.cluster, t0):
                time.sleep(0.02)
            pair = [threading.Thread(target=sdk), threading.Thread(target=http)]
            for t in pair:
                t.start()
            for t in pair:
                t.join()

        t0 = time.time()
        checker = threading.Thread(target=second)
        checker.start()
        out = s.cluster.upgrade(target)
        checker.join()
        return out

    results, ev = upgrade_under_load(s, f"{NAME}/2", upgrade_v2)
    assert "in progress" in str(refused["sdk"]), refused
    assert refused["http"][0] == 409 and "in progress" in refused["http"][1], refused
    check_versions(results, ev, v1, v2)
    long = results[-1]
    assert long.start < ev["upgrade_started"]["ts"] and long.tokens == v1[(0, LONG)]
    # only the two changed experts were read, once per replica (2 each)
    sizes = ckpt.read_manifest(s.uris["2"]).files
    changed = sum(sizes[ckpt.expert_file(*k)].size for k in CHANGED)
    loaded = ev["experts_loaded"]
    assert (loaded["files_loaded"], loaded["bytes_loaded"]) == (4, 2 * changed)
    assert loaded["experts"] == 17 and loaded["experts_changed"] == 2
    assert ev["summary"]["upgraded"]["files_loaded"] == 4  # what the SDK call reports
    # v1's retrained expert (2 replicas) went after the drain; nothing of v1 remains
    assert ev["old_version_drained"]["dropped"] == 2
    kinds = [e["kind"] for e in s.cluster.events(ev["upgrade_started"]["ts"] - 1e-6)]
    stages = ["upgrade_started", "experts_loaded", "router_switched", "old_version_drained"]
    stages.append("upgrade_finished")
    assert [k for k in kinds if k in stages] == stages
    status = s.cluster.status()
    assert status["version"] == "2" and status["upgrade"] is None
    assert [v["label"] for v in status["versions"]] == [f"{NAME}/2"]
    assert {k for sh in status["shards"] for k in sh["versions"]} == {f"{NAME}/2"}
    assert sum(sh["versions"][f"{NAME}/2"] for sh in status["shards"]) == 2 * 17
    assert all(len(v) >= 2 for v in status["placement"].values())
    assert status["router"]["versions"] == {f"{NAME}/2": {"running": 0, "waiting": 0}}
    mlflow = MlflowClient(tracking_uri())
    assert str(mlflow.get_model_version_by_alias(NAME, "serving").version) == "2"
    got = s.cluster.generate(PROMPTS, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [c.token_ids for c in got] == [v2[(i, MAX_TOKENS)] for i in range(len(PROMPTS))]

    # rollback: an upgrade to the parent, over HTTP, under load, the same way
    def upgrade_http(target: str) -> dict:
        resp = s.http.put("/api/model", json={"model": target})
        assert resp.status_code == 200, resp.text
        return resp.json()

    results, ev = upgrade_under_load(s, f"{NAME}/1", upgrade_http)
    check_versions(results, ev, v2, v1)
    assert results[-1].tokens == v2[(0, LONG)]
    assert ev["summary"]["upgraded"]["files_loaded"] == 2  # v1's expert (0, 2), 2 replicas
    assert ev["old_version_drained"]["dropped"] == 4  # v2's two experts, 2 replicas each
    assert ev["summary"]["version"] == "1"
    assert str(mlflow.get_model_version_by_alias(NAME, "serving").version) == "1"


@pytest.mark.parametrize(
    "model,status,message",
    [
        (f"{NAME}/99", 404, "has no version '99'"),
        (f"{NAME}/3", 400, "d_model 32 (serving: 64)"),
        ("no-such-model/1", 404, "no-such-model"),
    ],
)
def test_bad_targets_are_refused_and_serving_is_unchanged(
    setup: Setup, model: str, status: int, message: str
) -> None:
    before = setup.cluster.status()
    resp = setup.http.put("/api/model", json={"model": model})
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]["message"]
    after = setup.cluster.status()
    assert after["version"] == before["version"] and after["upgrade"] is None
    assert [v["label"] for v in after["versions"]] == [v["label"] for v in before["versions"]]
    assert setup.http.put("/api/model", json={}).status_code == 400
