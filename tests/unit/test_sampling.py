"""The sampling step against direct computations: vLLM's penalties written out token by token,
logprobs from a plain forward pass of the whole text (no KV cache, no engine), best_of ranking.

Tolerances: logits are float32; the engine's cached, batched forward and the plain forward of
the full sequence sum in different orders, so logprobs agree to ~1e-5 (asserted at 1e-4)."""

from __future__ import annotations

import pytest
import torch

from expertmesh.platform.engine import Engine
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.sampling import Row, SamplingParams, apply_penalties, sample_step
from tests.integration.helpers import PROMPTS

TOL = {"atol": 1e-4, "rtol": 1e-4}


def penalties_by_hand(logits: list[float], p: SamplingParams, prompt: list[int], out: list[int]):
    """vLLM's documented rules, one token at a time."""
    got = list(logits)
    for t in range(len(got)):
        if t in prompt or t in out:
            rp = p.repetition_penalty
            got[t] = got[t] / rp if got[t] > 0 else got[t] * rp
        count = out.count(t)
        got[t] -= p.frequency_penalty * count
        got[t] -= p.presence_penalty * (1 if count else 0)
    return torch.tensor(got)


@pytest.mark.parametrize(
    "pres,freq,rep", [(0.5, 0.0, 1.0), (0.0, 0.7, 1.0), (0.0, 0.0, 1.3), (-0.4, 0.9, 0.8)]
)
def test_penalties_match_vllm_rules(pres: float, freq: float, rep: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, generator=g)
    prompt, out = [3, 7, 7, 11], [7, 20, 20, 20, 41]
    p = SamplingParams(presence_penalty=pres, frequency_penalty=freq, repetition_penalty=rep)
    want = penalties_by_hand(logits.tolist(), p, prompt, out)
    torch.testing.assert_close(apply_penalties(logits, p, prompt, out), want, **TOL)


def test_greedy_pick_follows_penalised_logits_and_logprobs_stay_raw() -> None:
    logits_BV = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    p = SamplingParams(frequency_penalty=1.0, logprobs=2)
    picked = sample_step(logits_BV, [Row(params=p, prompt_ids=[0], output_ids=[1])])
    assert picked.token_B.tolist() == [2]  # token 1 lost 1.0 to its earlier occurrence
    raw = logits_BV[0].log_softmax(-1)
    assert picked.logprob[0] == pytest.approx(float(raw[2]), abs=1e-6)
    (top,) = picked.top
    assert [t for t, _ in top] == [1, 2]  # the model's own ranking, penalties aside
    torch.testing.assert_close(torch.tensor([lp for _, lp in top]), raw[[1, 2]], **TOL)


