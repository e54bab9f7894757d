"""Admission control and cancellation over real HTTP on a real local Ray cluster.

The deployment is small on purpose: 2 running slots (``max_batch``) and 2 queued
(``max_queued``), 4 requests in flight per token. Long requests (16,000 tokens, EOS ignored)
hold the slots while the test looks; they are sent on raw sockets and hung up on, which is how
the test also checks that a gone client's generation stops.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import expertmesh
from tests.integration.helpers import api_cluster, tiny_checkpoint, unread_request

pytestmark = pytest.mark.integration

TOKEN = "load-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BATCH, MAX_QUEUED, PER_TOKEN = 2, 2, 4
# NOTE: far longer than any check takes: 2,000 tokens ran out mid-test on a loaded machine
LONG = {"prompt": "To be, or not", "max_tokens": 16_000, "ignore_eos": True}
SHORT = {"prompt": "def main(argv):", "max_tokens": 4, "ignore_eos": True}


@dataclass
class Load:
    cluster: expertmesh.Cluster
    url: str
    http: httpx.Client

    def router(self) -> dict:
        return self.http.get("/api/cluster", headers=AUTH).json()["router"]

    def wait_router(self, what: str, ok, timeout: float = 60.0) -> dict:
        """The router's stats once ``ok(stats)``; bounded, as every wait here."""
        deadline = time.monotonic() + timeout
        while not ok(stats := self.router()):
            assert time.monotonic() < deadline, f"{what}: {stats}"
            time.sleep(0.05)
        return stats

    @contextlib.contextmanager
    def holding(self, count: int) -> Iterator[None]:
        """``count`` long requests in the router (running or queued) until the block ends,
        when their clients hang up."""
        with contextlib.ExitStack() as stack:
            held = self.router()["in_flight"]
            for _ in range(count):
                stack.enter_context(unread_request(self.url, TOKEN, "/v1/completions", LONG))
            self.wait_router("long requests admitted", lambda r: r["in_flight"] == held + count)
            yield


@pytest.fixture(scope="module")
def load(state_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Load]:
    # a context long enough that the held requests outlast every check made while they run
    uri = tiny_checkpoint(tmp_path_factory.mktemp("load-model"), max_seq_len=16_384)
    with (
        api_cluster(
            uri,
            TOKEN,
            prefix="emload-",
            deploy={"max_batch": MAX_BATCH, "max_queued": MAX_QUEUED},
            serve={"max_concurrent_per_token": PER_TOKEN},
        ) as (cluster, url),
        httpx.Client(base_url=url, timeout=60.0) as http,
    ):
        yield Load(cluster=cluster, url=url, http=http)


def complete(load: Load, **body: object) -> httpx.Response:
    return load.http.post("/v1/completions", json=body, headers=AUTH)


def assert_429(resp: httpx.Response, mentions: str) -> None:
    assert resp.status_code == 429, resp.text
    retry_after = resp.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    err = resp.json()["error"]
    assert err["type"] == "rate_limit_exceeded" and err["code"] == 429
    assert mentions in err["message"], err


def test_a_full_queue_answers_429_at_once_and_hung_up_requests_stop(load: Load) -> None:
    before = load.router()
    with load.holding(3):  # 2 running, 1 queued: room for one more sequence
        mid = load.router()
        assert mid["running"] == MAX_BATCH and mid["waiting"] == 1
        # two sequences do not fit, whole or streamed: 429 before any token
        assert_429(complete(load, **SHORT, n=2), "max_queued")
        stream = complete(load, **SHORT, n=2, stream=True)
        assert stream.headers["content-type"].startswith("application/json")
        assert_429(stream, "max_queued")
        # the in-process SDK gets the same refusal as a typed error
        with pytest.raises(expertmesh.Overloaded) as refused:
            load.cluster.generate(["To be", "def main("], max_tokens=4)
        assert refused.value.retry_after >= 1
        # the stream's and the SDK's first choice fitted, were queued, and went with the
        # refusal of their second
        load.wait_router("refused requests leave", lambda r: r["in_flight"] == 3)
        assert load.router()["rejected"] - before["rejected"] == 3
    # the clients hung up: every held sequence stops within one step of its cancel
    stopped = load.wait_router("hung-up requests stop", lambda r: r["in_flight"] == 0)
    stopped = load.wait_router("slots free", lambda r: r["running"] == r["waiting"] == 0)
    assert stopped["cancelled"] - before["cancelled"] == 3 + 2
    assert stopped["cancel_overrun_tokens"] <= 1
    # nothing generates for them any more: the next request's tokens are all that is added
    ok = complete(load, **SHORT)  # the queue is empty again: admitted
    assert ok.status_code == 200, ok.text
    after = load.router()
    assert after["tokens_generated"] - stopped["tokens_generated"] == SHORT["max_tokens"]


