"""Aggregation math of the federation's strategies, the round policies: pure, no cluster.

Tolerances: the aggregation runs in float64 and returns float32; 1e-6 relative is far above
its rounding and far below any wrong weight (weights here differ by factors of 2 or more).
"""

from __future__ import annotations

import pytest
import torch

from expertmesh.platform.errors import ConfigError
from expertmesh.platform.federated.rounds import QuorumError, close_round, participants
from expertmesh.platform.federated.strategy import (
    ClientSpec,
    ClientUpdate,
    FedAvg,
    Flame,
    make_strategy,
)

TOL = {"rtol": 1e-6, "atol": 1e-7}
E, R, D = 4, 2, 3


def global_adapters() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        (0, "a1"): torch.randn(E, R, D, generator=gen),
        (0, "b1"): torch.randn(E, D, R, generator=gen),
        (1, "a1"): torch.randn(E, R, D, generator=gen),
    }


def update(client: str, n_tokens: int, counts: dict[int, list[int]], seed: int) -> ClientUpdate:
    gen = torch.Generator().manual_seed(seed)
    delta = {key: torch.randn(t.shape, generator=gen) for key, t in global_adapters().items()}
    # a client's unactivated experts come back unchanged (no gradient, no weight decay)
    for (layer, _name), t in delta.items():
        t[torch.tensor(counts[layer]) == 0] = 0
    return ClientUpdate(
        client=client,
        server_round=1,
        delta=delta,
        counts={layer: torch.tensor(c) for layer, c in counts.items()},
        tokens_seen=100,
        n_tokens=n_tokens,
        loss=1.0,
        scale=1.0,
        k=1,
    )


RESULTS = [
    update("a", 300, {0: [100, 0, 0, 0], 1: [50, 50, 0, 0]}, seed=1),
    update("b", 100, {0: [20, 80, 0, 0], 1: [0, 100, 0, 0]}, seed=2),
    update("c", 600, {0: [0, 50, 50, 0], 1: [25, 25, 25, 25]}, seed=3),
]


def test_flame_at_t_zero_is_fedavg() -> None:
    g = global_adapters()
    fedavg = FedAvg().aggregate_train(1, g, RESULTS).adapters
    flame0 = Flame(t=0.0).aggregate_train(1, g, RESULTS).adapters
    for key in g:
        torch.testing.assert_close(flame0[key], fedavg[key], **TOL)


def test_fedavg_weighs_by_data_size() -> None:
    g = global_adapters()
    new = FedAvg().aggregate_train(1, g, RESULTS).adapters
    sizes = torch.tensor([300.0, 100.0, 600.0])
    for key in g:
        want = g[key] + sum(w * r.delta[key] for w, r in zip(sizes, RESULTS, strict=True)) / 1000
        torch.testing.assert_close(new[key], want, **TOL)


def test_an_expert_no_client_activated_stays_unchanged() -> None:
    g = global_adapters()
    for strategy in (FedAvg(), Flame(t=1.0), Flame(t=2.0)):
        new = strategy.aggregate_train(1, g, RESULTS).adapters
        for name in ("a1", "b1"):  # expert 3 of layer 0: nobody chose it
            assert torch.equal(new[(0, name)][3], g[(0, name)][3]), strategy


def test_flame_weights_follow_activation_counts() -> None:
    g = global_adapters()
    t = 1.0
    new = Flame(t=t).aggregate_train(1, g, RESULTS).adapters
    key = (0, "a1")
    # expert 1 of layer 0: f = 0, 0.8, 0.5 for a, b, c; weight f * |D| = 0, 80, 300
    want_1 = g[key][1] + (80 * RESULTS[1].delta[key][1] + 300 * RESULTS[2].delta[key][1]) / 380
    torch.testing.assert_close(new[key][1], want_1, **TOL)
    # expert 0 of layer 0: a (f=1, 300) and b (f=0.2, 100 -> 20); c never picked it
    want_0 = g[key][0] + (300 * RESULTS[0].delta[key][0] + 20 * RESULTS[1].delta[key][0]) / 320
    torch.testing.assert_close(new[key][0], want_0, **TOL)
    # FedAvg dilutes the same expert with the unchanged copy of the client that never used it
    fedavg_0 = FedAvg().aggregate_train(1, g, RESULTS).adapters[key][0]
    assert not torch.allclose(fedavg_0, want_0)


def test_a_higher_t_favours_the_client_that_used_an_expert_most() -> None:
    g = global_adapters()
    key = (1, "a1")  # expert 1 of layer 1: f = 0.5, 1.0, 0.25; |D| = 300, 100, 600
    shares = []
    for t in (0.0, 1.0, 4.0):
        new = Flame(t=t).aggregate_train(1, g, RESULTS).adapters[key][1]
        # the weight on b's delta, recovered by projecting (deltas are random, independent)
        w = torch.stack([r.delta[key][1].flatten() for r in RESULTS], dim=1)
        shares.append(torch.linalg.lstsq(w, (new - g[key][1]).flatten()[:, None]).solution[1])
    assert shares[0] < shares[1] < shares[2]


def test_configure_train_sends_each_client_its_budget_and_scale() -> None:
    g = global_adapters()
    clients = [ClientSpec(name="a", k=1, n_tokens=10), ClientSpec(name="b", k=4, n_tokens=20)]
    out = Flame(local_steps=3).configure_train(2, g, clients, {"a": 1.5})
    assert [(i.client, i.k, i.scale, i.local_steps) for i in out] == [
        ("a", 1, 1.5, 3),
        ("b", 4, 1.0, 3),
    ]
    assert out[0].seed != out[1].seed and out[0].adapters is g


def test_strategy_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^t: "):
        Flame(t=-1)
    with pytest.raises(ConfigError, match=r"^strategy: "):
        make_strategy("fedprox")
    with pytest.raises(ConfigError, match=r"^local_steps: "):
        FedAvg(local_steps=0)


def test_a_round_counts_with_a_quorum_and_names_the_missing() -> None:
    out = close_round(3, reported=["a", "c"], dead=["b"], late=["d"], min_clients=2)
    assert out.dropped == ["b", "d"]
    with pytest.raises(QuorumError, match=r"round 3: 1 of the 2 clients.*dead \['b'\]"):
        close_round(3, reported=["a"], dead=["b"], min_clients=2)


def test_a_busy_straggler_sits_out() -> None:
    assert participants(["a", "b", "c"], {"b"}) == (["a", "c"], ["b"])
