"""The HTTP API over a real local Ray cluster: real requests on 127.0.0.1, checked against the
in-process engine and the Ray-native SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

import expertmesh
from expertmesh.platform.engine import Engine
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.sampling import SamplingParams
from tests.integration.helpers import PROMPTS as ALL_PROMPTS
from tests.integration.helpers import api_cluster, tiny_checkpoint, unread_request

pytestmark = pytest.mark.integration

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ALL_PROMPTS[:3]
MODEL = "v1"  # what the API calls the checkpoint: its folder's name


@dataclass
class Served:
    cluster: expertmesh.Cluster
    url: str
    http: httpx.Client
    engine: Engine


@pytest.fixture(scope="module")
def served(state_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One local Ray cluster for the module: 2 shards x 1 replica, and the API on a free port."""
    uri = tiny_checkpoint(tmp_path_factory.mktemp("api-model"))
    model, tok = load_for_inference(uri)
    with (
        api_cluster(uri, TOKEN) as (cluster, url),
        httpx.Client(base_url=url, timeout=120.0) as http,
    ):
        yield Served(cluster=cluster, url=url, http=http, engine=Engine(model, tok))


def complete(s: Served, **body: object) -> httpx.Response:
    return s.http.post("/v1/completions", json={"model": MODEL, **body}, headers=AUTH)


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == resp.status_code
    return body["error"]