def test_concurrent_clients_beyond_the_limits_get_429_none_hangs(load: Load) -> None:
    """More concurrent requests than slots + queue (and than the token may run): the excess
    is refused at once with Retry-After, the rest served; every response comes."""
    before = load.router()
    body = {**SHORT, "max_tokens": 400}
    with ThreadPoolExecutor(8) as pool:
        resps = list(pool.map(lambda _: complete(load, **body), range(8)))
    codes = sorted(r.status_code for r in resps)
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= 1 and codes.count(429) >= 8 - MAX_BATCH - MAX_QUEUED
    for r in resps:
        if r.status_code == 429:
            assert r.headers["retry-after"].isdigit()
        else:
            assert r.json()["usage"]["completion_tokens"] == 400
    after = load.wait_router("queue drains", lambda r: r["in_flight"] == 0)
    assert after["cancelled"] == before["cancelled"]


def test_a_token_over_its_concurrency_limit_gets_429(load: Load) -> None:
    before = load.router()
    with load.holding(PER_TOKEN):  # also fills the router (2 + 2)
        resp = complete(load, **SHORT)
        assert_429(resp, "max_concurrent_per_token")
        over_http = expertmesh.connect(load.url, token=TOKEN)
        with pytest.raises(expertmesh.Overloaded) as refused:
            over_http.generate("To be", max_tokens=2)
        assert refused.value.retry_after == 1
        # refused by the API before the router saw it
        assert load.router()["rejected"] == before["rejected"]
    load.wait_router("queue drains", lambda r: r["in_flight"] == 0)
    # the token's slots came back with the responses
    assert complete(load, **SHORT).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 3, "best_of": 5}, "best_of"),
        ({"n": 5, "stream": True}, "n"),  # a stream's choices are counted together
        ({"prompt": ["To be", "def main(", "for line"], "n": 2}, "prompt"),
    ],
)
def test_more_sequences_than_the_deployment_holds_is_400(
    load: Load, body: dict, param: str
) -> None:
    """A request that could never fit is refused as such, not told to retry."""
    resp = complete(load, **(SHORT | body))
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and "holds at most 4 at once" in err["message"], err
    assert load.wait_router("nothing left", lambda r: r["in_flight"] == 0)


def test_closing_an_sdk_stream_stops_its_generation(load: Load) -> None:
    before = load.router()
    pieces = load.cluster.stream("To be, or not", max_tokens=2000, ignore_eos=True)
    next(pieces)
    pieces.close()
    stopped = load.wait_router("closed stream stops", lambda r: r["in_flight"] == 0)
    assert stopped["cancelled"] == before["cancelled"] + 1
    assert stopped["cancel_overrun_tokens"] <= 1


def test_a_hung_up_stream_stops(load: Load) -> None:
    before = load.router()
    body = {**LONG, "stream": True}
    with unread_request(load.url, TOKEN, "/v1/completions", body):
        load.wait_router("stream admitted", lambda r: r["in_flight"] == 1)
    stopped = load.wait_router("hung-up stream stops", lambda r: r["in_flight"] == 0)
    assert stopped["cancelled"] == before["cancelled"] + 1
    assert stopped["cancel_overrun_tokens"] <= 1
