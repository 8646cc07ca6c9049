"""The FLOP count behind model FLOP utilisation, against torch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedtune.adapters import attach_adapter
from fedtune.config import ModelConfig, PeftConfig
from fedtune.flops import step_flops
from fedtune.head_loss import ROW_MULTIPLE, fused_head_supported
from fedtune.models import load_model
from fedtune.training import IGNORE, lm_loss

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model(ModelConfig(name="tiny-llama"))
    model.set_attn_implementation("eager")  # attention as plain bmm, which torch's counter sees
    torch.manual_seed(0)
    return attach_adapter(model, PeftConfig(method="lora", r=4, dropout=0.0, target_modules=list(TARGETS)))


@pytest.mark.parametrize("length, prompt", [(11, 4), (7, 1)])
@pytest.mark.parametrize("label_logits", [True, False])
def test_step_flops_match_torchs_flop_counter(tiny, length, prompt, label_logits):
    """One example (no padding), forward + backward of fedtune's loss: torch counts what ran
    (dense attention, so the formula is asked for attention="full")."""
    ids = torch.randint(3, 100, (1, length))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    tiny.train()
    fused_head_supported(tiny)  # its one-time probe runs the model: not part of the step counted
    with FlopCounterMode(display=False) as fc:
        lm_loss(tiny, batch, label_logits).backward()
    tiny.zero_grad(set_to_none=True)
    head = (length - prompt) if label_logits else length  # positions predicting a labelled token / all
    if label_logits:  # the chunked LM head pads its rows to a multiple of ROW_MULTIPLE; torch counts them
        head = -(-head // ROW_MULTIPLE) * ROW_MULTIPLE
    want = step_flops(tiny.config, [length], head, lora_r=4, lora_targets=TARGETS, attention="full")["total"]
    # rotary's inv_freq x positions product is the only matmul outside the formula (2*8*L per layer)
    assert fc.get_total_flops() == pytest.approx(want, abs=2 * 8 * length * tiny.config.num_hidden_layers * 2)


def test_causal_attention_counts_the_lower_triangle_and_padding_is_free():
    from types import SimpleNamespace

    c = SimpleNamespace(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=1, vocab_size=10, head_dim=4)
    full = step_flops(c, [3], 0, lora_r=1, lora_targets=(), attention="full")["attention"]
    causal = step_flops(c, [3], 0, lora_r=1, lora_targets=(), attention="causal")["attention"]
    # per head: QK^T and AV over 3x3 (full) or 6 (causal) query-key pairs, 2*hd FLOPs each, x3 with backward
    assert full == 1 * 2 * 2 * (2 * 9 * 4) * 3 and causal == full * 6 / 9
    # base linears: 2*L*in*out forward; backward input grads except q, k, v of block 0
    base = step_flops(c, [3], 0, lora_r=1, lora_targets=())["base"]
    fwd = 2 * 3 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 8 * 16 + 8 * 16 + 16 * 8)
    assert base == fwd + 2 * 3 * (8 * 8 + 8 * 16 + 8 * 16 + 16 * 8)
    with pytest.raises(ValueError, match="causal or full"):
        step_flops(c, [3], 0, lora_r=1, lora_targets=(), attention="sparse")
