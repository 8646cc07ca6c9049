"""fedtune.padding_free: a batch's real tokens as one row compute what the padded batch computes.

Expected values come from the padded batch itself, run through the same code without the layout
(and, for training, from train_local with ``padding_free: false``), and from hand-worked indices."""

import pytest
import torch
from test_training import DS, _three_steps, _tiny_lora

from fedtune import mt_bernoulli, padding_free
from fedtune.adapters import get_adapter_state, trainable_parameters
from fedtune.dropout import FastDropout, MaskDropout
from fedtune.models import attention
from fedtune.models.attention import training_attention


def _mask(lengths, T=None):
    T = T or max(lengths)
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


def test_plan_indexes_the_real_tokens_and_builds_the_padded_mask():
    layout = padding_free.plan(_mask([3, 1, 2]))
    # row-major positions of the real tokens in the flattened 3 x 3 batch, then fillers up to a
    # multiple of 16 pointing at the first pad position (4)
    assert layout.index.tolist() == [0, 1, 2, 3, 6, 7] + [4] * 10
    assert (layout.rows, layout.length, layout.tokens, layout.width) == (3, 3, 6, 16)
    want = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 1]],
                         [[1, 0, 0], [1, 0, 0], [1, 0, 0]],
                         [[1, 0, 0], [1, 1, 0], [1, 1, 0]]], dtype=torch.bool)[:, None]
    assert torch.equal(layout.keep, want)
    ids = torch.tensor([[11, 12, 13], [21, 0, 0], [31, 32, 0]])
    packed = padding_free.packed_inputs({"input_ids": ids}, layout)
    assert packed["input_ids"].tolist() == [[11, 12, 13, 21, 31, 32] + [0] * 10]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1] + [1] * 10]
    assert padding_free.plan(_mask([16, 16, 9, 7])).width == 48  # 48 real tokens: no fillers


