"""The distributed serving path: experts in shard actors, the router batching continuously."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from ray.util.state import list_actors

import expertmesh
from expertmesh.actors import names
from expertmesh.platform.engine import Engine
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from expertmesh.runtime import LocalRayOptions
from tests.integration.helpers import PROMPTS, tiny_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint(state_home, tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def cluster(checkpoint):
    # the dashboard is on here only because Ray's state API (used below) is served by it
    c = expertmesh.connect(local=LocalRayOptions(dashboard=True))
    c.deploy(checkpoint, shards=4, replicas=2, advanced=expertmesh.RouterTuning(micro_batches=2))
    yield c
    c.shutdown()


def in_process(checkpoint: str, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    model, tok = load_for_inference(checkpoint)
    return [s.output_ids for s in Engine(model, tok).generate(prompts, params)]


def test_distributed_greedy_equals_in_process(cluster, checkpoint) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    expected = in_process(checkpoint, PROMPTS, params)
    got = [c.token_ids for c in cluster.generate(PROMPTS, max_tokens=24, ignore_eos=True)]
    assert got == expected

    # the experts really live in >= 4 shard actors, each its own process apart from the router
    status = cluster.status()
    shards = status["shards"]
    assert len(shards) == 4
    assert all(s["experts"] for s in shards)
    # shards run under SCHED_BATCH: woken by the router, they do not preempt it
    assert {s["sched_policy"] for s in shards} == {"batch"}
    # no GPU asked for (num_gpus=0): the experts live and run in host memory
    assert {s["device"] for s in shards} == {"cpu"}
    # the router's large ops on 2 threads whose OpenMP worker sleeps between them
    router = status["router"]
    assert router["omp_wait_policy"] == "PASSIVE"
    pids = {s["pid"] for s in shards}
    alive = {
        a.name: a
        for a in list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("state", "=", "ALIVE")],
            detail=True,
        )
    }
    router_pid = alive[names.ROUTER].pid
    assert len(pids) == 4 and router_pid not in pids and os.getpid() not in pids
    for s in shards:
        assert alive[names.shard_name(s["shard_id"])].pid == s["pid"]
    # every expert has 2 replicas on distinct shards, and the shards served tokens
    assert all(len(set(v)) == 2 for v in status["placement"].values())
    assert sum(status["expert_load"].values()) > 0
    # every shard call went over the direct channel, none as a Ray call (deploy returns once
    # the router holds the shards' endpoints)
    router = status["router"]
    assert router["transport"] == "direct"
    assert router["channel_calls"] == router["dispatch_calls"] > 0


def test_continuous_batching_matches_requests_run_alone(cluster, checkpoint) -> None:
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 4)]
    alone = [in_process(checkpoint, [p], params)[0] for p in prompts]
    before = cluster.status()["router"]
    # staggered, concurrent callers: later requests join steps that are already running
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = [
            pool.submit(cluster.generate, p, max_tokens=16, ignore_eos=True) for p in prompts
        ]
        outs = [f.result(timeout=120) for f in futures]
    assert [o.token_ids for o in outs] == alone
    after = cluster.status()["router"]
    # 20 requests x 16 tokens run alone would take 320 steps; batched they share steps
    assert after["steps"] - before["steps"] < len(prompts) * 16 / 2
    # steps of >= 16 sequences ran as 2 overlapped micro-batches, with the same tokens
    assert after["overlapped_steps"] > before["overlapped_steps"]
    # the step-time split the router reports; dispatch time adds up over the 2 micro-batches,
    # which overlap, so it lies between 0 and twice the steps' wall time
    step_s = after["step_s"] - before["step_s"]
    dispatch_s = after["dispatch_s"] - before["dispatch_s"]
    assert 0 < dispatch_s < 2 * step_s


def test_sampling_options(cluster) -> None:
    a = cluster.generate("To be", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    b = cluster.generate("To be", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids  # seeded sampling is reproducible
    full = cluster.generate("To be", max_tokens=20, ignore_eos=True)
    stop = full.text[3:6]
    cut = cluster.generate("To be", max_tokens=20, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    streamed = "".join(cluster.stream("To be", max_tokens=20, ignore_eos=True))
    assert streamed == full.text


def test_every_sampling_option_is_served(cluster, checkpoint) -> None:
    """n, best_of, logprobs and the penalties reach the router; none is dropped."""
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 2.0}
    params = SamplingParams(max_tokens=24, ignore_eos=True, **penalties)
    (want,) = in_process(checkpoint, ["To be"], params)
    assert (
        want != in_process(checkpoint, ["To be"], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    )
    assert cluster.generate("To be", max_tokens=24, ignore_eos=True, **penalties).token_ids == want

    three = cluster.generate("To be", max_tokens=8, temperature=1.0, seed=5, n=3)
    assert len(three) == 3 and len({tuple(c.token_ids) for c in three}) > 1
    again = cluster.generate("To be", max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.token_ids for c in again] == [c.token_ids for c in three]
    pairs = cluster.generate(["To be", "Once"], max_tokens=4, n=2, best_of=3, temperature=1.0)
    assert len(pairs) == 4  # n per prompt, in prompt order

    # (not ignore_eos: it would mask EOS from the choice but not from the alternatives)
    out = cluster.generate("To be", max_tokens=6, logprobs=2)
    lp = out.logprobs
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == out.completion_tokens >= 1
    for token, chosen, top in zip(*lp.values(), strict=True):
        assert 1 <= len(top) <= 2 and chosen <= 0.0
        # greedy picks the most likely token: no alternative beats it, and it is one of them
        # (by text: OpenAI's dict keeps one of two tokens that decode alike, such as the
        # partial UTF-8 bytes an untrained model emits, so its value may be the other's)
        assert token in top and max(top.values()) <= chosen + 1e-5

    with pytest.raises(ConfigError, match="n: streams one sequence"):
        next(iter(cluster.stream("To be", n=2)))
    with pytest.raises(ConfigError, match="logprobs: streams one sequence"):
        next(iter(cluster.stream("To be", logprobs=1)))
    with pytest.raises(ConfigError, match="best_ofs: unknown sampling option"):
        cluster.generate("To be", best_ofs=2)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        cluster.generate("To be", repetition_penalty=0.0)


def test_bad_request_names_the_problem(cluster, checkpoint) -> None:
    with pytest.raises(ValueError, match=r"transport: must be one of .* 'tcp'"):
        expertmesh.RouterTuning(transport="tcp")
    with pytest.raises(TypeError, match=r"advanced must be an expertmesh\.RouterTuning"):
        cluster.deploy(checkpoint, advanced={"transport": "ray"})
    with pytest.raises(expertmesh.platform.errors.ConfigError, match="temperature"):
        cluster.generate("x", temperature=-1)
    with pytest.raises(Exception, match="exceeds the model's context"):
        cluster.generate("To be " * 200, max_tokens=16)
    assert ray.is_initialized()


def test_ray_call_transport_gives_the_same_tokens(cluster, checkpoint) -> None:
    """``transport="ray"`` (every shard call a Ray actor call) computes the same generations."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = in_process(checkpoint, PROMPTS, params)
    cluster.deploy(
        checkpoint, shards=4, replicas=2, advanced=expertmesh.RouterTuning(transport="ray")
    )
    got = [c.token_ids for c in cluster.generate(PROMPTS, max_tokens=12, ignore_eos=True)]
    assert got == expected
    router = cluster.status()["router"]
    assert router["transport"] == "ray"
    assert router["channel_calls"] == 0 and router["dispatch_calls"] > 0
