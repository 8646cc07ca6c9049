"""fedtune.mt_bernoulli: torch's CPU Bernoulli masks by compiled kernels.

The reference is independent of the code under test: numpy's own MT19937 (set to torch's
generator state) for the words, and the definition ``u = ((w0 mod 2^21) * 2^32 + w1) * 2^-53``,
``keep = u < q`` computed in Python floats; and, where this machine's torch draws through that
serial sampler (``available()``), torch's ``bernoulli_`` itself."""

import math
import sys

import numpy as np
import pytest
import torch

from fedtune import mt_bernoulli
from fedtune.dropout import MaskDropout


def _numpy_reference(state: torch.Tensor, n: int, q: float) -> np.ndarray:
    raw = state.numpy()
    left = int(raw[8:12].view(np.int32)[0])
    pos = 624 if left == 1 else int(raw[16:24].view(np.uint64)[0])
    bg = np.random.MT19937()
    bg.state = {"bit_generator": "MT19937",
                "state": {"key": raw[24:24 + 8 * 624].view(np.uint64).astype(np.uint32), "pos": pos}}
    w = bg.random_raw(2 * n).astype(np.uint64)
    v = ((w[0::2] & 0x1FFFFF) << 32) | w[1::2]
    return np.array([float(x) * 2.0**-53 < q for x in v.tolist()])


@pytest.mark.parametrize("consumed", [0, 1, 623, 624, 1000])  # words drawn since seeding: block edges
@pytest.mark.parametrize("shape, q", [((7, 5), 0.95), ((333, 17), 0.9), ((3,), 0.5), ((2, 1500), 0.3)])
def test_masks_follow_torchs_mersenne_twister_and_bernoulli_definition(consumed, shape, q):
    torch.manual_seed(7)
    if consumed:
        torch.empty(consumed, dtype=torch.int32).random_(0, 1000)  # one 32-bit word each
    before = torch.get_rng_state()
    got = mt_bernoulli.bernoulli_keep(shape, q)
    want = _numpy_reference(before, math.prod(shape), q)
    assert got.shape == shape and got.dtype == torch.bool
    assert np.array_equal(got.flatten().numpy(), want)


@pytest.mark.parametrize("q", [0.3, 0.95, 0.5, 0.1 + 2.0**-40, 1.0])
def test_the_threshold_is_exact_where_q_times_2_to_53_is_not_an_integer(q):
    """A 53-bit value v is kept iff v * 2^-53 < q (torch's rule in doubles); the kernel compares v
    with an integer threshold. q = 0.3: q * 2^53 = ...297.6, so ...297 is kept and ...298 is not."""
    edge = math.floor(q * 2.0**53)
    for v in (edge - 1, edge, edge + 1):
        if v < 2**53:
            assert (v < mt_bernoulli._threshold(q)) == (v * 2.0**-53 < q), v
    if q == 0.3:
        assert edge * 2.0**-53 < q and mt_bernoulli._threshold(q) == edge + 1


@pytest.mark.skipif(not mt_bernoulli.available(), reason="torch here draws through MKL or numba is missing")
@pytest.mark.parametrize("shape", [(1280, 576), (8, 99, 1536), (1,)])
def test_same_masks_and_generator_state_as_torch_here(shape):
    torch.manual_seed(3)
    torch.rand(5)
    before = torch.get_rng_state()
    want = torch.empty(shape, dtype=torch.bool).bernoulli_(0.95)
    after = torch.get_rng_state()
    torch.set_rng_state(before)
    got = mt_bernoulli.bernoulli_keep(shape, 0.95)
    assert torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), after)
    assert torch.equal(torch.rand(4), (torch.set_rng_state(after), torch.rand(4))[1])


def test_the_check_leaves_the_generator_as_it_was():
    torch.manual_seed(11)
    torch.rand(3)
    before = torch.get_rng_state()
    mt_bernoulli.available.cache_clear()
    mt_bernoulli.available()
    assert torch.equal(torch.get_rng_state(), before)


def test_without_numba_dropout_draws_through_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    mt_bernoulli.available.cache_clear()
    try:
        assert not mt_bernoulli.available()
        drop = MaskDropout(0.1).train()
        x = torch.randn(6, 10)
        torch.manual_seed(5)
        got = drop(x)
        torch.manual_seed(5)
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.9)
        assert torch.equal(got, x.mul(drop.scale).mul_(keep.view(torch.uint8)))
    finally:
        mt_bernoulli.available.cache_clear()
