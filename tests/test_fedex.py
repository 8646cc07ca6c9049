"""FedEx (Khodak et al. 2021): the policy update against hand-worked values and an independent
replay of FederatedScope's rule, the options, the per-client instructions, and the client's
before/after validation losses on a tiny model."""

import math

import numpy as np
import pytest

from fedtune.algorithms import RoundContext, Update, get_algorithm
from fedtune.algorithms.fedex import FedExPolicy, discounted_mean
from fedtune.errors import FedtuneError


def test_fixture_two_arms_first_round():
    """2 arms, θ = (½, ½); one client on arm 0, weight 1, after-loss 1.0, baseline 0, η₀ = √(2 ln 2),
    schedule auto: g = (1 − 0)/½ = 2 on arm 0, η = η₀/√1, z₀ = −ln 2 − 2η₀ → θ = (0.086683, 0.913317)."""
    p = FedExPolicy([2], schedule="auto")
    assert p.eta0_of(0) == pytest.approx(math.sqrt(2 * math.log(2)))
    p.update([[0]], before=[3.0], after=[1.0], sizes=[1.0])
    np.testing.assert_allclose(p.theta[0], [0.086683, 0.913317], atol=1e-6)
    # the same by hand
    z = np.array([-math.log(2) - 2 * math.sqrt(2 * math.log(2)), -math.log(2)])
    np.testing.assert_allclose(p.theta[0], np.exp(z) / np.exp(z).sum(), rtol=1e-12)


def _replay(rounds, n, gamma, diff, sched, eta0=None):
    """An independent replay of FederatedScope's update_policy (one flat dimension)."""
    z = np.full(n, -np.log(n))
    store, glob, refine = 0.0, [], []
    eta0 = np.sqrt(2 * np.log(n)) if eta0 is None else eta0
    for arms, before, after, sizes in rounds:
        w = np.asarray(sizes, float) / np.sum(sizes)
        if refine:
            tr = np.array(refine) - (np.array(glob) if diff else 0)
            weights = gamma ** np.arange(len(tr))[::-1]
            b = np.dot(tr, weights) / weights.sum()
        else:
            b = 0.0
        glob.append(np.dot(before, w))
        refine.append(np.dot(after, w))
        s = np.asarray(after) - np.asarray(before) if diff else np.asarray(after)
        theta = np.exp(z)
        g = np.zeros(n)
        for a, si, wi in zip(arms, s, w):
            g[a] += wi * (si - b) / theta[a]
        if sched == "auto":
            store += 1
            denom = np.sqrt(store)
        elif sched == "adaptive":
            store += np.abs(g).max() ** 2
            denom = np.sqrt(store)
        elif sched == "aggressive":
            denom = 1.0 if not g.any() else np.abs(g).max()
        else:
            denom = 1.0
        z = z - eta0 / denom * g
        z = z - np.log(np.exp(z).sum())
    return np.exp(z)


@pytest.mark.parametrize("sched", ["auto", "adaptive", "aggressive", "constant"])
@pytest.mark.parametrize("gamma,diff", [(0.0, False), (0.5, True), (1.0, False)])
def test_policy_matches_a_replay_of_federatedscope(sched, gamma, diff):
    rng = np.random.default_rng(0)
    rounds = []
    for _ in range(4):
        k = 3
        rounds.append(([int(a) for a in rng.integers(0, 3, k)], list(rng.uniform(0.2, 0.4, k)),
                       list(rng.uniform(0.1, 0.4, k)), list(rng.integers(1, 9, k).astype(float))))
    p = FedExPolicy([3], gamma=gamma, diff=diff, schedule=sched)
    for arms, b, a, v in rounds:
        p.update([[x] for x in arms], b, a, v)
    want = _replay(rounds, 3, gamma, diff, sched)
    assert np.all(np.isfinite(want)) and not np.allclose(want, 1 / 3)
    np.testing.assert_allclose(p.theta[0], want, rtol=1e-10)


