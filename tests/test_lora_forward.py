"""fedtune.lora_forward: peft's LoRA forward with the dropout scale and the LoRA scaling applied once
on the rank-r activation — the same function with the same masks as peft's own path (peft's code and
torch's dropout numbers are the reference), the precision's rounding apart; peft's own forward for
everything it does not cover, and back after the block."""

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedtune.dropout import MaskDropout, lora_input_casts_off, set_lora_dropout
from fedtune.lora_forward import folded_scales, train_forward


def _toy(p: float = 0.3, dora: bool = False):
    """Two linears with LoRA (r 4, alpha 8: scaling 2), B non-zero, peft's dropout swapped for
    MaskDropout (torch's numbers, tests/test_dropout.py)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16))
    pm = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0", "2"],
                                        use_dora=dora))
    with torch.no_grad():
        for n, w in pm.named_parameters():
            if "lora_" in n:
                w.normal_(0, 0.3)
    set_lora_dropout(pm, fast=False)
    return pm.train()


def _bf16_base(pm):
    """``pm`` with its frozen base in bf16 and its adapters in fp32 (how fedtune trains on bf16)."""
    pm.base_model.model.to(torch.bfloat16)
    for n, w in pm.named_parameters():
        if "lora_" in n:
            w.data = w.data.float()
    return pm


def _run(pm, x, folded: bool, seed: int = 3):
    """Output, input gradient and adapter gradients of one forward/backward, and the generator's
    next draws (the same masks leave it in the same state)."""
    pm.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with folded_scales(pm) if folded else contextlib.nullcontext():
        y = pm(xi)
        y.pow(2).sum().backward()
    grads = {n: w.grad.clone() for n, w in pm.named_parameters() if w.requires_grad}
    return y.detach(), xi.grad, grads, torch.randint(0, 2**62, (4,))


def test_fp32_is_peft_function_with_the_same_masks():
    pm = _toy()
    x = torch.randn(64, 24)
    ref, ours = _run(pm, x, folded=False), _run(pm, x, folded=True)
    assert _err(ours[0], ref[0]) < 1e-6 and _err(ours[1], ref[1]) < 1e-6
    assert ours[2].keys() == ref[2].keys() and len(ref[2]) == 4
    for k in ref[2]:
        assert _err(ours[2][k], ref[2][k]) < 1e-6, k
    assert torch.equal(ours[3], ref[3])  # the generator drew exactly as much
    # dropout really dropped (a different seed gives another output), and it is not the identity
    assert not torch.allclose(_run(pm, x, folded=True, seed=4)[0], ref[0])
    pm.eval()
    assert _err(_run(pm, x, folded=True)[0], _run(pm, x, folded=False)[0]) < 1e-6


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error as a whole (elementwise it is meaningless where terms cancel)."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("wrong", ["dropout scale", "lora scaling"])
def test_a_missing_scale_is_seen(wrong, monkeypatch):
    """The comparison above can fail: leave either scale out and the outputs part."""
    pm = _toy()
    x = torch.randn(64, 24)
    ref = _run(pm, x, folded=False)
    if wrong == "dropout scale":
        masked = MaskDropout.masked
        monkeypatch.setattr(MaskDropout, "masked", lambda self, x: (masked(self, x)[0], 1.0))
    else:
        for m in pm.modules():
            if hasattr(m, "scaling"):
                monkeypatch.setitem(m.scaling, "default", 1.0)
    assert not torch.allclose(_run(pm, x, folded=True)[0], ref[0], rtol=1e-3, atol=1e-3)


def test_bf16_autocast_is_as_close_to_float64_as_peft():
    """Under bf16 autocast with the input casts off (train_local's setting): against the same
    forward in float64 (peft's path, the same masks), the folded path's errors are bf16's — within
    twice peft's own bf16 path's."""
    pm64 = _toy().double()
    x = torch.randn(512, 24, dtype=torch.float64)
    exact = _run(pm64, x, folded=False)
    pm = _bf16_base(_toy())

    def bf16(folded):
        with torch.autocast("cpu", dtype=torch.bfloat16), lora_input_casts_off(pm):
            return _run(pm, x.bfloat16(), folded)

    ref, ours = bf16(False), bf16(True)

    for i in (0, 1):
        assert _err(ours[i], exact[i]) <= 2 * _err(ref[i], exact[i]) + 1e-4
        assert _err(ours[i], exact[i]) < 2**-6
    for k in exact[2]:
        assert _err(ours[2][k], exact[2][k]) <= 2 * _err(ref[2][k], exact[2][k]) + 1e-4, k
    assert torch.equal(ours[3], ref[3])


def test_dora_and_merged_layers_keep_pefts_forward_bit_for_bit():
    pm = _toy(dora=True)
    x = torch.randn(32, 24)
    ref, ours = _run(pm, x, folded=False), _run(pm, x, folded=True)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    plain = _toy()
    layer = plain.base_model.model[0]
    layer.merge()
    with torch.no_grad():
        torch.manual_seed(1)
        a = layer(x)
        torch.manual_seed(1)
        b = train_forward(layer, x)
    assert torch.equal(a, b)


def test_installed_for_the_block_only_and_others_forwards_left_alone():
    pm = _toy()
    first, second = pm.base_model.model[0], pm.base_model.model[2]
    hooked = lambda x: x * 0
    second.forward = hooked
    with pytest.raises(RuntimeError, match="boom"), folded_scales(pm):
        assert first.forward.__func__ is train_forward
        assert second.forward is hooked
        raise RuntimeError("boom")
    assert "forward" not in vars(first) and second.forward is hooked


def test_a_16_bit_base_without_autocast_casts_the_adapters_input_as_peft_does():
    pm = _bf16_base(_toy())
    x = torch.randn(64, 24).bfloat16()
    ref, ours = _run(pm, x, folded=False), _run(pm, x, folded=True)
    assert ours[0].dtype == ref[0].dtype == torch.bfloat16
    assert _err(ours[0], ref[0]) < 2**-8 and _err(ours[1], ref[1]) < 2**-7


def test_train_local_runs_every_lora_layer_folded_and_takes_it_off_after(monkeypatch):
    from test_training import (  # the training tests' tiny LoRA model and dataset
        DS,
        _tiny_lora,
    )

    import fedtune.lora_forward as lf
    from fedtune.adapters import trainable_parameters
    from fedtune.config import TrainConfig
    from fedtune.training import BatchStream, make_optimizer, train_local

    pm, _ = _tiny_lora(dropout=0.1)
    calls = []
    monkeypatch.setattr(lf, "train_forward", lambda self, x, *a, **k: calls.append(self) or train_forward(self, x, *a, **k))
    data, cfg = DS(8, seed=3), TrainConfig(batch_size=4, lr=1e-3)
    train_local(pm, data, BatchStream(data.lengths, 4, 11, True), make_optimizer([p for _, p in trainable_parameters(pm)], cfg),
                cfg, steps=1, start_step=0, total_steps=1, pad_id=0, device=torch.device("cpu"))
    layers = lf._lora_linears(pm)
    assert layers and {id(m) for m in calls} == {id(m) for m in layers}
    assert not any("forward" in vars(m) for m in layers)
