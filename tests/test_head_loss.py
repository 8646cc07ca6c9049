"""The chunked LM-head cross-entropy (fedtune.head_loss) against torch's one-tensor loss."""

import pytest
import torch
import torch.nn.functional as F

from fedtune.adapters import attach_adapter
from fedtune.config import ModelConfig, PeftConfig
from fedtune.head_loss import (
    CHUNK_ROWS,
    ROW_MULTIPLE,
    ChunkedHeadCrossEntropy,
    chunked_head_applies,
    fused_head_supported,
)
from fedtune.training import IGNORE, lm_loss


def _case(n: int, dtype=torch.float32, bias=False, d=24, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * 0.5).to(dtype)
    b = (torch.randn(vocab, generator=g)).to(dtype) if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, y


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n", [5, 2 * CHUNK_ROWS + 37])  # one padded chunk; two full chunks and a partial one
def test_fp32_loss_and_gradient_equal_the_one_tensor_loss(n, bias):
    h, w, b, y = _case(n, bias=bias)
    factor = 0.37  # an upstream factor, as gradient accumulation's n / total
    (ChunkedHeadCrossEntropy.apply(h, w, b, y, torch.float32) * factor).backward()
    got_loss = ChunkedHeadCrossEntropy.apply(h.detach(), w, b, y, torch.float32)
    got_grad, h.grad = h.grad, None
    want_loss = F.cross_entropy(F.linear(h, w, b), y)
    (want_loss * factor).backward()
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=1e-6, atol=1e-7)
    # fp32 sums over the vocabulary in another order: a gradient element that nearly cancels is off
    # by a few ulps of the row's scale (3e-8 of 2.5e-3 on an AVX512 EPYC), so atol follows the scale
    torch.testing.assert_close(got_grad, h.grad, rtol=1e-5, atol=1e-5 * h.grad.abs().max().item())


def test_bf16_autocast_matches_the_bf16_head_with_fp32_softmax():
    """Under bf16 autocast on a bf16 head, lm_loss took ``cross_entropy(linear(h, W).float(), y)``:
    logits in bf16, softmax in fp32, the logits' gradient cast to bf16. Same loss; the gradient
    equal to bf16 rounding (the same fp32 values cast the same way, but for their last bit)."""
    h, w, _, y = _case(3 * CHUNK_ROWS - 5, dtype=torch.bfloat16, vocab=3000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ChunkedHeadCrossEntropy.apply(h, w, None, y, torch.bfloat16)
    got.backward()
    got_grad, h.grad = h.grad, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w).float(), y)
    want.backward()
    assert got.dtype == want.dtype == torch.float32 and h.grad.dtype == got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, h.grad, rtol=2**-7, atol=1e-6)


def test_no_gradient_buffers_without_grad():
    h, w, _, y = _case(40)
    with torch.no_grad():
        loss = ChunkedHeadCrossEntropy.apply(h, w, None, y, torch.float32)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h.detach(), w), y), rtol=1e-6, atol=1e-7)


def _batch(vocab=500, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :6] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_lm_loss_on_a_tiny_llama_takes_the_chunked_head_and_gives_hfs_loss():
    from fedtune.models import load_model

    model, _ = load_model(ModelConfig(name="tiny-llama"))
    pm = attach_adapter(model, PeftConfig(r=4, dropout=0.0))
    assert fused_head_supported(pm) and chunked_head_applies(pm)
    batch = _batch()
    torch.testing.assert_close(lm_loss(pm, batch, True), pm(**batch).loss, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not chunked_head_applies(pm)  # fp16's loss scale must reach the logits' gradient first


def test_a_model_that_changes_its_logits_after_the_head_keeps_the_one_tensor_loss():
    """Gemma 2 soft-caps its logits (tanh) after the head: the chunked loss would skip that, so the
    probe against the model's own logits turns it down and lm_loss stays HF's loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0, pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval().requires_grad_(False)
    pm = attach_adapter(model, PeftConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert not fused_head_supported(pm)
    batch = _batch()
    torch.testing.assert_close(lm_loss(pm, batch, True), pm(**batch).loss, rtol=1e-5, atol=1e-6)


def test_an_adapter_on_the_head_keeps_the_one_tensor_loss():
    from fedtune.models import load_model

    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="float32"))
    model.config.tie_word_embeddings = False
    pm = attach_adapter(model, PeftConfig(r=4, dropout=0.0, target_modules=["q_proj", "lm_head"]))
    assert not fused_head_supported(pm)


def test_the_head_meets_few_shapes():
    """Every matmul of the head runs on a multiple of ROW_MULTIPLE rows, at most CHUNK_ROWS: the
    shapes oneDNN compiles a kernel for stay few whatever the number of labelled tokens."""
    shapes = set()
    real_mm = torch.mm

    def spy(a, b, *, out=None):
        shapes.add(a.shape[0])
        return real_mm(a, b, out=out)

    for n in (1, 15, 17, 100, 129, 300):
        h, w, _, y = _case(n, vocab=64)
        torch.mm = spy
        try:
            ChunkedHeadCrossEntropy.apply(h, w, None, y, torch.float32).backward()
        finally:
            torch.mm = real_mm
    assert shapes and all(s % ROW_MULTIPLE == 0 and s <= CHUNK_ROWS for s in shapes)
    assert len(shapes) <= CHUNK_ROWS // ROW_MULTIPLE
