"""torch's CPU Bernoulli masks, the same draws from the same generator, compiled.

On a CPU where torch does not take its MKL path (AMD processors, torch builds without MKL),
``torch.empty(shape, dtype=torch.bool).bernoulli_(q)`` runs a serial loop over torch's
Mersenne Twister (``at::mt19937``, the default CPU generator): per element two 32-bit words ``w0, w1``,
``u = ((w0 mod 2^21) · 2^32 + w1) · 2^-53`` and ``keep = u < q`` (``at::bernoulli_distribution``
over ``uniform_real_distribution<double>`` of ``random64()``). That loop is about a quarter of a
SmolLM2 LoRA training step (LoRA dropout draws one mask per adapted layer and step).

:func:`bernoulli_keep` computes the very same masks and leaves torch's generator in the very same
state, with the generator's block update, its tempering and the Bernoulli rule compiled by numba
(MT19937: Matsumoto and Nishimura, ACM TOMACS 8(1), 1998) — 0.30 ms against torch's 2.72 ms for a
1280 x 576 mask on a 2-core AVX512 EPYC (Zen 5), +25% tokens/s in a SmolLM2 LoRA step, and +7.7%
more (0.89 → 0.52 ms) from laying the loops out so that they vectorise (docs/benchmarks.md#train_throughput).
It reads the generator through ``torch.get_rng_state()`` (``CPUGeneratorImplState``: the 624 state
words as uint64 from byte 24, ``left`` at byte 8, ``next`` at byte 16) and writes the advanced
state back with ``torch.set_rng_state``.

It is used only where :func:`available` has checked, once per process, that it reproduces this
torch on this machine bit for bit (masks and the generator's state after them, over sizes that
cross the generator's 624-word blocks, from a copy of the live state that is restored after the
check); otherwise — no numba, another torch, or an Intel CPU where torch draws through MKL —
callers keep torch's own ``bernoulli_``. Not thread-safe against other threads drawing from the
default generator at the same time (neither is reading and restoring its state). No library
reproduces torch's CPU Bernoulli stream, so it is written here.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)

_STATE_BYTES = 5056  # sizeof(CPUGeneratorImplState) on 64-bit builds
_LEFT, _NEXT, _WORDS = 8, 16, 24  # byte offsets in it
_N = 624  # MT19937 state words


@functools.cache
def _kernels():
    """The numba kernel (compiled on first use, cached on disk beside this file)."""
    import numba as nb

    u32 = np.uint32

    @nb.njit(cache=True, nogil=True, inline="always")
    def twist(a, b, c):
        y = (a & u32(0x80000000)) | (b & u32(0x7FFFFFFF))
        return c ^ (y >> u32(1)) ^ (u32(0x9908B0DF) * (b & u32(1)))

    @nb.njit(cache=True, nogil=True)
    def next_block(old, new):
        # at::mt19937::next_state into another buffer, in three loops without loop-carried
        # dependences (each reads words written by an earlier loop or none)
        for i in range(227):
            new[i] = twist(old[i], old[i + 1], old[i + 397])
        for i in range(227, 454):
            new[i] = twist(old[i], old[i + 1], new[i - 227])
        for i in range(454, 623):
            new[i] = twist(old[i], old[i + 1], new[i - 227])
        new[623] = twist(old[623], new[0], new[396])

    @nb.njit(cache=True, nogil=True, inline="always")
    def temper(y):
        y ^= y >> u32(11)
        y ^= (y << u32(7)) & u32(0x9D2C5680)
        y ^= (y << u32(15)) & u32(0xEFC60000)
        return y ^ (y >> u32(18))

    @nb.njit(cache=True, nogil=True)
    def temper_block(a, t):
        # always the whole block to the same place: a loop from a variable start does not vectorise
        # (3x slower measured)
        for j in range(_N):
            t[j + 1] = temper(a[j])

    @nb.njit(cache=True, nogil=True)
    def pairs(t, n, threshold, out):
        # on views that start at the pair and the output element: LLVM vectorises this loop, but not
        # the same loop indexed from offsets into the whole buffers (0.30 vs 0.51 ms a mask, measured)
        for k in range(n):
            w0, w1 = np.uint64(t[2 * k]), np.uint64(t[2 * k + 1])
            out[k] = ((w0 & np.uint64(0x1FFFFF)) << np.uint64(32) | w1) < threshold

    @nb.njit(cache=True, nogil=True)
    def keep_mask(state, pos, threshold, out):
        """``out[i]``: element i's keep decision from the generator's next two words; ``state`` is
        advanced in place and the new position (index of the next word; 624: block used up)
        returned. ``t[1 + j]`` holds word j of the current block tempered, ``t[0]`` a block's last
        word when an element's pair straddles two blocks; ``s`` is the index in ``t`` of the next
        unused word."""
        a, b, t = state.copy(), np.empty(_N, np.uint32), np.empty(_N + 1, np.uint32)
        for j in range(pos, _N):  # the rest of the current block (once a call)
            t[j + 1] = temper(a[j])
        i, n, s = 0, out.shape[0], pos + 1
        while i < n:
            left = _N + 1 - s
            if left < 2:  # the block is used up, or one word of it waits for the next block's first
                if left == 1:
                    t[0] = t[_N]
                s = 1 - left
                next_block(a, b)
                a, b = b, a
                temper_block(a, t)
            m = min((_N + 1 - s) // 2, n - i)
            pairs(t[s:s + 2 * m], m, threshold, out[i:i + m])
            i, s = i + m, s + 2 * m
        state[:] = a
        return s - 1

    return keep_mask


def _threshold(q: float) -> int:
    """The integer t with ``v * 2^-53 < q  <=>  v < t`` for every 53-bit integer v: ``ceil(q * 2^53)``
    (``q * 2^53`` is exact in double; it is not an integer where q < 0.5)."""
    return math.ceil(q * 2.0**53)


def bernoulli_keep(shape: tuple[int, ...], q: float) -> torch.Tensor:
    """``torch.empty(shape, dtype=torch.bool).bernoulli_(q)`` on torch's default CPU generator, by
    the compiled kernels: call only where :func:`available` is True."""
    keep_mask = _kernels()
    state = torch.get_rng_state()
    raw = state.numpy()
    left = int(raw[_LEFT:_LEFT + 4].view(np.int32)[0])
    pos = _N if left == 1 else int(raw[_NEXT:_NEXT + 8].view(np.uint64)[0])
    mt = raw[_WORDS:_WORDS + 8 * _N].view(np.uint64).astype(np.uint32)
    out = np.empty(int(np.prod(shape, dtype=np.int64)), np.bool_)
    pos = keep_mask(mt, pos, np.uint64(_threshold(q)), out)
    raw[_WORDS:_WORDS + 8 * _N].view(np.uint64)[:] = mt
    raw[_LEFT:_LEFT + 4].view(np.int32)[0] = _N + 1 - pos  # torch keeps left + next = 625
    raw[_NEXT:_NEXT + 8].view(np.uint64)[0] = pos
    torch.set_rng_state(state)
    return torch.from_numpy(out).view(shape)


def _reproduces_torch() -> bool:
    """Whether :func:`bernoulli_keep` gives this torch's masks and generator states here: draws of
    several sizes and keep probabilities, block boundaries crossed, from the live state and from a
    freshly seeded one; the default generator is restored afterwards."""
    saved = torch.get_rng_state()
    try:
        if saved.numel() != _STATE_BYTES:
            return False
        cases = [((7, 5), 0.95), ((333, 17), 0.9), ((3,), 0.5), ((1000,), 0.3), ((2, 1500), 0.95)]
        for fresh in (False, True):
            if fresh:
                torch.manual_seed(12345)
            for shape, q in cases:
                before = torch.get_rng_state()
                want = torch.empty(shape, dtype=torch.bool).bernoulli_(q)
                after = torch.get_rng_state()
                torch.set_rng_state(before)
                got = bernoulli_keep(shape, q)
                if not (torch.equal(want, got) and torch.equal(after, torch.get_rng_state())):
                    return False
        return True
    finally:
        torch.set_rng_state(saved)


@functools.cache
def available() -> bool:
    """numba is importable and :func:`bernoulli_keep` reproduces torch's CPU ``bernoulli_`` here
    (checked once per process)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        log.debug("numba is not installed: torch draws dropout masks itself")
        return False
    try:
        ok = _reproduces_torch()
    except Exception as e:  # noqa: BLE001 — numba failing to compile here, an unexpected state: use torch's
        log.debug("compiled Bernoulli masks unavailable: %s", e)
        return False
    if not ok:
        log.debug("this torch draws Bernoulli masks differently here (MKL?): torch draws them itself")
    return ok