def test_discounted_mean():
    assert discounted_mean([1.0, 3.0], 0.0) == 3.0  # the newest only
    assert discounted_mean([1.0, 3.0], 1.0) == 2.0  # the plain mean
    assert discounted_mean([1.0, 3.0], 0.5) == pytest.approx((0.5 + 3) / 1.5)


def test_cutoff_stops_exploration_on_the_argmax():
    p = FedExPolicy([2], cutoff=0.5)
    p.update([[0]], [3.0], [1.0], [1.0])  # entropy of (0.087, 0.913) = 0.296 < 0.5
    assert p.stopped and p.argmax() == [1]
    frozen = [z.copy() for z in p.z]
    p.update([[1]], [3.0], [5.0], [1.0])
    assert np.array_equal(p.z[0], frozen[0]) and len(p.trace_refine) == 2
    assert all(p.sample(np.random.default_rng(s)) == [1] for s in range(5))


def test_state_round_trips_exactly():
    import json

    p = FedExPolicy([3, 2], gamma=0.3)
    p.update([[0, 1], [2, 0]], [2.0, 2.5], [1.7, 2.9], [3.0, 5.0])
    q = FedExPolicy([3, 2], gamma=0.3)
    q.load(json.loads(json.dumps(p.state())))
    assert all(np.array_equal(a, b) for a, b in zip(p.z, q.z)) and q.trace_refine == p.trace_refine


def _ctx(rnd, sampled):
    return RoundContext(round=rnd, rounds=3, sampled=sampled, clients=sampled, num_train={c: 4 for c in sampled},
                        config={"round": rnd})


def test_instructions_are_per_client_seeded_and_decoded():
    import torch

    alg = get_algorithm("fedex", {"grid": {"lr": [1e-3, 1e-2], "local_steps": [1, 3]}, "seed": 5})
    alg.adapter = {"w": torch.zeros(2)}
    cids = [f"c{i}" for i in range(8)]
    a = alg.configure_fit(_ctx(1, cids))
    b = alg.configure_fit(_ctx(1, cids))
    assert {c: i.config["fedex_arms"] for c, i in a.items()} == {c: i.config["fedex_arms"] for c, i in b.items()}
    assert len({tuple(i.config["fedex_arms"]) for i in a.values()}) > 1  # clients differ
    for ins in a.values():
        lr_i, st_i = ins.config["fedex_arms"]  # dimensions in sorted key order: local_steps, lr
        assert ins.config["fedex_local_steps"] == [1, 3][lr_i] and ins.config["fedex_lr"] == [1e-3, 1e-2][st_i]
    # the server's round: FedAvg of the adapters plus one policy step from the clients' feedback
    acc = alg.begin(_ctx(1, cids))
    for i, cid in enumerate(cids[:2]):
        alg.fold(_ctx(1, cids), acc, Update(cid, {"adapter": {"w": torch.full((2,), float(i))}}, 4,
                                            {"fedex_loss_before": 2.0, "fedex_loss_after": 1.0 + i,
                                             "fedex_val_size": 2.0}))
    m = alg.finish(_ctx(1, cids), acc)
    assert torch.allclose(alg.adapter["w"], torch.full((2,), 0.5))
    assert 0 < m["fedex_entropy"] < math.log(4) and "fedex_theta_lr_0" in m


@pytest.mark.parametrize("opts,msg", [
    ({"configs": [{"lrr": 1e-3}]}, "did you mean 'lr'"),
    ({"configs": [{"lr": 1e-3}], "grid": {"lr": [1e-3]}}, "not both"),
    ({"grid": {"local_steps": [1.5]}}, "whole number"),
    ({"grid": {"lr": []}}, "no candidate"),
    ({"gamma": 2.0}, "gamma"),
    ({"schedule": "fast"}, "schedule"),
])
def test_bad_options_are_one_clear_error(opts, msg):
    with pytest.raises(FedtuneError, match=msg):
        get_algorithm("fedex", opts)