def oracle(s: Served, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions from the in-process engine (experts in this process, no Ray)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [seq.text for seq in s.engine.generate(list(prompts), params)]


# ---------------------------------------------------------------------- completions
def test_single_completion_matches_engine_and_sdk(served: Served) -> None:
    resp = complete(served, prompt=PROMPTS[0], max_tokens=10, temperature=0, ignore_eos=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 10
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 10
    assert choice["text"] == oracle(served, PROMPTS[:1], 10)[0]
    sdk = served.cluster.generate(PROMPTS[0], max_tokens=10, temperature=0.0, ignore_eos=True)
    assert choice["text"] == sdk.text


def test_default_max_tokens_is_16_like_openai(served: Served) -> None:
    body = complete(served, prompt=PROMPTS[1], temperature=0, ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 16


def test_list_prompt_gives_one_choice_per_prompt(served: Served) -> None:
    resp = complete(served, prompt=PROMPTS, max_tokens=6, temperature=0, ignore_eos=True)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["text"] for c in choices] == oracle(served, PROMPTS, 6)
    assert resp.json()["usage"]["completion_tokens"] == 18


def test_routing_extension_reports_experts(served: Served) -> None:
    body = complete(
        served, prompt=PROMPTS[0], max_tokens=4, temperature=0, expertmesh_routing=True
    ).json()
    routing = body["choices"][0]["expertmesh_routing"]
    counts = routing["expert_counts"]
    assert len(counts) == 2 and len(counts[0]) == 8  # (MoE layers, experts)
    assert routing["token_experts"] and all(len(t) == 2 for t in routing["token_experts"])


def test_routing_streams_with_the_tokens(served: Served) -> None:
    """Streamed, each chunk carries its tokens' experts; together they are what the same
    request reports non-streamed (the console's playground draws its trace from them)."""
    request = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}
    request |= {"ignore_eos": True, "expertmesh_routing": True, "return_token_ids": True}
    whole = served.http.post("/v1/completions", json=request, headers=AUTH).json()
    want = whole["choices"][0]["expertmesh_routing"]
    with served.http.stream(
        "POST", "/v1/completions", json=request | {"stream": True}, headers=AUTH
    ) as resp:
        assert resp.status_code == 200
        raw = resp.read().decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    # (by token: a stream holds back the bytes of an unfinished UTF-8 character at the end)
    assert [t for c in chunks for t in c["token_ids"]] == whole["choices"][0]["token_ids"]
    routings = [c["expertmesh_routing"] for c in chunks]
    assert [t for r in routings for t in r["token_experts"]] == want["token_experts"]
    # the prompt's tokens come with the first chunk; the counts only with the last
    assert len(routings[0]["token_experts"]) >= whole["usage"]["prompt_tokens"]
    assert [r["expert_counts"] for r in routings[:-1]] == [None] * (len(routings) - 1)
    assert routings[-1]["expert_counts"] == want["expert_counts"]


def test_stream_sends_sse_chunks_and_done(served: Served) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0}
    body |= {"stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    with served.http.stream("POST", "/v1/completions", json=body, headers=AUTH) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    token_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(token_chunks) == 8
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 7 + ["length"]
    text = "".join(c["choices"][0]["text"] for c in token_chunks)
    assert text == oracle(served, PROMPTS[2:], 8)[0]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8


# ---------------------------------------------------------------------- models and cluster
def test_models_lists_the_deployed_model(served: Served) -> None:
    body = served.http.get("/v1/models", headers=AUTH).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"


def test_cluster_status_and_events(served: Served) -> None:
    status = served.http.get("/api/cluster", headers=AUTH).json()
    assert status["model"] == MODEL
    assert len(status["shards"]) >= 2 and status["nodes"][0]["alive"]
    assert len(status["placement"]) == 16  # 2 MoE layers x 8 experts, 1 replica each
    assert status["router"]["tokens_generated"] > 0
    assert sum(status["expert_load"].values()) > 0
    page = served.http.get("/api/events", headers=AUTH).json()
    assert any(e["kind"] == "deployed" for e in page["events"])
    last = max(e["ts"] for e in page["events"])
    later = served.http.get("/api/events", params={"since": last}, headers=AUTH).json()
    assert later["events"] == [] and later["next"] == page["next"]


def test_health_needs_no_token(served: Served) -> None:
    resp = served.http.get("/api/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok", "model_ready": True}


def test_sdk_over_http_equals_ray_native_sdk(served: Served) -> None:
    remote = expertmesh.connect(served.url, token=TOKEN)
    kwargs = {"max_tokens": 8, "ignore_eos": True}
    native = served.cluster.generate(PROMPTS, **kwargs)
    over_http = remote.generate(PROMPTS, **kwargs)
    assert [c.text for c in over_http] == [c.text for c in native]
    assert [c.token_ids for c in over_http] == [c.token_ids for c in native]
    assert [c.prompt_tokens for c in over_http] == [c.prompt_tokens for c in native]
    assert "".join(remote.stream(PROMPTS[1], **kwargs)) == native[1].text
    assert remote.status()["model"] == MODEL
    with pytest.raises(expertmesh.ClusterError, match="temperature"):
        remote.generate("hello", temperature=9.0)
    # every sampling option, the same on both handles (one router, the same seeded draws)
    rich = {"max_tokens": 6, "n": 2, "best_of": 3, "temperature": 0.8, "seed": 3, "logprobs": 2}
    rich |= {"repetition_penalty": 1.3, "presence_penalty": 0.2, "frequency_penalty": 0.1}
    native, over_http = (
        served.cluster.generate(PROMPTS[0], **rich),
        remote.generate(PROMPTS[0], **rich),
    )
    assert len(native) == len(over_http) == 2
    for a, b in zip(native, over_http, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs["tokens"] == b.logprobs["tokens"]
        torch.testing.assert_close(a.logprobs["token_logprobs"], b.logprobs["token_logprobs"])
        assert a.logprobs["top_logprobs"] == b.logprobs["top_logprobs"]
    with pytest.raises(ConfigError, match="n: streams one sequence"):
        next(iter(remote.stream(PROMPTS[0], n=2)))


def events_after(s: Served, after_seq: int, limit: int = 1000) -> list[dict]:
    """Every event with a higher seq, read page by page (``limit`` each) over HTTP."""
    out = []
    while True:
        page = s.http.get(
            "/api/events", params={"after_seq": after_seq, "limit": limit}, headers=AUTH
        ).json()
        out += page["events"]
        after_seq = page["next"]
        if not page["has_more"]:
            return out


def wait_scale_end(s: Served, ticket: dict, timeout_s: float = 120.0) -> list[dict]:
    """The scale's own events (its scale_id), up to its scale_finished or scale_failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        mine = [
            e for e in events_after(s, ticket["seq"] - 1) if e.get("scale_id") == ticket["scale_id"]
        ]
        if mine and mine[-1]["kind"] in ("scale_finished", "scale_failed"):
            return mine
        time.sleep(0.2)
    raise AssertionError(f"scale {ticket} did not end within {timeout_s}s")


def named_shard_actors() -> set[str]:
    import ray

    from expertmesh.actors import names

    entries = ray.util.list_named_actors(all_namespaces=True)
    return {e["name"] for e in entries if names.shard_id_of(e["name"]) is not None}


def test_scale_shards_two_to_three(served: Served) -> None:
    resp = served.http.put("/api/shards", json={"shards": 3}, headers=AUTH)
    assert resp.status_code == 202, resp.text
    ticket = resp.json()
    assert ticket["scale_id"].startswith("scale-") and (ticket["from"], ticket["to"]) == (2, 3)
    mine = wait_scale_end(served, ticket)
    kinds = [e["kind"] for e in mine]
    assert kinds[0] == "scale_started" and kinds[-1] == "scale_finished", kinds
    assert "shard_started" in kinds and "scaled_out" in kinds  # progress carries the id
    assert len(served.http.get("/api/cluster", headers=AUTH).json()["shards"]) == 3
    after = complete(served, prompt=PROMPTS[0], max_tokens=6, temperature=0, ignore_eos=True)
    assert after.json()["choices"][0]["text"] == oracle(served, PROMPTS[:1], 6)[0]


def test_scale_beyond_what_the_cluster_can_place_is_409_and_starts_nothing(
    served: Served,
) -> None:
    """Issue 23 §3: 1023 shards on a small machine hung and killed the controller."""
    before = named_shard_actors()
    last = served.http.get("/api/events", headers=AUTH).json()["last_seq"]
    resp = served.http.put("/api/shards", json={"shards": 1023}, headers=AUTH)
    assert resp.status_code == 409, resp.text
    err = error_of(resp)
    assert err["param"] == "shards" and "1023 asked" in err["message"]
    assert "the cluster can place at most" in err["message"], err
    assert named_shard_actors() == before
    assert not any(e["kind"] == "scale_started" for e in events_after(served, last))
    assert served.http.get("/api/cluster", headers=AUTH).json()["scale"] is None
    # the SDK gets the same refusal as an exception
    with pytest.raises(expertmesh.CapacityError, match="1023 asked"):
        served.cluster.scale(1023)
    with pytest.raises(expertmesh.ClusterError, match="HTTP 409: shards: 1023"):
        expertmesh.connect(served.url, token=TOKEN).scale(1023)


def test_a_second_scale_while_one_runs_is_409_naming_it(served: Served) -> None:
    shards = len(served.http.get("/api/cluster", headers=AUTH).json()["shards"])
    first = served.http.put("/api/shards", json={"shards": shards - 1}, headers=AUTH).json()
    # NOTE: a scale-in waits for the routers' table refresh (a second) before it stops a shard,
    # so the first scale is still running when this request arrives
    second = served.http.put("/api/shards", json={"shards": shards}, headers=AUTH)
    assert second.status_code == 409, second.text
    assert first["scale_id"] in error_of(second)["message"]
    assert wait_scale_end(served, first)[-1]["kind"] == "scale_finished"
    # the SDK waits for the end and returns the status after it
    remote = expertmesh.connect(served.url, token=TOKEN)
    st = remote.scale(shards)
    assert len(st["shards"]) == shards and st["scale"]["kind"] == "scale_finished"
    ticket = served.cluster.scale(shards, wait=False)
    assert set(ticket) == {"scale_id", "from", "to", "seq"}
    assert wait_scale_end(served, ticket)[-1]["kind"] == "scale_finished"


def test_event_pages_return_every_event_exactly_once(served: Served) -> None:
    whole = events_after(served, 0)
    paged = events_after(served, 0, limit=3)
    assert [e["seq"] for e in paged] == [e["seq"] for e in whole]
    assert [e["seq"] for e in whole] == list(range(whole[0]["seq"], whole[-1]["seq"] + 1))
    assert served.cluster.events() == whole  # the Ray-side SDK reads the same log


def test_the_event_log_survives_a_controller_restart(served: Served) -> None:
    import ray

    from expertmesh.actors import names

    before = events_after(served, 0)
    ray.kill(served.cluster.controller, no_restart=False)  # Ray restarts it (detached)
    deadline = time.monotonic() + 60
    while True:
        after = events_after(served, 0)
        if any(e["kind"] == "controller_restarted" for e in after[len(before) :]):
            break
        assert time.monotonic() < deadline, "no controller_restarted event"
        time.sleep(0.2)
    assert after[: len(before)] == before  # the events from before, in order
    seqs = [e["seq"] for e in after]
    assert seqs == sorted(set(seqs))  # no duplicate seq; numbering went on
    assert served.http.get("/api/cluster", headers=AUTH).json()["model"] == MODEL
    assert ray.get_actor(names.CONTROLLER, namespace=names.NAMESPACE) is not None


# ---------------------------------------------------------------------- errors
def test_missing_and_wrong_token_are_401(served: Served) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/api/cluster")):
            resp = served.http.request(method, path, headers=headers)
            assert resp.status_code == 401
            assert "Authorization: Bearer" in error_of(resp)["message"]
    resp = served.http.post("/v1/completions", json={"prompt": "x"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"


def test_malformed_json_is_400(served: Served) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    resp = served.http.post("/v1/completions", content=b'{"prompt": "x",', headers=headers)
    assert resp.status_code == 400
    assert "not valid JSON" in error_of(resp)["message"]


def test_unknown_model_is_404_naming_the_deployed_one(served: Served) -> None:
    resp = served.http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}, headers=AUTH)
    assert resp.status_code == 404
    err = error_of(resp)
    assert err["param"] == "model" and "gpt-9" in err["message"]
    assert MODEL in err["message"]


def test_prompt_too_long_is_400_naming_the_limit(served: Served) -> None:
    context = served.engine.cfg.max_seq_len
    resp = complete(served, prompt="To be, or not to be " * context, max_tokens=4)
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == "prompt" and f"context of {context} tokens" in err["message"]
    resp = complete(served, prompt=["To be", "To be, or not to be " * context], max_tokens=4)
    assert "prompt[1]" in error_of(resp)["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 7.5),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("max_tokens", "many"),
        ("max_tokens", 2.5),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", 3),
        ("prompt", 42),
        ("prompt", []),
        ("stream", "yes"),
        ("seed", "x"),
        ("n", 1.5),
        ("n", 17),
        ("best_of", 0),
        ("logprobs", 21),
        ("presence_penalty", 2.5),
        ("repetition_penalty", 0),
        ("frobnicate", 1),  # unknown: refused, not ignored
    ],
)
def test_invalid_parameters_are_400_naming_the_field(
    served: Served, field: str, value: object
) -> None:
    body = {"prompt": "hello", "max_tokens": 4, field: value}
    resp = served.http.post("/v1/completions", json=body, headers=AUTH)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["param"] == field and err["message"].startswith(field), err
    assert err["type"] == "invalid_request_error"


def test_integral_floats_are_integers_as_the_schema_says(served: Served) -> None:
    """JSON Schema's integer includes 1.0; the validation agrees (issue 23 §2)."""
    resp = complete(served, prompt=PROMPTS[0], max_tokens=3.0, n=1.0, ignore_eos=True)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3


def test_best_of_below_n_is_400_naming_best_of(served: Served) -> None:
    resp = complete(served, prompt="hello", max_tokens=2, n=3, best_of=2)
    assert resp.status_code == 400 and error_of(resp)["param"] == "best_of"


def test_chat_without_a_template_is_400(served: Served) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    resp = served.http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["param"] == "messages" and "no chat template" in err["message"]


def test_unknown_query_parameter_is_400_naming_it(served: Served) -> None:
    resp = served.http.get("/api/events", params={"since": 0, "until": 5}, headers=AUTH)
    assert resp.status_code == 400 and error_of(resp)["param"] == "until"


def test_invalid_scale_and_events_params_are_400(served: Served) -> None:
    resp = served.http.put("/api/shards", json={"shards": 0}, headers=AUTH)
    assert resp.status_code == 400 and error_of(resp)["param"] == "shards"
    resp = served.http.get("/api/events", params={"since": "yesterday"}, headers=AUTH)
    assert resp.status_code == 400 and error_of(resp)["param"] == "since"
    for params, param in (
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"after_seq": -1}, "after_seq"),
    ):
        resp = served.http.get("/api/events", params=params, headers=AUTH)
        assert resp.status_code == 400 and error_of(resp)["param"] == param, resp.text


