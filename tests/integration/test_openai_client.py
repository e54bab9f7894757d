"""The official ``openai`` client against a live local cluster (issue 23 §1): n, best_of,
logprobs, echo, the penalties and chat completions, checked against the in-process engine and a
plain forward pass of the same checkpoint (no Ray, no HTTP)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

from expertmesh.platform import chat
from expertmesh.platform.engine import Engine
from expertmesh.platform.loader import load_for_inference
from expertmesh.platform.model import MoETransformer
from expertmesh.platform.sampling import SamplingParams
from tests.integration.helpers import PROMPTS, api_cluster, tiny_checkpoint

pytestmark = pytest.mark.integration

TOKEN = "openai-client-token-0123"
MODEL = "v1"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@dataclass
class Live:
    client: openai.OpenAI
    url: str
    model: MoETransformer
    engine: Engine


@pytest.fixture(scope="module")
def live(state_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One local Ray cluster for the module (2 shards), serving a model with a chat template."""
    uri = tiny_checkpoint(
        tmp_path_factory.mktemp("openai-model"), chat_template=chat.template_named("plain")
    )
    model, tok = load_for_inference(uri)
    with api_cluster(uri, TOKEN, prefix="emoai-") as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
        yield Live(client=client, url=url, model=model, engine=Engine(model, tok))


def plain_logprobs(model: MoETransformer, ids: list[int]) -> list[float]:
    """log p(ids[t+1] | ids[:t+1]) from one plain forward pass over the whole text."""
    with torch.no_grad():
        logits_TV = model(torch.tensor([ids])).logits[0].float()
    lp_TV = logits_TV[:-1].log_softmax(-1)
    return lp_TV.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def engine_text(live: Live, prompt: str, **params: object) -> str:
    (seq,) = live.engine.generate([prompt], SamplingParams(ignore_eos=True, **params))
    return seq.text


# ---------------------------------------------------------------------- completions
def test_n_choices_are_distinct_and_repeat_with_a_seed(live: Live) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "n": 3, "seed": 11}
    first = live.client.completions.create(temperature=1.0, **kwargs)
    again = live.client.completions.create(temperature=1.0, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1  # each choice draws from its own generator
    assert [c.text for c in again.choices] == texts
    # choice j is the engine's candidate j (seed + j)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=3)
    assert [s.text for s in live.engine.generate([PROMPTS[0]], params)] == texts
    assert first.usage.completion_tokens == sum(
        len(s.output_ids) for s in live.engine.generate([PROMPTS[0]], params)
    )


def test_list_prompt_with_n_numbers_choices_prompt_major(live: Live) -> None:
    out = live.client.completions.create(
        model=MODEL, prompt=PROMPTS[:2], max_tokens=4, n=2, **GREEDY
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    greedy = [engine_text(live, p, max_tokens=4) for p in PROMPTS[:2]]
    assert [c.text for c in out.choices] == [greedy[0], greedy[0], greedy[1], greedy[1]]


def test_best_of_returns_the_most_likely_candidates(live: Live) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 1.0}
    everyone = live.client.completions.create(n=4, seed=3, logprobs=0, **kwargs)
    best = live.client.completions.create(n=2, best_of=4, seed=3, logprobs=0, **kwargs)
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in everyone.choices}
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert [c.text for c in best.choices] == ranked[:2]
    assert len({c.text for c in everyone.choices}) > 2  # the ranking had something to do


def test_logprobs_match_a_plain_forward_pass(live: Live) -> None:
    prompt = PROMPTS[2]
    out = live.client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        logprobs=3,
        temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    (choice,) = out.choices
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert [
        choice.text[o : o + len(t)] for o, t in zip(lp.text_offset, lp.tokens, strict=True)
    ] == lp.tokens
    # (up to) 3 alternatives: tokens that decode to the same text share a key, as in vLLM
    assert all(0 < len(top) <= 3 for top in lp.top_logprobs)
    # greedy: each chosen token is the top alternative, with the same logprob
    assert [max(top.values()) for top in lp.top_logprobs] == pytest.approx(lp.token_logprobs)
    assert all(t in top for t, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    ids = live.engine.encode(prompt) + choice.model_extra["token_ids"]
    want = plain_logprobs(live.model, ids)[-6:]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)  # float32, other summation order


def test_echo_prepends_the_prompt_and_scores_it(live: Live) -> None:
    prompt = PROMPTS[3]
    out = live.client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=3,
        echo=True,
        logprobs=1,
        temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    (choice,) = out.choices
    assert choice.text == prompt + engine_text(live, prompt, max_tokens=3)
    lp = choice.logprobs
    n_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before it
    ids = live.engine.encode(prompt) + choice.model_extra["token_ids"]
    assert lp.token_logprobs[1:] == pytest.approx(plain_logprobs(live.model, ids), abs=1e-4)


def test_penalties_change_the_output_as_the_engine_does(live: Live) -> None:
    prompt, n = PROMPTS[0], 24
    plain = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, **GREEDY)
    for field, value in (
        ("frequency_penalty", 2.0),
        ("presence_penalty", 2.0),
        ("repetition_penalty", 2.0),
    ):
        extra = {"ignore_eos": True} | ({field: value} if field == "repetition_penalty" else {})
        kwargs = {} if field == "repetition_penalty" else {field: value}
        out = live.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, temperature=0.0, extra_body=extra, **kwargs
        )
        want = engine_text(live, prompt, max_tokens=n, **{field: value})
        assert out.choices[0].text == want, field
    assert want != plain.choices[0].text  # at least the repetition penalty changed something


def test_streamed_n_choices_add_up_to_the_whole_ones(live: Live) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 5, "n": 2, "seed": 2}
    whole = live.client.completions.create(temperature=1.0, **kwargs)
    texts = {0: "", 1: ""}
    finished = {}
    for chunk in live.client.completions.create(temperature=1.0, stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert set(finished) == {0, 1}


def test_unknown_field_is_400_naming_it(live: Live) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        live.client.completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_body={"guided_json": {}}
        )
    assert err.value.status_code == 400
    assert err.value.body["param"] == "guided_json"
    assert "unknown field" in err.value.body["message"]


# ---------------------------------------------------------------------- chat
MESSAGES = [
    {"role": "system", "content": "Answer in verse."},
    {"role": "user", "content": "To be, or not"},
]


def test_chat_completion_is_the_template_prompt_completed(live: Live) -> None:
    out = live.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2, **GREEDY
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    prompt = chat.render(chat.template_named("plain"), MESSAGES)
    assert prompt.endswith("assistant:")
    assert choice.message.content == engine_text(live, prompt, max_tokens=8)
    assert out.usage.prompt_tokens == len(live.engine.encode(prompt))
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    assert all(math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-6) for t in tokens)


def test_streamed_chat_sends_role_then_deltas(live: Live) -> None:
    whole = live.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, **GREEDY
    )
    chunks = list(
        live.client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_default_max_tokens_fills_the_context(live: Live) -> None:
    out = live.client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    context = live.model.cfg.max_seq_len
    assert out.usage.total_tokens == context and out.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------- schema
def test_openapi_schema_and_docs_need_no_token(live: Live) -> None:
    schema = httpx.get(f"{live.url}/openapi.json", timeout=30).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "422" not in schema["paths"]["/v1/completions"]["post"]["responses"]
    docs = httpx.get(f"{live.url}/docs", timeout=30)
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    # the routes themselves still need it
    assert httpx.get(f"{live.url}/v1/models", timeout=30).status_code == 401