def test_plan_declines_where_nothing_is_saved_or_the_layout_is_not_collates():
    assert padding_free.plan(_mask([4, 4])) is None  # no padding
    assert padding_free.plan(_mask([2], T=4)) is None  # one row
    assert padding_free.plan(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padding
    assert padding_free.plan(torch.tensor([[1, 0, 1], [1, 1, 1]])) is None  # a hole
    assert padding_free.plan(_mask([5, 3]), window=4) is None  # a sliding window shorter than the batch
    assert padding_free.plan(_mask([5, 3]), window=8) is not None


def test_pad_and_unpad_round_trip_with_zeros_at_the_padding():
    layout = padding_free.plan(_mask([3, 1, 2]))
    x = torch.arange(16 * 2, dtype=torch.float32).view(16, 2) + 1  # 6 real tokens, 10 fillers
    padded = layout.pad(x)
    assert padded.shape == (3, 3, 2)
    assert padded[1, 1:].abs().sum() == 0 and padded[2, 2].abs().sum() == 0  # fillers dropped
    back = layout.unpad(padded)
    assert torch.equal(back[:6], x[:6]) and back[6:].abs().sum() == 0


def _qkv(lengths, H, KV, d, seed):
    """Padded bf16 q, k, v ``(B, heads, T, d)`` with zeros at the pad positions, and an output grad."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    real = _mask(lengths).bool()[:, None, :, None]

    def mk(h):
        return (torch.randn(B, h, T, d, generator=g) * real).bfloat16()

    return mk(H), mk(KV), mk(KV), mk(H).transpose(1, 2)


def _packed(x, layout, fillers=0.0):
    """``(B, h, T, d)`` → the packed row ``(1, h, width, d)`` the model's attention layers hand
    over, its fillers set to ``fillers`` (what they hold must not matter)."""
    row = layout.unpad(x.transpose(1, 2)).clone()
    row[layout.tokens:] = fillers
    return row.transpose(0, 1)[None]


@pytest.mark.parametrize("path", ["grouped", "folded", "sdpa"])
def test_a_packed_rows_attention_is_the_padded_batchs_bit_for_bit(monkeypatch, path):
    """Forward output and q/k/v gradients at the real positions, through each attention path."""
    if path == "folded":
        monkeypatch.setattr(attention, "MAX_SCORE_BYTES", 0)  # everything past GroupedAttention's range
    lengths, H, KV, d = [7, 3, 5], 6, 2, 16
    q, k, v, grad = _qkv(lengths, H, KV, d, seed=1)
    layout = padding_free.plan(_mask(lengths))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, H // KV  # what transformers' SDPA reads

    def run(q, k, v, mask, grad_out):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        with torch.set_grad_enabled(path != "sdpa"):  # without gradients everything goes to SDPA
            out, _ = training_attention(module, q, k, v, mask, scaling=d ** -0.5)
        if path == "sdpa":
            return out, (None, None, None)
        out.backward(grad_out)
        return out, (q.grad, k.grad, v.grad)

    want, want_grads = run(q, k, v, layout.keep, grad)
    n = layout.tokens
    with padding_free.active(layout):
        got, got_grads = run(*(_packed(x, layout, fillers=7.0) for x in (q, k, v)), None,
                             layout.unpad(grad)[None])  # the fillers' output grad: a pad position's, 0
    assert got.shape == (1, layout.width, H, d) and layout.width > n
    assert torch.equal(got[0, :n], layout.unpad(want)[:n])
    for a, b in zip(got_grads, want_grads):
        if b is not None:
            assert torch.equal(a, _packed(b, layout))  # fillers get exactly zero gradient


def _draws(module, x, layout):
    """``module``'s mask on ``x`` (padded) and on its packed row, from the same generator state,
    and the generator's state after each."""
    torch.manual_seed(5)
    padded = module(x)
    after_padded = torch.get_rng_state()
    torch.manual_seed(5)
    with padding_free.active(layout):
        packed = module(layout.unpad(x)[None])
    return padded, packed, after_padded, torch.get_rng_state()


@pytest.mark.parametrize("kind", ["mask", "mask_torch_sampler", "fast"])
def test_dropout_on_a_packed_row_draws_the_padded_batchs_mask(monkeypatch, kind):
    if kind == "mask_torch_sampler":
        monkeypatch.setattr(mt_bernoulli, "available", lambda: False)
    module = (FastDropout if kind == "fast" else MaskDropout)(0.3).train()
    layout = padding_free.plan(_mask([9, 4, 6]))
    x = torch.randn(3, 9, 40).bfloat16() + 2  # no zeros: a dropped element reads 0
    padded, packed, state_padded, state_packed = _draws(module, x, layout)
    n = layout.tokens
    assert packed.shape == (1, layout.width, 40)
    assert torch.equal(packed[0, :n], layout.unpad(padded)[:n])
    assert torch.equal(state_packed, state_padded)  # the generator moved exactly as far
    assert 0 < (packed == 0).float().mean() < 0.6


def _inputs_seen(pm):
    """The shapes of ``input_ids`` the base model's embedding receives (a forward hook), after the
    model's one-time checks (their own short forwards) have run."""
    from fedtune.head_loss import chunked_head_applies
    from fedtune.training import label_logits_supported

    label_logits_supported(pm), chunked_head_applies(pm), padding_free.supported(pm)
    shapes = []
    emb = pm.get_base_model().model.embed_tokens
    return shapes, emb.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_on_packed_rows_lands_where_padded_training_does(dtype):
    """train_local with LoRA dropout on: padding-free (the default) and padded batches give the same
    adapter after 3 steps — to fp32's rounding in fp32, and bf16's in bf16 (where matmuls over a
    different number of rows may sum in another order) — and the packed run really ran packed."""
    pm, _ = _tiny_lora(0.1, dtype=dtype)
    init, data = get_adapter_state(pm), DS(16, seed=3)
    assert padding_free.supported(pm)
    shapes, hook = _inputs_seen(pm)
    padded = _three_steps(pm, init, data, padding_free=False, precision="fp32" if dtype == "float32" else "bf16")
    padded_shapes = list(shapes)
    shapes.clear()
    packed = _three_steps(pm, init, data, padding_free=True, precision="fp32" if dtype == "float32" else "bf16")
    hook.remove()
    assert all(s[0] == 4 for s in padded_shapes) and all(s[0] == 1 for s in shapes)
    widths = sorted(s[1] for s in shapes)
    real = sorted(sum(data.lengths[j] for j in b) for b in _batches(data))
    assert widths == [-(-n // padding_free.ROW_MULTIPLE) * padding_free.ROW_MULTIPLE for n in real]
    moved = max((padded[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3
    for k in init:
        if dtype == "float32":
            torch.testing.assert_close(packed[k], padded[k], rtol=1e-5, atol=1e-6)
        else:
            assert (packed[k] - padded[k]).norm() <= 0.02 * (padded[k] - init[k]).norm(), k


def _batches(data):
    from fedtune.training import BatchStream

    stream = BatchStream(data.lengths, 4, 11, True)
    return [next(stream) for _ in range(3)]


def test_a_model_that_mixes_tokens_outside_attention_keeps_padded_batches(monkeypatch):
    """The one-time check runs the model both ways: a model that mixes tokens outside attention
    (here each MLP adds a running sum over the sequence, as a convolution or state-space layer
    would carry state along it) crosses from one example into the next on a packed row, fails the
    check, and trains on padded batches."""
    from transformers.models.llama import modeling_llama

    real_forward = modeling_llama.LlamaMLP.forward

    def mixing(self, x):
        return real_forward(self, x) + 0.1 * x.cumsum(1)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", mixing)
    pm, _ = _tiny_lora(0.0)
    assert not padding_free.supported(pm)
    shapes, hook = _inputs_seen(pm)
    _three_steps(pm, get_adapter_state(pm), DS(16, seed=3))
    hook.remove()
    assert shapes and all(s[0] == 4 for s in shapes)


def test_models_off_fedtunes_attention_keep_padded_batches():
    pm, _ = _tiny_lora(0.0)
    pm.get_base_model().set_attn_implementation("sdpa")
    assert not padding_free.supported(pm)
    assert trainable_parameters(pm)