def test_oversized_body_is_413(served: Served) -> None:
    big = {"prompt": "x" * (1024 * 1024 + 10)}
    resp = served.http.post("/v1/completions", json=big, headers=AUTH)
    assert resp.status_code == 413
    assert "1048576 bytes" in error_of(resp)["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes themselves are counted
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 32768
        yield b'"}'

    resp = served.http.post("/v1/completions", content=chunks(), headers=AUTH)
    assert resp.status_code == 413
    assert "limit is 1048576 bytes" in error_of(resp)["message"]


def test_unknown_route_is_json_404(served: Served) -> None:
    resp = served.http.get("/v2/nothing", headers=AUTH)
    assert resp.status_code == 404 and "/v1/completions" in error_of(resp)["message"]


def test_client_disconnect_stops_the_stream(served: Served) -> None:
    def router_stats() -> dict:
        return served.http.get("/api/cluster", headers=AUTH).json()["router"]

    before = router_stats()["tokens_generated"]
    body = {"prompt": PROMPTS[0], "max_tokens": 200, "stream": True, "ignore_eos": True}
    with served.http.stream("POST", "/v1/completions", json=body, headers=AUTH) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: {")  # the first token is out; now hang up
    deadline = time.monotonic() + 10.0
    while router_stats()["running"]:
        assert time.monotonic() < deadline, "the router kept generating for a gone client"
        time.sleep(0.1)
    # streamed token by token (not buffered to the end) and cancelled: far fewer than 200
    assert router_stats()["tokens_generated"] - before < 100


def test_client_disconnect_stops_a_non_streamed_completion(served: Served) -> None:
    """Serve cancels the handler of a gone client; the API then cancels the request in the
    router, which stops it at the end of the step that runs (tests/integration/test_api_load.py
    counts the steps)."""

    def router_stats() -> dict:
        return served.http.get("/api/cluster", headers=AUTH).json()["router"]

    before = router_stats()["tokens_generated"]
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 240, "ignore_eos": True}
    with unread_request(served.url, TOKEN, "/v1/completions", body):
        deadline = time.monotonic() + 10.0
        while not router_stats()["running"]:  # generating now; then hang up
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    deadline = time.monotonic() + 10.0
    while router_stats()["running"]:
        assert time.monotonic() < deadline, "the router kept generating for a gone client"
        time.sleep(0.1)
    after = router_stats()
    assert after["tokens_generated"] - before < 200
    assert after["cancelled"] >= 1 and after["cancel_overrun_tokens"] <= 1


# NOTE: keep last: it tears the deployment down (the API itself stays up).
def test_without_a_deployment_requests_get_503(served: Served) -> None:
    served.cluster.controller.shutdown.remote()
    deadline = time.monotonic() + 30
    while served.http.get("/api/health").json()["model_ready"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    resp = complete(served, prompt="hello")
    assert resp.status_code == 503
    assert "expertmesh up --model" in error_of(resp)["message"]
    resp = served.http.put("/api/shards", json={"shards": 2}, headers=AUTH)
    assert resp.status_code == 503 and "deploy" in error_of(resp)["message"]
    assert served.http.get("/v1/models", headers=AUTH).json()["data"] == []
