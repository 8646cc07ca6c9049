import pytest
import torch

from fedtune.adapters import attach_adapter, get_adapter_state, set_adapter_state, trainable_parameters
from fedtune.config import ModelConfig, PeftConfig
from fedtune.errors import FedtuneError
from fedtune.models import TINY_MODELS, load_model
from fedtune.training import collate

METHODS = ["lora", "prefix", "p_tuning", "prompt_tuning"]


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_every_arch_and_peft_method_trains(arch, method):
    model, tok = load_model(ModelConfig(name=arch))
    assert tok.pad_token_id is not None
    pm = attach_adapter(model, PeftConfig(method=method, num_virtual_tokens=4, r=2))
    params = trainable_parameters(pm)
    assert params and all(p.dtype == torch.float32 for _, p in params)
    # only adapter tensors are trainable: far fewer than the base model
    n_train = sum(p.numel() for _, p in params)
    assert n_train < 0.5 * sum(p.numel() for p in pm.parameters())
    batch = collate([[5, 6, 7, 8], [5, 6]], [[-100, 6, 7, 8], [-100, 6]], tok.pad_token_id)
    out = pm(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params)
    # state swap round-trip
    st = get_adapter_state(pm)
    set_adapter_state(pm, {k: torch.zeros_like(v) for k, v in st.items()})
    set_adapter_state(pm, st)
    assert all(torch.equal(st[k], v) for k, v in get_adapter_state(pm).items())


def test_prompt_tuning_text_init_uses_token_embeddings():
    model, tok = load_model(ModelConfig(name="tiny-llama"))
    pm = attach_adapter(model, PeftConfig(method="prompt_tuning", num_virtual_tokens=3,
                                          prompt_init_text="Answer the question"), tok)
    ids = tok("Answer the question", add_special_tokens=False)["input_ids"][:3]
    emb = model.get_input_embeddings().weight[ids]
    (name, p), = trainable_parameters(pm)
    assert torch.allclose(p, emb)


def test_unknown_model_is_clear():
    with pytest.raises(FedtuneError, match="unknown model 'tiny-lama'.*did you mean 'tiny-llama'"):
        load_model(ModelConfig(name="tiny-lama"))


def test_set_adapter_state_rejects_mismatch():
    model, _ = load_model(ModelConfig(name="tiny-llama"))
    pm = attach_adapter(model, PeftConfig(r=2))
    st = get_adapter_state(pm)
    k = next(iter(st))
    bad = dict(st)
    bad[k] = torch.zeros(1)
    with pytest.raises(FedtuneError, match="shape"):
        set_adapter_state(pm, bad)


@pytest.mark.parametrize("arch,linear", [("tiny-llama", "q_proj"), ("tiny-gpt2", "c_attn")])
def test_lora_targets_that_match_nothing_are_clear(arch, linear):
    """peft's NoMatchingPeftModuleError/ValueError becomes one message listing the real layers."""
    model, _ = load_model(ModelConfig(name=arch))
    for bad in (["nosuch"], ["act_fn", "act"]):  # a missing name; a module LoRA cannot adapt
        with pytest.raises(FedtuneError) as e:
            attach_adapter(model, PeftConfig(target_modules=bad))
        msg = str(e.value)
        assert f"peft.target_modules = {bad}" in msg and linear in msg and "lm_head" in msg
