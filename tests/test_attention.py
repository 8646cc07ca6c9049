"""fedtune.models.attention: 16-bit CPU training attention against a float64 reference.

The reference is torch's own SDPA in float64 on the same (16-bit) inputs; the bar is the error
torch's bf16 flash kernel makes on the same case (measured here, not pasted)."""

import pytest
import torch
import torch.nn.functional as F

from fedtune.models import attention
from fedtune.models.attention import (
    ATTENTION,
    FoldedFlashAttention,
    GroupedAttention,
    training_attention,
)


def _inputs(B, H, KV, T, S, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*shape):
        return torch.randn(*shape, generator=g).bfloat16().requires_grad_()

    return mk(B, H, T, d), mk(B, KV, S, d), mk(B, KV, S, d), torch.randn(B, H, T, d, generator=g).bfloat16()


def _reference(q, k, v, keep, grad, scale):
    """float64 SDPA, keys and values repeated per query head; rows with nothing to attend give 0."""
    G = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = keep if keep is not None else torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    s = q64 @ k64.repeat_interleave(G, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = p @ v64.repeat_interleave(G, 1)
    o.backward(grad.double())
    return [o.detach(), q64.grad, k64.grad, v64.grad]


def _ours(q, k, v, keep, grad, scale, kind=GroupedAttention):
    o = kind.apply(q, k, v, keep, scale)
    o.backward(grad)
    out = [o.detach(), q.grad, k.grad, v.grad]
    for t in (q, k, v):
        t.grad = None
    return [t.double() for t in out]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("heads", [(9, 3), (4, 4)])  # grouped-query and multi-head
@pytest.mark.parametrize("magnitude", [1.0, 4.0])  # 4: scores of a few tens, as trained models have
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])  # how training calls it
def test_causal_attention_is_as_accurate_as_torchs_bf16_flash_kernel(heads, magnitude, autocast):
    H, KV = heads
    q, k, v, g = _inputs(3, H, KV, 40, 40)
    with torch.no_grad():
        q.mul_(magnitude), k.mul_(magnitude)
    scale = 16**-0.5
    want = _reference(q, k, v, None, g, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = _ours(q, k, v, None, g, scale)
    flash_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=H != KV)
    flash_out.backward(g)
    flash = [flash_out.detach().double(), q.grad.double(), k.grad.double(), v.grad.double()]
    for name, a, f, w in zip(("out", "dq", "dk", "dv"), ours, flash, want):
        # bf16 flash: ~2-7e-3 here; scores rounded to bf16 (autocast's matmul) read up to 0.16 at magnitude 4
        assert _rel(a, w) <= 1.5 * _rel(f, w) + 1e-3, name
        assert _rel(a, w) < 1e-2, name


def test_padding_mask_offset_queries_and_rows_with_nothing_to_attend():
    """A boolean (B, 1, T, S) mask: right padding in one row, a query block at the end of a longer
    key sequence (T < S, as with a cache), and a row whose mask is all False (it gives zeros)."""
    q, k, v, g = _inputs(2, 6, 2, 5, 9)
    keep = torch.ones(5, 9, dtype=torch.bool).tril(4)[None, None].repeat(2, 1, 1, 1)
    keep[1, :, :, 6:] = False  # row 1: keys 6.. are padding
    keep[1, :, 0, :] = False  # row 1, query 0: nothing to attend to
    scale = 0.3
    want = _reference(q, k, v, keep, g, scale)
    ours = _ours(q, k, v, keep, g, scale)
    assert torch.equal(ours[0][1, :, 0], torch.zeros_like(ours[0][1, :, 0]))
    for name, a, w in zip(("out", "dq", "dk", "dv"), ours, want):
        assert _rel(a, w) < 1e-2, name


