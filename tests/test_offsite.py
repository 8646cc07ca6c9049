"""Offsite tuning through the real run path: FedOT and LocalOT in simulation on a tiny 8-block model,
what a client holds (exactly the adapter and the kept middle blocks; nothing of the dropped ones),
the bytes of the one-time emulator, exact resume (with distillation and FedBiOT re-alignment too),
``fedtune eval`` both ways with the gap, the exported plug-in model, and bad input."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import fedtune.run as fr
from fedtune.cli import main
from fedtune.config import load_config
from fedtune.offsite import emulator as E
from fedtune.run import run

from test_e2e import _write_data, crash_then_resume


def make_tiny_dir(path, layers=8, seed=5):
    """A tiny random Llama with ``layers`` blocks saved as a Hugging Face directory (with SmolLM2's
    tokenizer): a 'full model' deep enough to drop blocks from."""
    import transformers

    from fedtune.config import ModelConfig
    from fedtune.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="smollm2-135m-instruct"))
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offsite")
    model = make_tiny_dir(tmp / "llama8")
    data = _write_data(tmp / "toy.jsonl", n_per_cat=10)
    args = ["seed=3", f"model.name={model}", f"data.source={data}", "data.splitter=meta", "data.num_clients=3",
            "data.label_field=category", "data.max_length=48", "data.val_fraction=0.2", "data.test_fraction=0.1",
            f"data.cache_dir={tmp / 'tok'}", "train.lr=0.01", "train.batch_size=2", "train.local_steps=1",
            "fl.rounds=2", "eval.every=0", "eval.splits=[val]", "checkpoint.every=1", "output.tensorboard=false",
            "output.progress=false", "offsite.enabled=true", "offsite.drop=0.5", "offsite.bottom=1", "offsite.top=1",
            "offsite.chunk_mb=1", f"offsite.cache_dir={tmp / 'emulators'}"]
    return SimpleNamespace(tmp=tmp, model=model, data=data, args=args)


def _run_capturing(cfg):
    """``run(cfg)``, keeping what ``_build`` made (the server's and the clients' models)."""
    built = {}
    real = fr._build
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fr, "_build", lambda *a, **k: built.setdefault("b", real(*a, **k)))
        res = run(cfg, verbose=False)
    return res, built["b"]


@pytest.fixture(scope="module")
def fedot(base):
    res, b = _run_capturing(load_config(None, [*base.args, f"output.dir={base.tmp / 'fedot'}"]))
    return SimpleNamespace(res=res, b=b, rows=[r for r in res.rows if r["kind"] == "round"])


def _adapters(run_dir):
    return {str(f.relative_to(run_dir)): load_file(str(f)) for f in sorted(run_dir.glob("adapter*/**/offsite_adapter.safetensors"))}


def test_clients_hold_exactly_the_adapter_and_the_kept_blocks(fedot):
    b = fedot.b
    srv = b.roles.srv
    plan, layout = srv.plan, srv.layout
    client = b.rt.model
    assert client is not srv.emulator and client is not srv.full
    full_p, got = E.plain_params(srv.full), E.plain_params(client)
    # 8 blocks, adapter 1 + 1: M = 6 middle, k = round(3.0) = 3, stride 2.5: middle 0, round(2.5) = 2, 5
    assert len(E.blocks_of(client, layout)) == plan.emulator_layers == 1 + 3 + 1 and plan.kept == (1, 3, 6)
    trainable = {E.plain_name(n) for n, p in client.named_parameters() if p.requires_grad}
    assert {E.block_index(n, layout) for n in trainable} == {0, 4}  # the two adapter blocks, nothing else
    for n, p in got.items():
        j = E.block_index(n, layout)
        if j is None:  # embeddings, final norm: the full model's, frozen
            assert torch.equal(p, full_p[n]) and n not in trainable
        elif j in plan.middle_blocks():  # a kept middle block: an exact copy of its source block
            assert torch.equal(p, full_p[E.renumber(n, layout, plan.source(j))]) and n not in trainable
    # nothing of a dropped block is anywhere in the client's model
    dropped = [p for n, p in full_p.items() if E.block_index(n, layout) in plan.dropped and p.dim() == 2]
    assert len(dropped) == 3 * 7
    assert not any(d.shape == p.shape and torch.equal(d, p) for d in dropped for p in got.values())
    # and the client's weights are its own memory, filled from the bytes it was sent
    full_ptrs = {p.data_ptr() for p in srv.full.parameters()} | {p.data_ptr() for p in srv.emulator.parameters()}
    assert not full_ptrs & {p.data_ptr() for p in client.parameters()}
    assert b.algorithm.client.loaded[1] == srv.hash


def test_the_emulator_is_sent_once_per_client_and_counted(fedot, base):
    srv = fedot.b.roles.srv
    r1, r2 = fedot.rows[0], fedot.rows[1]
    assert r1["round"] == 1 and r1["emulator_clients"] == 3 and r1["emulator_bytes"] == 3 * srv.size
    assert r1["bytes_down"] > 3 * srv.size  # the chunk messages themselves, counted in the round
    assert r2["emulator_clients"] == 0 and r2["emulator_bytes"] == 0 and r2["bytes_down"] < srv.size / 4
    assert srv.size > 1 << 20  # several chunks of offsite.chunk_mb=1
    store = fedot.res.run_dir / "state" / "emulator"
    assert (store / f"{srv.hash}.safetensors").stat().st_size == srv.size
    assert sorted(p.name for p in (store / "holders").iterdir()) == ["alpha", "beta", "gamma"]
    # the server's own emulator is the clients' model: the same held-out loss as theirs
    assert r2["emulator_val_loss"] == pytest.approx(r2["val_loss"], rel=1e-6)
    assert "plugin_val_loss" in r2 and r2["offsite_gap_val"] == pytest.approx(
        r2["emulator_val_loss"] - r2["plugin_val_loss"])


def test_fedot_resumes_bit_for_bit(fedot, base, monkeypatch):
    resumed = crash_then_resume(monkeypatch, load_config(None, [*base.args, f"output.dir={base.tmp / 'fedot-c'}"]),
                                base.tmp / "fedot-c", 2)
    a, b = _adapters(fedot.res.run_dir), _adapters(resumed.run_dir)
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    # after the restart each client was asked whether it holds the emulator, and none was sent it again
    row2 = [r for r in resumed.rows if r["kind"] == "round" and r["round"] == 2][0]
    assert row2["emulator_clients"] == 0


def test_fedtune_eval_scores_emulator_and_plugin_and_the_exported_model_is_the_plugin(fedot, base, capsys):
    run_dir = fedot.res.run_dir
    out = base.tmp / "eval"
    assert main(["eval", str(run_dir), "--tasks", "heldout", "heldout.split=val", "-q", "--out", str(out)]) == 0
    rep = json.loads((out / "results.json").read_text())
    score = {t["label"]: t["results"]["heldout"]["score"] for t in rep["targets"]}
    assert set(score) == {"emulator", "plugin"}
    last = fedot.rows[-1]
    assert score["emulator"] == pytest.approx(last["val_loss"], rel=1e-5)  # what the clients measured
    assert score["plugin"] == pytest.approx(last["plugin_val_loss"], rel=1e-5)
    (gap,) = rep["offsite_gap"]
    assert gap["gap"] == pytest.approx(score["emulator"] - score["plugin"])
    assert "emulator vs plug-in" in (out / "results.md").read_text()

    exp = base.tmp / "exported"
    assert main(["offsite", "export", str(run_dir), "--out", str(exp)]) == 0
    from transformers import AutoModelForCausalLM

    from fedtune.eval.targets import ModelCache, open_target, resolve_targets

    plain = AutoModelForCausalLM.from_pretrained(str(exp)).eval()
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    (plugin,) = resolve_targets(str(run_dir), offsite="plugin").targets
    with torch.no_grad(), open_target(plugin, ModelCache()) as (m, _, _):
        want = m(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, want)


def test_localot_keeps_one_lora_adapter_per_client(base):
    res = run(load_config(None, [*base.args, "fl.scenario=local", "offsite.train=lora", "peft.r=2",
                                 f"output.dir={base.tmp / 'localot'}"]), verbose=False)
    dirs = sorted(p.name for p in (res.run_dir / "adapters").iterdir())
    assert dirs == ["alpha", "beta", "gamma"] and not (res.run_dir / "adapter").exists()
    sd = load_file(str(res.run_dir / "adapters" / "alpha" / "offsite_adapter.safetensors"))
    assert sd and all("lora_" in k for k in sd)  # LoRA on the adapter blocks only: small messages
    clients = [r for r in res.rows if r["kind"] == "client" and r["round"] == 2]
    assert all("plugin_val_loss" in r and "emulator_val_loss" in r for r in clients)
    from fedtune.eval.targets import resolve_targets

    labels = [t.label for t in resolve_targets(str(res.run_dir)).targets]
    assert labels == [f"{k}:client:{c}" for c in ("alpha", "beta", "gamma") for k in ("emulator", "plugin")]


def test_fedbiot_variant_distills_once_realigns_and_resumes_bit_for_bit(base, monkeypatch):
    """LoRA on the adapter blocks, the emulator distilled before federation (cached: a second run
    does not distill again) and re-aligned every round; a resumed run lands on the same adapter
    and re-alignment."""
    from fedtune.offsite import distill as D

    calls = []
    real = D.distill
    monkeypatch.setattr(D, "distill", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = [*base.args, "offsite.train=lora", "peft.r=2", "offsite.distill.steps=2", "offsite.realign.steps=1",
            f"offsite.distill.source={base.data}", f"offsite.realign.source={base.data}",
            "offsite.distill.max_records=12", "offsite.realign.max_records=12", "offsite.distill.batch_size=2",
            "offsite.realign.batch_size=2", "offsite.realign.lm_weight=0"]  # KD only: no LM head in re-alignment
    straight = run(load_config(None, [*args, f"output.dir={base.tmp / 'bi'}"]), verbose=False)
    assert calls == [1]
    rows = [r for r in straight.rows if r["kind"] == "round"]
    assert all(r.get("realign_kd", 0) > 0 and r["realign_lm"] == 0 for r in rows)
    resumed = crash_then_resume(monkeypatch, load_config(None, [*args, f"output.dir={base.tmp / 'bi-c'}"]),
                                base.tmp / "bi-c", 2)
    assert calls == [1]  # both set-ups of the second run took the distilled emulator from the cache
    for f in ("offsite_adapter.safetensors", "offsite_realign.safetensors"):
        a = load_file(str(straight.run_dir / "adapter" / f))
        c = load_file(str(resumed.run_dir / "adapter" / f))
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), f
    meta = json.loads((straight.run_dir / "adapter" / "fedtune_offsite.json").read_text())
    assert meta["emulator"]["distilled"] is True
    # the clients trained on the re-aligned emulator the server holds: the same held-out loss
    last = rows[-1]
    assert last["emulator_val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)


# ---- bad input: one error line, exit 2, nothing written ----------------------------------------
@pytest.mark.parametrize("over, message", [
    (["offsite.bottom=4", "offsite.top=4"], "leave no middle block"),
    (["offsite.drop=0.95"], "drops all 6 middle blocks"),
    (["offsite.distill.steps=1", "offsite.distill.source=/nonexistent/public.jsonl"], "offsite.distill.source"),
    (["offsite.train=lora", "peft.method=prefix"], "peft.method=lora"),
    (["offsite.dorp=0.5"], "did you mean 'drop'"),
])
def test_bad_offsite_input_is_one_clear_error_before_any_work(base, tmp_path, capsys, over, message):
    out = tmp_path / "never"
    assert main(["run", str(_cfg(tmp_path)), *base.args, *over, f"output.dir={out}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # after any data warnings
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()


def _cfg(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return p


def test_an_architecture_without_a_layout_entry_is_refused(base, tmp_path, capsys, monkeypatch):
    from fedtune.models import layout

    monkeypatch.delitem(layout.LAYOUTS, "llama")
    out = tmp_path / "never"
    assert main(["run", str(_cfg(tmp_path)), *base.args, f"output.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "fedtune.models.layout.LAYOUTS" in err and "'llama'" in err and not out.exists()


def test_plugin_evaluation_without_the_full_model_is_refused(fedot, tmp_path, capsys):
    assert main(["eval", str(fedot.res.run_dir), "--tasks", "heldout", "--base", str(tmp_path / "gone"),
                 "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "plug-in evaluation needs the full model" in err and not (tmp_path / "ev").exists()
