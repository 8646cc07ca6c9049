"""Base models of other families than SmolLM2 (issue 13, items 11-14), on tiny local models whose
tokenizers add a BOS token and whose chat templates end a turn with their own token:

* ``llama3-style``: Llama architecture, ``<|begin_of_text|>`` BOS, ``<|end_of_text|>`` EOS, turns
  ended by ``<|eot_id|>``;
* ``gemma-style``: Gemma architecture, ``<bos>``/``<eos>``, turns ended by ``<end_of_turn>``.

Both are built here (a byte-level BPE trained on a few sentences, a 1-layer model) and saved as
ordinary Hugging Face directories, which is how a user brings their own model.
"""

import json
import logging
from pathlib import Path

import pytest
import torch

from fedtune.config import DataConfig, ModelConfig, PeftConfig
from fedtune.data import Record, encode_example, get_template, template_from_dict, tokenize_records
from fedtune.data.templates import chat_turn_end, special_prefix
from fedtune.models import load_model

CORPUS = ["the quick brown fox jumps over the lazy dog", "say apple three times: apple apple apple",
          "Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.", "### Instruction:", "### Response:", "user assistant model system", "0123456789"] * 3

FAMILIES = {
    "llama3-style": dict(
        arch="LlamaConfig", bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, turn_end="<|eot_id|>",
        extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        template="{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "gemma-style": dict(
        arch="GemmaConfig", bos="<bos>", eos="<eos>", pad="<pad>", turn_end="<end_of_turn>",
        extra=["<start_of_turn>", "<end_of_turn>"],
        template="{{ bos_token }}{% for m in messages %}<start_of_turn>"
                 "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
                 "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
}


def build_family(name: str, out: Path) -> Path:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    f = FAMILIES[name]
    specials = [t for t in (f["bos"], f["eos"], f["pad"]) if t] + f["extra"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos_id = tk.token_to_id(f["bos"])
    tk.post_processor = processors.TemplateProcessing(single=f"{f['bos']} $A", pair=f"{f['bos']} $A {f['bos']} $B",
                                                      special_tokens=[(f["bos"], bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=f["bos"], eos_token=f["eos"], pad_token=f["pad"],
                                  additional_special_tokens=f["extra"])
    tok.chat_template = f["template"]
    dims = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=bos_id,
                eos_token_id=tk.token_to_id(f["eos"]), pad_token_id=tk.token_to_id(f["pad"]) if f["pad"] else None)
    if f["arch"] == "GemmaConfig":
        dims["head_dim"] = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(getattr(transformers, f["arch"])(**dims))
    d = out / name
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root) for name in FAMILIES}


@pytest.fixture(scope="module")
def loaded(family_dirs):
    return {name: load_model(ModelConfig(name=str(d))) for name, d in family_dirs.items()}


LONG = Record("Say apple " + "again and again " * 40, "", "apple apple", "")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokenizer_facts_the_tests_rely_on(loaded, family):
    """Sanity of the fixtures (expected values from how they were built, not from fedtune)."""
    _, tok = loaded[family]
    f = FAMILIES[family]
    assert tok("apple", add_special_tokens=True)["input_ids"][0] == tok.convert_tokens_to_ids(f["bos"])
    assert tok.convert_tokens_to_ids(f["turn_end"]) != tok.eos_token_id
    assert special_prefix(tok) == [tok.convert_tokens_to_ids(f["bos"])]
    assert chat_turn_end(tok) == [tok.convert_tokens_to_ids(f["turn_end"])]


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_truncation_keeps_the_bos(loaded, tmp_path, family, template):
    """Item 11: an overlong prompt cut from the left still starts with the tokenizer's BOS (for
    alpaca the tokenizer adds it, for chat the template writes it), then a tail of the prompt,
    then the whole response."""
    _, tok = loaded[family]
    bos = tok.bos_token_id
    tpl = get_template(template)
    full_prompt = tok(tpl.prompt(LONG, tok), add_special_tokens=tpl.add_special_tokens)["input_ids"]
    response = tok(LONG.output, add_special_tokens=False)["input_ids"] + tpl.end_ids(tok)
    assert full_prompt[0] == bos and len(full_prompt) + len(response) > 64
    for ids, labels in [encode_example(LONG, tok, template, 64),
                        (lambda ds: (ds.input_ids[0], ds.labels[0]))(tokenize_records(
                            [LONG], tok, DataConfig(template=template, max_length=64, cache_dir=str(tmp_path))))]:
        assert len(ids) == 64 and ids[0] == bos and ids.count(bos) == 1
        body = ids[1 : 64 - len(response)]
        assert ids[64 - len(response):] == response and labels[64 - len(response):] == response
        assert full_prompt[len(full_prompt) - len(body):] == body  # a tail of the prompt
        assert labels[: 64 - len(response)] == [-100] * (64 - len(response))


def test_a_tokenizer_without_bos_is_cut_as_before(loaded):
    """SmolLM2's tokenizer (tiny-llama's) adds nothing: no prefix is kept apart."""
    _, tok = load_model(ModelConfig(name="tiny-llama"))
    assert special_prefix(tok) == []
    ids, _ = encode_example(LONG, tok, "alpaca", 32)
    full = tok(get_template("alpaca").prompt(LONG), add_special_tokens=True)["input_ids"]
    assert len(ids) == 32 and ids[0] != full[0]  # the prompt's start is gone, no special token kept


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_responses_end_with_the_formats_end_of_turn(loaded, tmp_path, family):
    """Item 12: with data.template=chat the response's last label is the end-of-turn token (the
    model learns to end its turn), not EOS; with alpaca it stays EOS."""
    _, tok = loaded[family]
    eot = tok.convert_tokens_to_ids(FAMILIES[family]["turn_end"])
    rec = Record("Say apple", "", "apple apple", "")
    for template, last in (("chat", eot), ("alpaca", tok.eos_token_id)):
        ids, labels = encode_example(rec, tok, template, 128)
        assert labels[-1] == last and ids[-1] == last and eot not in labels[:-1]
        # the rendered conversation agrees: what the template writes after the answer starts so
    text = tok.apply_chat_template([{"role": "user", "content": "Say apple"},
                                    {"role": "assistant", "content": "apple apple"}], tokenize=False)
    assert FAMILIES[family]["turn_end"] in text.split("apple apple", 1)[1][:20]


def test_smollm2_chatml_ends_with_im_end():
    _, tok = load_model(ModelConfig(name="tiny-llama"))  # SmolLM2's tokenizer: ChatML
    assert chat_turn_end(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_stops_at_the_end_of_turn(loaded, family):
    """Item 12, generation: with the chat template the engine stops at the end-of-turn token. A
    hook makes the model prefer that token at every step, so greedy decoding emits it first."""
    from fedtune.eval.engine import Engine, GenRequest
    from fedtune.eval.runner import stop_token_ids

    model, tok = loaded[family]
    eot = tok.convert_tokens_to_ids(FAMILIES[family]["turn_end"])

    def prefer_eot(module, inputs, output):
        output = output.clone()
        output[..., eot] += 1e4
        return output

    handle = model.lm_head.register_forward_hook(prefer_eot)
    try:
        tpl = get_template("chat")
        prompt = tpl.prompt(Record("Say apple", "", "", ""), tok)
        chat = Engine(model, tok, progress=False, add_special_tokens=False, stop_token_ids=stop_token_ids(tpl, tok))
        plain = Engine(model, tok, progress=False, add_special_tokens=False, stop_token_ids=stop_token_ids(None, tok))
        (g_chat,), (g_plain,) = chat.generate([GenRequest(prompt, 5)]), plain.generate([GenRequest(prompt, 5)])
    finally:
        handle.remove()
    assert (g_chat.finish, g_chat.num_tokens, g_chat.text) == ("eos", 1, "")
    assert (g_plain.finish, g_plain.num_tokens) == ("length", 5)


def test_the_template_saved_with_the_adapter_still_round_trips(loaded):
    _, tok = loaded["gemma-style"]
    saved = json.loads(json.dumps(get_template("chat").to_dict()))
    assert saved == {"name": "chat", "system": None, "separator": "\n\n"}  # the fedtune_template.json format
    again = template_from_dict(saved)
    assert again.end_ids(tok) == [tok.convert_tokens_to_ids("<end_of_turn>")]


# ---------------------------------------------------------------------------------------------
# item 13: model types missing from the architecture table


def _targets(pm) -> set[str]:
    return set(pm.peft_config["default"].target_modules)


@pytest.mark.parametrize("arch, row", [("tiny-llama", "llama"), ("tiny-gpt2", "gpt2"), ("tiny-opt", "opt")])
def test_detection_finds_what_the_table_says(arch, row, monkeypatch, caplog):
    """With its row removed, a known architecture's targets are detected equal to the row."""
    from fedtune.adapters import attach_adapter
    from fedtune.models import arch as arch_mod

    expected = arch_mod.ARCHITECTURES[row]
    monkeypatch.delitem(arch_mod.ARCHITECTURES, row)
    model, _ = load_model(ModelConfig(name=arch))
    with caplog.at_level(logging.WARNING, logger="fedtune.models.arch"):
        info = arch_mod.detect_arch(model)
        pm = attach_adapter(model, PeftConfig(r=2))
    assert set(info.lora_targets) == set(expected.lora_targets) and info.layers == expected.layers
    assert _targets(pm) == set(expected.lora_targets)
    said = [r.getMessage() for r in caplog.records if "not in fedtune's architecture table" in r.getMessage()]
    assert said and all(t in said[0] for t in expected.lora_targets) and expected.layers in said[0]


def _tiny_of_type(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **extra)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type, extra, expected", [
    # names as the architectures define them (modeling_<type>.py): attention and MLP projections
    ("exaone4", {}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("persimmon", {}, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    # an MoE block: the shared expert's projections, never the router
    ("llama4_text", {"num_local_experts": 2, "intermediate_size_mlp": 64, "head_dim": 8},
     {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_unknown_types_get_their_projections(model_type, extra, expected):
    from fedtune.adapters import attach_adapter, trainable_parameters
    from fedtune.models.arch import ARCHITECTURES

    assert model_type not in ARCHITECTURES
    model = _tiny_of_type(model_type, **extra)
    model.requires_grad_(False)
    pm = attach_adapter(model, PeftConfig(r=2))
    assert _targets(pm) == expected
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable_parameters(pm))


# ---------------------------------------------------------------------------------------------
# item 14: fp16 loss scale


def test_grad_scaler_starts_where_configured_and_resumes_its_state():
    from types import SimpleNamespace

    from fedtune.errors import FedtuneError
    from fedtune.training import make_grad_scaler

    default = make_grad_scaler(SimpleNamespace(), "cpu")
    assert default.get_scale() == 1024.0 and default.get_growth_interval() == 2000
    mine = make_grad_scaler(SimpleNamespace(fp16_init_scale=8.0, fp16_growth_interval=7), "cpu")
    assert mine.get_scale() == 8.0 and mine.get_growth_interval() == 7
    resumed = make_grad_scaler(SimpleNamespace(fp16_init_scale=8.0), "cpu", {**mine.state_dict(), "scale": 256.0})
    assert resumed.get_scale() == 256.0  # the client's learned scale wins over the starting value
    for bad in (0, -1.0, float("inf"), float("nan"), 2.0**30, "big"):
        with pytest.raises(FedtuneError, match="train.fp16_init_scale"):
            make_grad_scaler(SimpleNamespace(fp16_init_scale=bad), "cpu")
    with pytest.raises(FedtuneError, match="train.fp16_growth_interval"):
        make_grad_scaler(SimpleNamespace(fp16_growth_interval=0), "cpu")


def test_round_table_says_when_every_step_was_skipped():
    from fedtune.report import round_table

    both = round_table(3, {"train_loss": None}, [{"client": "a", "steps": 4, "skipped_nonfinite": 4},
                                                  {"client": "b", "steps": 4, "skipped_nonfinite": 4}])
    assert "skipped" in both.strip().splitlines()[1] and "4/4" in both and "8/8" in both
    assert "every local step of round 3 was skipped as non-finite" in both and "train.fp16_init_scale" in both
    one = round_table(3, {}, [{"client": "a", "steps": 4, "skipped_nonfinite": 4},
                              {"client": "b", "steps": 4, "skipped_nonfinite": 1}])
    assert "1 of 2 clients (a) skipped every local step of round 3" in one and "1/4" in one
    fine = round_table(3, {}, [{"client": "a", "steps": 4, "skipped_nonfinite": 0}])
    assert "skipped" not in fine and "warning" not in fine


@pytest.mark.parametrize("family", ["gemma-style"])
def test_fp16_run_of_another_family(family_dirs, tmp_path, capsys, family):
    """A real run (fp16 on CPU, chat template, a Gemma-style model): with a starting scale of 2^24
    the scaled gradients overflow fp16 and both local steps of round 1 are skipped, which the
    round table says, and the run fails as one that trained nothing; with the default start
    nothing is skipped."""
    from fedtune.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say apple {i}", "input": "", "output": "apple " * (1 + i % 3),
                                        "category": "ab"[i % 2]}) + "\n" for i in range(24)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model: {{name: {family_dirs[family]}}}
data: {{source: {data}, splitter: meta, num_clients: 2, label_field: category, max_length: 48, template: chat,
        val_fraction: 0.1, test_fraction: 0.1, cache_dir: {tmp_path / 'tok'}}}
peft: {{method: lora, r: 2}}
train: {{lr: 0.01, batch_size: 2, local_steps: 2, precision: fp16}}
fl: {{rounds: 1}}
eval: {{every: 0}}
output: {{progress: false, tensorboard: false}}
""")
    runs = {}
    for name, scale in (("high", 2.0**24), ("default", None)):
        extra = [f"train.fp16_init_scale={scale}"] if scale else []
        assert main(["run", str(cfg), f"output.dir={tmp_path / name}", *extra]) == (2 if scale else 0)
        captured = capsys.readouterr()
        runs[name], runs[name + "_err"] = captured.out, captured.err
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name + "_skipped"] = [r["skipped_nonfinite"] for r in rows if r["kind"] == "round" and r["round"] == 1]
    assert runs["high_skipped"] == [4] and "every local step of round 1 was skipped" in runs["high"]
    assert "nothing was trained" in runs["high_err"] and "fp32 or bf16" in runs["high_err"]
    assert runs["default_skipped"] == [0] and "skipped as non-finite" not in runs["default"]
    tpl = json.loads((tmp_path / "default" / "adapter" / "fedtune_template.json").read_text())
    assert tpl["name"] == "chat"


def test_chatml_turn_opener_named_bos_is_not_kept_apart():
    """SmolLM2 names ``<|im_start|>`` its BOS, but it opens every turn: a truncated ChatML prompt is
    cut like any other (what is kept is a tail of the prompt, ending with the assistant header)."""
    _, tok = load_model(ModelConfig(name="tiny-llama"))
    tpl = get_template("chat")
    full = tok(tpl.prompt(LONG, tok), add_special_tokens=False)["input_ids"]
    assert full[0] == tok.bos_token_id and full.count(tok.bos_token_id) >= 2
    ids, labels = encode_example(LONG, tok, "chat", 64)
    n_prompt = sum(1 for x in labels if x == -100)
    assert ids[:n_prompt] == full[len(full) - n_prompt:]
