import pytest
import torch

from fedtune.algorithms import ALGORITHMS, ClientUpdate, get_algorithm
from fedtune.errors import FedtuneError


def _ups():
    return [
        ClientUpdate("b", {"w": torch.tensor([4.0, 0.0])}, num_examples=30),
        ClientUpdate("a", {"w": torch.tensor([1.0, 2.0])}, num_examples=10),
    ]


def test_fedavg_sample_weighted_by_hand():
    out = get_algorithm("fedavg", weighting="samples").aggregate({}, _ups())
    # (10*[1,2] + 30*[4,0]) / 40 = [3.25, 0.5]
    assert torch.allclose(out["w"], torch.tensor([3.25, 0.5]))


def test_fedavg_uniform_by_hand():
    out = get_algorithm("fedavg", weighting="uniform").aggregate({}, _ups())
    assert torch.allclose(out["w"], torch.tensor([2.5, 1.0]))


def test_fedavg_order_independent_bitwise():
    alg = get_algorithm("fedavg")
    ups = [ClientUpdate(str(i), {"w": torch.randn(1000)}, num_examples=i + 1) for i in range(7)]
    a = alg.aggregate({}, ups)["w"]
    b = alg.aggregate({}, list(reversed(ups)))["w"]
    assert torch.equal(a, b)


def test_no_updates_keeps_global():
    g = {"w": torch.ones(2)}
    assert get_algorithm("fedavg").aggregate(g, []) is g


def test_unknown_algorithm():
    with pytest.raises(FedtuneError, match="did you mean 'fedavg'"):
        get_algorithm("fedavgg")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_contract_identical_updates_are_a_fixed_point(name):
    # any aggregation of identical client adapters must return that adapter
    t = {"w": torch.randn(3, 3)}
    ups = [ClientUpdate(c, {"w": t["w"].clone()}, num_examples=n) for c, n in (("x", 3), ("y", 9))]
    out = get_algorithm(name).aggregate({"w": torch.zeros(3, 3)}, ups)
    assert torch.allclose(out["w"], t["w"], atol=1e-6)


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_streaming_fold_equals_batch_aggregate(weighting):
    alg = get_algorithm("fedavg", weighting=weighting)
    ups = [ClientUpdate(str(i), {"w": torch.randn(50), "v": torch.randn(2, 3)}, num_examples=3 * i + 1)
           for i in range(5)]
    batch = alg.aggregate({}, ups)
    acc = alg.begin({})
    for u in ups:
        alg.fold(acc, u)
    streamed = alg.finish({}, acc)
    for k in batch:
        assert torch.allclose(batch[k], streamed[k], atol=1e-7)
