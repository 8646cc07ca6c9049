"""fedtune.dropout.FastDropout: the opt-in LoRA dropout with 16-bit uniforms (train.fast_dropout).

Expected values come from the rule itself (keep probability 1 - round(p*65536)/65536, scale
65536/(65536 - cut)) and binomial bounds, not from the code's output."""

import math

import pytest
import torch

from fedtune.dropout import FastDropout, set_lora_dropout

CUT = round(0.05 * 65536)  # 3277
KEEP = 1 - CUT / 65536


def _within_binomial(kept: int, n: int, p: float, sigmas: float = 6.0) -> bool:
    return abs(kept - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_keep_rate_scale_and_gradient_follow_the_rule():
    torch.manual_seed(0)
    x = torch.rand(1000, 4003) + 0.5  # no zeros: a zero output means dropped; odd width: lanes cross rows
    x.requires_grad_()
    d = FastDropout(0.05).train()
    y = d(x)
    kept = y != 0
    assert _within_binomial(int(kept.sum()), x.numel(), KEEP)
    scale = 65536 / (65536 - CUT)
    assert torch.equal(y[kept], x.detach()[kept] * scale)
    # every one of the four 16-bit lanes of a draw is uniform (a 63-bit draw would bias the top one)
    flat = kept.flatten()
    for lane in range(4):
        sub = flat[lane::4]
        assert _within_binomial(int(sub.sum()), sub.numel(), KEEP), lane
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * scale)  # same mask, same scale


def test_seeded_identity_in_eval_and_zero_p():
    x = torch.randn(64, 96)
    d = FastDropout(0.3).train()
    torch.manual_seed(7)
    a = d(x)
    torch.manual_seed(7)
    assert torch.equal(a, d(x))
    assert not torch.equal(a, d(x))  # the generator moved on
    assert d.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    assert FastDropout(0.05).extra_repr() == "p=0.05, effective_p=0.0500031"
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        FastDropout(1.0)


def test_bf16_input_stays_bf16_and_scales_in_float():
    torch.manual_seed(1)
    x = (torch.rand(256, 576) + 0.5).bfloat16()
    y = FastDropout(0.05).train()(x)
    assert y.dtype == torch.bfloat16
    kept = y != 0
    assert torch.equal(y[kept], (x[kept].float() * (65536 / (65536 - CUT))).bfloat16())


def test_swap_on_a_lora_model_and_back():
    from test_training import _tiny_lora  # the test module's tiny LoRA builder

    pm, _ = _tiny_lora(dropout=0.1)
    n = set_lora_dropout(pm, True)
    fast = [m for m in pm.modules() if isinstance(m, FastDropout)]
    assert n > 0 and len(fast) == n and all(m.p == 0.1 for m in fast)
    assert set_lora_dropout(pm, True) == n  # idempotent
    assert set_lora_dropout(pm, False) == n
    assert not any(isinstance(m, FastDropout) for m in pm.modules())
    assert sum(type(m) is torch.nn.Dropout for m in pm.modules()) == n


def test_train_local_with_fast_dropout_is_seeded_and_another_sample():
    """train.fast_dropout: the same seed gives the same adapter; the masks differ from torch's (so
    the adapter does too); the default swaps torch's dropout back."""
    from test_training import DS, _three_steps, _tiny_lora

    from fedtune.adapters import get_adapter_state

    pm, _ = _tiny_lora(dropout=0.1)
    init, data = get_adapter_state(pm), DS(16, seed=3)

    def train(fast):
        return _three_steps(pm, init, data, fast_dropout=fast)

    a, b = train(True), train(True)
    assert any(isinstance(m, FastDropout) for m in pm.modules())
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train(False)
    assert not any(isinstance(m, FastDropout) for m in pm.modules())
    assert not all(torch.equal(a[k], c[k]) for k in a)