def test_everything_else_goes_to_transformers_sdpa_unchanged(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def not_here(*args):
        raise AssertionError("GroupedAttention served a case that belongs to SDPA")

    monkeypatch.setattr(GroupedAttention, "apply", not_here)  # its forward is torch's flash kernel: same bits
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v, _ = _inputs(2, 4, 2, 6, 6)
    k, v = k.repeat_interleave(2, 1).detach(), v.repeat_interleave(2, 1).detach()
    cases = {"no grad": (q.detach(), k, v), "fp32": (q.float(), k.float(), v.float())}
    ql, kl, vl, _ = _inputs(1, 2, 2, 400, 400)  # a key/value head's scores: 400 x 400 x 4 > MAX_SCORE_BYTES
    cases["long"] = (ql, kl, vl)
    for name, (qq, kk, vv) in cases.items():
        with torch.set_grad_enabled(name != "no grad"):
            got, _ = training_attention(module, qq, kk, vv, None, scaling=0.25)
            want, _ = sdpa_attention_forward(module, qq, kk, vv, None, scaling=0.25)
        assert torch.equal(got, want), name


def test_a_bf16_model_trains_through_it_with_sdpas_loss_and_gradients():
    from test_training import _tiny_lora  # the test module's tiny LoRA builder

    from fedtune.adapters import trainable_parameters

    pm, _ = _tiny_lora(dropout=0.0, dtype="bfloat16")
    model = pm.get_base_model()
    assert model.config._attn_implementation == ATTENTION
    ids = torch.randint(3, 400, (3, 24))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    results = {}
    for impl in (ATTENTION, "sdpa"):
        model.set_attn_implementation(impl)
        pm.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results[impl] = (loss.detach(), [p.grad.float().clone() for _, p in trainable_parameters(pm)])
    (l1, g1), (l2, g2) = results[ATTENTION], results["sdpa"]
    torch.testing.assert_close(l1, l2, rtol=1e-2, atol=1e-3)
    worst = max(_rel(a.double(), b.double()) for a, b in zip(g1, g2))
    # every adapter gradient, q/k/v of both layers included: two bf16 kernels apart (here ~0.02; a
    # dK off by half reads 0.5)
    assert worst < 5e-2


def test_work_split_in_cache_sized_chunks_gives_the_same_bits(monkeypatch):
    """The key/value heads (over the batch) are processed in chunks sized to the cache; a chunk per
    head, with a per-row padding mask, must give exactly what one chunk over everything gives."""
    from fedtune.models import attention

    q, k, v, g = _inputs(3, 6, 2, 7, 7)
    keep = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].repeat(3, 1, 1, 1)
    keep[1, :, :, 5:] = False
    results = []
    for chunk_bytes in (1 << 30, 1):  # everything at once; then one key/value head per thread
        monkeypatch.setattr(attention, "CHUNK_BYTES", chunk_bytes)
        assert len(attention._chunks(6, 6 // 2 * 7 * 7)) == (1 if chunk_bytes > 1 else -(-6 // torch.get_num_threads()))
        results.append(_ours(q, k, v, keep, g, 0.4))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), name


def test_the_layers_of_a_forward_share_one_mask_bias():
    from fedtune.models.attention import _mask_bias

    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    first = _mask_bias(keep, 5, 5, "cpu")
    assert _mask_bias(keep, 5, 5, "cpu") is first  # the next layer: the same object, built once
    assert torch.equal(first[0, 0], torch.zeros(5, 5).masked_fill(~keep[0, 0], float("-inf")))
    keep[1, 0, 4, 0] = False  # changed in place: a new bias
    again = _mask_bias(keep, 5, 5, "cpu")
    assert again is not first and again[1, 0, 4, 0] == float("-inf") and first[1, 0, 4, 0] == 0
    assert _mask_bias(keep.clone(), 5, 5, "cpu") is not again  # another mask object


def test_a_torch_without_the_cpu_flash_op_keeps_sdpa(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.models import attention

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")
    monkeypatch.setattr(attention, "flash_forward_available", lambda: False)
    model = LlamaForCausalLM(cfg)
    assert not attention.use_training_attention(model)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    assert attention.flash_forward_available()  # the torch this project pins has it
    assert attention.use_training_attention(model)
    assert model.config._attn_implementation == ATTENTION


def test_keys_nobody_attends_get_exactly_zero_gradients_and_tiny_probabilities_stay_accurate():
    """The backward floors exp's argument (torch's CPU exp is slow where it underflows) and zeroes
    masked entries by the mask: padded keys must get exactly 0 in dK and dV, and a row whose scores
    span far more than 87 (probabilities far below e^-87) must still match float64."""
    q, k, v, g = _inputs(2, 6, 2, 8, 8)
    with torch.no_grad():
        q[0, :, 5].mul_(60.0)  # queries 5 of batch row 0: scores spread over hundreds
    keep = torch.ones(8, 8, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    keep[1, :, :, 6:] = False  # keys 6, 7 of batch row 1: padding
    keep[1, :, 6:, :6] = False  # ...and their queries see nothing
    want = _reference(q, k, v, keep, g, 0.25)
    ours = _ours(q, k, v, keep, g, 0.25)
    for name, i in (("dk", 2), ("dv", 3)):
        assert torch.equal(ours[i][1, :, 6:], torch.zeros_like(ours[i][1, :, 6:])), name
    assert ours[3][0, :, 6:].abs().sum() > 0  # the same keys in row 0 are attended and get gradients
    for name, a, w in zip(("out", "dq", "dk", "dv"), ours, want):
        assert _rel(a, w) < 1e-2, name


@pytest.mark.parametrize("heads", [(9, 3), (6, 2)])
@pytest.mark.parametrize("magnitude", [1.0, 4.0])
def test_folded_flash_is_as_accurate_as_sdpa_and_handles_padding(heads, magnitude):
    """The long-sequence path (torch's flash kernel on each key/value head's query heads folded into
    rows) against float64, with the bar of SDPA's own error on the same case; right padding in one
    row and a query row with nothing to attend to (zeros out, finite gradients)."""
    H, KV = heads
    q, k, v, g = _inputs(3, H, KV, 40, 40)
    with torch.no_grad():
        q.mul_(magnitude), k.mul_(magnitude)
    keep = torch.ones(40, 40, dtype=torch.bool).tril()[None, None].repeat(3, 1, 1, 1)
    keep[1, :, :, 29:] = False  # row 1: keys 29.. are padding
    keep[2, :, 0, :] = False  # row 2, query 0: nothing to attend to
    scale = 16**-0.5
    want = _reference(q, k, v, keep, g, scale)
    ours = _ours(q, k, v, keep, g, scale, kind=FoldedFlashAttention)
    sdpa_out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)
    sdpa_out.backward(g)
    sdpa = [sdpa_out.detach().double(), q.grad.double(), k.grad.double(), v.grad.double()]
    assert torch.equal(ours[0][2, :, 0], torch.zeros_like(ours[0][2, :, 0]))
    assert all(t.isfinite().all() for t in ours)
    for name, a, f, w in zip(("out", "dq", "dk", "dv"), ours, sdpa, want):
        assert _rel(a, w) <= 1.5 * _rel(f, w) + 1e-3, name
        assert _rel(a, w) < 1e-2, name


def test_long_grouped_query_sequences_go_to_folded_flash_short_ones_to_grouped(monkeypatch):
    served = []
    for kind in (GroupedAttention, FoldedFlashAttention):
        monkeypatch.setattr(kind, "apply", lambda *a, kind=kind: served.append(kind) or a[0].transpose(1, 2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3  # what transformers' SDPA reads
    for T in (8, 300):  # 3 query heads a key/value head: 3 x 300 x 300 x 4 > MAX_SCORE_BYTES
        assert (3 * T * T * 4 > attention.MAX_SCORE_BYTES) == (T == 300)
        q, k, v, _ = _inputs(1, 6, 2, T, T)
        training_attention(module, q, k, v, None, scaling=0.25)
    assert served == [GroupedAttention, FoldedFlashAttention]
    # a folded bias past MAX_FOLDED_BIAS_BYTES (G times SDPA's own): SDPA, not the folded path
    monkeypatch.setattr(attention, "MAX_FOLDED_BIAS_BYTES", 3 * 300 * 300 * 4 - 1)
    q, k, v, _ = _inputs(1, 6, 2, 300, 300)
    training_attention(module, q, k, v, None, scaling=0.25)
    assert served == [GroupedAttention, FoldedFlashAttention]