def test_rows_without_logprobs_cost_none() -> None:
    picked = sample_step(
        torch.randn(2, 9), [Row(params=SamplingParams(), prompt_ids=[1], output_ids=[])] * 2
    )
    assert picked.logprob == [None, None] and picked.top == [None, None]


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) from one plain forward pass over the whole sequence."""
    with torch.no_grad():
        logits_TV = model(torch.tensor([ids])).logits[0].float()
    return logits_TV[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_output_and_prompt_logprobs_match_a_plain_forward(model_and_tok) -> None:
    model, tok = model_and_tok
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    seqs = Engine(model, tok, max_batch=4).generate(PROMPTS[:3], params)
    for s in seqs:
        whole = full_logprobs(model, s.prompt_ids + s.output_ids)
        n = len(s.prompt_ids) - 1
        torch.testing.assert_close(torch.tensor(s.prompt_logprobs), whole[:n], **TOL)
        torch.testing.assert_close(torch.tensor(s.logprobs), whole[n:], **TOL)
        assert s.cumulative_logprob == pytest.approx(float(whole[n:].sum()), abs=1e-3)
        assert len(s.top_logprobs) == len(s.output_ids)
        assert all(len(top) == 3 for top in s.top_logprobs + s.prompt_top_logprobs)
        # greedy: the chosen token is the most likely one
        assert [top[0][0] for top in s.top_logprobs] == s.output_ids


def test_penalty_changes_greedy_output_as_applied_by_hand(model_and_tok) -> None:
    """The engine with a repetition penalty equals greedy decoding on hand-penalised logits."""
    model, tok = model_and_tok
    params = SamplingParams(
        max_tokens=24, ignore_eos=True, repetition_penalty=2.0, frequency_penalty=1.5
    )
    (seq,) = Engine(model, tok).generate([PROMPTS[0]], params)
    ids = list(seq.prompt_ids)
    for _ in range(24):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        out = ids[len(seq.prompt_ids) :]
        ids.append(int(penalties_by_hand(logits.tolist(), params, seq.prompt_ids, out).argmax()))
    assert seq.output_ids == ids[len(seq.prompt_ids) :]
    (plain,) = Engine(model, tok).generate(
        [PROMPTS[0]], SamplingParams(max_tokens=24, ignore_eos=True)
    )
    assert plain.output_ids != seq.output_ids  # the penalty did something on this prompt


def test_best_of_returns_the_n_most_likely_candidates(model_and_tok) -> None:
    model, tok = model_and_tok
    base = {"max_tokens": 6, "ignore_eos": True, "temperature": 1.0, "seed": 5}
    everyone = Engine(model, tok).generate(["To be"], SamplingParams(n=4, logprobs=0, **base))
    assert len({tuple(s.output_ids) for s in everyone}) > 1  # seeds per candidate differ
    best = Engine(model, tok).generate(["To be"], SamplingParams(n=2, best_of=4, **base))
    ranked = sorted(everyone, key=lambda s: s.cumulative_logprob, reverse=True)
    assert [s.output_ids for s in best] == [s.output_ids for s in ranked[:2]]
    for s in best:  # the ranking used the true sequence logprob
        whole = full_logprobs(model, s.prompt_ids + s.output_ids)
        assert s.cumulative_logprob == pytest.approx(
            float(whole[len(s.prompt_ids) - 1 :].sum()), abs=1e-3
        )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n": 0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_out_of_range_values_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


def test_a_tiny_temperature_samples_the_top_token() -> None:
    """1e-300 is a valid temperature; the draw must not see inf/NaN probabilities (found by
    the schema fuzzer: tests/integration/test_api_schema.py)."""
    logits_BV = torch.tensor([[0.5, 2.0, 1.0]])
    p = SamplingParams(temperature=1e-300)
    g = torch.Generator().manual_seed(0)
    picked = sample_step(logits_BV, [Row(params=p, prompt_ids=[0], output_ids=[], generator=g)])
    assert picked.token_B.tolist() == [1]


def test_a_tiny_repetition_penalty_keeps_the_draw_finite() -> None:
    p = SamplingParams(temperature=1.0, repetition_penalty=1e-300)
    g = torch.Generator().manual_seed(0)
    row = Row(params=p, prompt_ids=[1], output_ids=[], generator=g)
    picked = sample_step(torch.tensor([[0.5, 2.0, 1.0]]), [row])
    assert picked.token_B.tolist() == [1]  # its logit is now the largest by far


def test_a_near_max_logit_over_a_small_temperature_keeps_the_draw_finite() -> None:
    """Found by the schema fuzzer (a 500 from the API): a top_p of 1e-90 is 0 in float32, and
    a logit near float32's max (penalties can make one) over a temperature of 6e-4 is inf."""
    big = torch.finfo(torch.float32).max / 2
    p = SamplingParams(temperature=6e-4, top_p=1e-90)
    g = torch.Generator().manual_seed(0)
    row = Row(params=p, prompt_ids=[0], output_ids=[], generator=g)
    picked = sample_step(torch.tensor([[0.5, big, -big]]), [row])
    assert picked.token_B.tolist() == [1]
