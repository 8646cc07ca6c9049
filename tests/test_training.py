import contextlib
import math

import numpy as np
import pytest
import torch

from fedtune.adapters import attach_adapter, get_adapter_state, set_adapter_state, trainable_parameters
from fedtune.config import ModelConfig, PeftConfig, TrainConfig
from fedtune.state import ClientStateStore, ClientState, optimizer_from_state, optimizer_to_state
from fedtune.training import BatchStream, collate, lr_factor, make_optimizer, train_local, IGNORE


class DS:
    def __init__(self, n=12, seed=0):
        g = np.random.default_rng(seed)
        self.input_ids, self.labels = [], []
        for i in range(n):
            L = int(g.integers(6, 20))
            ids = g.integers(10, 500, size=L).tolist()
            p = int(g.integers(1, L - 2))
            self.input_ids.append(ids)
            self.labels.append([IGNORE] * p + ids[p:])
        self.lengths = [len(x) for x in self.input_ids]

    def __len__(self):
        return len(self.input_ids)


def _tiny_lora(dropout: float, dtype: str = "float32"):
    """tiny-llama (base in ``dtype``) + LoRA r=4 with non-zero B (so gradients reach A too):
    ``(model, tokenizer)``."""
    from fedtune.models import load_model

    model, tok = load_model(ModelConfig(name="tiny-llama", dtype=dtype))
    torch.manual_seed(0)
    pm = attach_adapter(model, PeftConfig(r=4, dropout=dropout))
    with torch.no_grad():
        for n, p in trainable_parameters(pm):
            p.normal_(0, 0.02)
    return pm, tok


def _three_steps(pm, init, data, **train_cfg):
    """The adapter after 3 seeded steps of ``train_local`` from ``init`` (batch 4, lr 1e-2, plus ``train_cfg``)."""
    params = [p for _, p in trainable_parameters(pm)]
    set_adapter_state(pm, init)
    cfg = TrainConfig(batch_size=4, lr=1e-2, **train_cfg)
    torch.manual_seed(7)
    train_local(pm, data, BatchStream(data.lengths, 4, 11, True), make_optimizer(params, cfg), cfg, steps=3,
                start_step=0, total_steps=3, pad_id=0, device=torch.device("cpu"))
    return get_adapter_state(pm)


@pytest.fixture(scope="module")
def peft_model():
    return _tiny_lora(0.0)


def test_batch_stream_epochs_cover_every_example_once():
    lengths = list(range(5, 42))
    s = BatchStream(lengths, batch_size=4, seed=3, group_by_length=True)
    seen = []
    for _ in range(s.batches_per_epoch()):
        seen += next(s)
    assert sorted(seen) == list(range(len(lengths)))
    # length grouping: each batch spans a small length range compared to random batches
    s2 = BatchStream(lengths, batch_size=4, seed=3, group_by_length=True)
    b = next(s2)
    assert max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 * 4


def test_batch_stream_resumes_exactly():
    lengths = [7] * 10
    a = BatchStream(lengths, 3, seed=1)
    first = [next(a) for _ in range(5)]
    st = a.state()
    rest = [next(a) for _ in range(6)]
    assert st == {"epoch": 1, "pos": 1}  # 4 batches per epoch (the last one short), then 1 more
    assert sorted(i for batch in first[:4] for i in batch) == list(range(10))
    b = BatchStream(lengths, 3, seed=1, **st)
    assert [next(b) for _ in range(6)] == rest
    # a resumed stream goes on where it was; starting over would repeat the first batches
    fresh = BatchStream(lengths, 3, seed=1)
    assert [next(fresh) for _ in range(6)] != rest


def test_lr_schedule_continues_across_rounds():
    cfg = TrainConfig(scheduler="linear", warmup_steps=2, lr=1.0)
    total = 10
    f = [lr_factor(s, cfg, total) for s in range(total)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    # after warmup: 1 - (s-2)/8
    assert f[6] == pytest.approx(1 - 4 / 8)
    cos = TrainConfig(scheduler="cosine", lr=1.0)
    assert lr_factor(5, cos, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(3, TrainConfig(), 10) == 1.0


def test_collate_masks_from_lengths_not_pad_id():
    # pad id equal to a real token id (SmolLM2: pad == eos): that token must stay a label
    b = collate([[5, 2], [5, 6, 2]], [[IGNORE, 2], [IGNORE, 6, 2]], pad_id=2)
    assert b["labels"].tolist() == [[IGNORE, 2, IGNORE], [IGNORE, 6, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def _one_step(pm, init, data, bs, accum):
    set_adapter_state(pm, init)
    cfg = TrainConfig(optimizer="sgd", lr=0.5, batch_size=bs, grad_accum=accum, group_by_length=False,
                      max_grad_norm=None)
    opt = make_optimizer([p for _, p in trainable_parameters(pm)], cfg)
    stream = BatchStream(data.lengths, bs, seed=7, group_by_length=False)
    train_local(pm, data, stream, opt, cfg, steps=1, start_step=0, total_steps=1, pad_id=0,
                device=torch.device("cpu"))
    return get_adapter_state(pm)


def test_grad_accumulation_equals_big_batch(peft_model):
    pm, _ = peft_model
    init = get_adapter_state(pm)
    data = DS(8)
    big = _one_step(pm, init, data, bs=4, accum=1)
    acc = _one_step(pm, init, data, bs=2, accum=2)
    one = _one_step(pm, init, data, bs=1, accum=4)
    set_adapter_state(pm, init)
    moved = max((big[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-5
    for k in init:
        assert torch.allclose(big[k], acc[k], atol=1e-6, rtol=1e-4)
        assert torch.allclose(big[k], one[k], atol=1e-6, rtol=1e-4)


def test_nan_guard_skips_and_counts(peft_model):
    pm, _ = peft_model
    init = get_adapter_state(pm)
    data = DS(4)
    cfg = TrainConfig(lr=0.1, batch_size=2)
    opt = make_optimizer([p for _, p in trainable_parameters(pm)], cfg)
    stream = BatchStream(data.lengths, 2, seed=0)
    stats = train_local(pm, data, stream, opt, cfg, steps=3, start_step=0, total_steps=3, pad_id=0,
                        device=torch.device("cpu"), extra_loss=lambda m: torch.tensor(float("nan")))
    assert stats.skipped_nonfinite == 3 and stats.steps == 3
    after = get_adapter_state(pm)
    assert all(torch.equal(after[k], init[k]) for k in init)


def test_bf16_autocast_keeps_fp32_adapter(peft_model):
    pm, _ = peft_model
    init = get_adapter_state(pm)
    data = DS(4)
    cfg = TrainConfig(lr=1e-3, batch_size=2, precision="bf16")
    opt = make_optimizer([p for _, p in trainable_parameters(pm)], cfg)
    stats = train_local(pm, data, BatchStream(data.lengths, 2, seed=0), opt, cfg, steps=2, start_step=0,
                        total_steps=2, pad_id=0, device=torch.device("cpu"))
    assert math.isfinite(stats.loss) and stats.skipped_nonfinite == 0
    assert all(p.dtype == torch.float32 for _, p in trainable_parameters(pm))
    set_adapter_state(pm, init)


def test_optimizer_state_roundtrip_continues_identically(peft_model, tmp_path):
    pm, _ = peft_model
    init = get_adapter_state(pm)
    data = DS(6)
    cfg = TrainConfig(lr=1e-2, batch_size=2)
    params = [p for _, p in trainable_parameters(pm)]

    def run(steps, opt, stream):
        train_local(pm, data, stream, opt, cfg, steps=steps, start_step=0, total_steps=10, pad_id=0,
                    device=torch.device("cpu"))

    # uninterrupted: 4 steps
    set_adapter_state(pm, init)
    opt = make_optimizer(params, cfg)
    run(4, opt, BatchStream(data.lengths, 2, seed=1))
    straight = get_adapter_state(pm)
    # 2 steps, store everything off the model (disk), restore into a new optimizer, 2 more
    set_adapter_state(pm, init)
    opt = make_optimizer(params, cfg)
    s = BatchStream(data.lengths, 2, seed=1)
    run(2, opt, s)
    store = ClientStateStore(tmp_path)
    st = ClientState()
    t, meta = optimizer_to_state(opt)
    st.set_group("opt", t)
    st.set_group("adapter", get_adapter_state(pm))
    st.meta.update(opt=meta, stream=s.state())
    store.put("c0", st)
    set_adapter_state(pm, init)  # clobber
    back = store.get("c0")
    set_adapter_state(pm, back.group("adapter"))
    opt2 = make_optimizer(params, cfg)
    optimizer_from_state(opt2, back.group("opt"), back.meta["opt"])
    run(2, opt2, BatchStream(data.lengths, 2, seed=1, **back.meta["stream"]))
    resumed = get_adapter_state(pm)
    set_adapter_state(pm, init)
    for k in init:
        assert torch.equal(straight[k], resumed[k])


def test_state_store_handles_awkward_client_names(tmp_path):
    from fedtune.utils import safe_name

    names = ["C#", "C_", "X86-64 Assembly", "a/b", "..", "plain"]
    assert len({safe_name(n) for n in names}) == len(names)
    assert safe_name("plain") == "plain"
    for root in (tmp_path / "disk", None):
        store = ClientStateStore(root)
        for i, n in enumerate(names):
            store.put(n, ClientState(tensors={"x": torch.tensor([float(i)])}, meta={"n": n}))
        snap = tmp_path / f"snap{root is None}"
        store.snapshot(snap)
        store2 = ClientStateStore(tmp_path / "disk2" if root else None)
        store2.restore(snap)
        for i, n in enumerate(names):
            assert store2.get(n).meta == {"n": n} and store2.get(n).tensors["x"].item() == i


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])])
def test_fp16_autocast_with_grad_scaler(peft_model, device):
    pm, _ = peft_model
    init = get_adapter_state(pm)
    dev = torch.device(device)
    pm.to(dev)
    data = DS(4)
    cfg = TrainConfig(lr=1e-3, batch_size=2, precision="fp16")
    opt = make_optimizer([p for _, p in trainable_parameters(pm)], cfg)
    scaler = torch.amp.GradScaler(dev.type)
    stats = train_local(pm, data, BatchStream(data.lengths, 2, seed=0), opt, cfg, steps=3, start_step=0,
                        total_steps=3, pad_id=0, device=dev, scaler=scaler)
    assert math.isfinite(stats.loss)
    assert all(p.dtype == torch.float32 for _, p in trainable_parameters(pm))
    moved = max((get_adapter_state(pm)[k] - init[k]).abs().max().item() for k in init)
    assert moved > 0
    pm.to("cpu")
    set_adapter_state(pm, init)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])])
def test_fp16_nan_guard_skips_with_grad_scaler(peft_model, device):
    """fp16 + GradScaler: a NaN loss at the first step and at a later one, and overflowing gradients,
    are skipped and counted; only the overflow backs the loss scale off (torch.amp's rule)."""
    pm, _ = peft_model
    init = get_adapter_state(pm)
    dev = torch.device(device)
    pm.to(dev)
    params = [p for _, p in trainable_parameters(pm)]
    data = DS(6)
    cfg = TrainConfig(lr=1e-3, batch_size=2, precision="fp16")
    opt = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(dev.type)
    script = iter(["nan", "ok", "nan", "overflow", "ok"])

    def extra(model):
        kind = next(script)
        if kind == "nan":
            return torch.tensor(float("nan"), device=dev)
        if kind == "overflow":  # a finite loss whose gradient, times the 2^16 loss scale, exceeds fp32
            return 1e36 * sum(p.sum() for p in params)
        return torch.zeros((), device=dev)

    seen = []

    def on_step(stats):
        seen.append((stats.skipped_nonfinite, scaler.get_scale(), get_adapter_state(pm)))

    stats = train_local(pm, data, BatchStream(data.lengths, 2, seed=0), opt, cfg, steps=5, start_step=0,
                        total_steps=5, pad_id=0, device=dev, extra_loss=extra, scaler=scaler, on_step=on_step)
    pm.to("cpu")
    set_adapter_state(pm, init)
    assert stats.steps == 5 and stats.skipped_nonfinite == 3
    assert [s for s, _, _ in seen] == [1, 1, 2, 3, 3]
    assert [sc for _, sc, _ in seen] == [65536.0, 65536.0, 65536.0, 32768.0, 32768.0]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    states = [init] + [w for _, _, w in seen]
    assert [same(states[i], states[i + 1]) for i in range(5)] == [True, False, True, True, False]
    assert math.isfinite(stats.loss)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-qwen2"])
def test_label_only_logits_give_hf_loss_and_gradients(arch):
    """The LM head on labelled positions only must give HF's own full-logits loss and gradients."""
    import transformers
    from packaging.version import Version

    from fedtune.models import load_model
    from fedtune.training import label_logits_supported, lm_loss

    model, _ = load_model(ModelConfig(name=arch))
    torch.manual_seed(0)
    pm = attach_adapter(model, PeftConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for _, p in trainable_parameters(pm):
            p.normal_(0, 0.02)
    # transformers takes a boolean logits_to_keep from 5.21 on; before, the full-logits path is used
    new_enough = Version(transformers.__version__) >= Version("5.21")
    assert label_logits_supported(pm) == new_enough
    if not new_enough:
        pytest.skip(f"transformers {transformers.__version__} has no boolean logits_to_keep")
    data = DS(n=5, seed=3)  # ragged lengths: right padding inside the batch
    batch = collate(data.input_ids, data.labels, 0)
    params = [p for _, p in trainable_parameters(pm)]
    results = []
    for label_only in (False, True):
        pm.zero_grad(set_to_none=True)
        loss = lm_loss(pm, batch, label_only)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (full, g_full), (part, g_part) = results
    assert torch.allclose(full, part, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_full, g_part):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_models_without_a_logits_mask_fall_back_to_full_logits(monkeypatch):
    """transformers < 5.21 takes ``logits_to_keep`` (an int or positions) but indexes a boolean mask
    wrongly: the capability is probed, not read off the parameter name, and training still runs."""
    import transformers.models.llama.modeling_llama as llama

    from fedtune.models import load_model
    from fedtune.training import label_logits_supported, lm_loss

    def old_slice(hidden_states, logits_to_keep):  # transformers 5.20's code, inlined in each model
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]

    monkeypatch.setattr(llama, "slice_logits_to_keep", old_slice, raising=False)  # < 5.21: already so
    model, _ = load_model(ModelConfig(name="tiny-llama"))
    pm = attach_adapter(model, PeftConfig(r=4, dropout=0.0))
    assert not label_logits_supported(pm)
    data = DS(n=4, seed=5)
    batch = collate(data.input_ids, data.labels, 0)
    assert torch.equal(lm_loss(pm, batch, label_logits_supported(pm)), pm(**batch).loss)
    cfg = TrainConfig(lr=1e-3, batch_size=2)
    opt = make_optimizer([p for _, p in trainable_parameters(pm)], cfg)
    stats = train_local(pm, data, BatchStream(data.lengths, 2, seed=0), opt, cfg, steps=2, start_step=0,
                        total_steps=2, pad_id=0, device=torch.device("cpu"))
    assert stats.skipped_nonfinite == 0 and math.isfinite(stats.loss)


def test_prompt_learning_adapters_keep_the_full_logits_path():
    from fedtune.models import load_model
    from fedtune.training import label_logits_supported

    model, _ = load_model(ModelConfig(name="tiny-llama"))
    assert not label_logits_supported(attach_adapter(model, PeftConfig(method="prompt_tuning", num_virtual_tokens=4)))


def test_client_keeps_its_fp16_loss_scale_and_lr_curve_across_rounds(peft_model, tmp_path, monkeypatch):
    """Per client, the GradScaler's state lives in the client's state (so in checkpoints) and the next
    round starts from it; the LR schedule is indexed by the round, whatever rounds the client missed."""
    import fedtune.client as client_mod
    from fedtune.algorithms import get_algorithm
    from fedtune.client import ClientRuntime, FedClient
    from fedtune.config import config_from_dict
    from fedtune.messages import Message
    from fedtune.payload import flatten

    pm, _ = peft_model
    init = get_adapter_state(pm)
    cfg = config_from_dict({"train": {"precision": "fp16", "local_steps": 2, "batch_size": 2, "lr": 1e-3,
                                      "scheduler": "linear"}, "fl": {"rounds": 4}})
    rt = ClientRuntime(model=pm, pad_id=0, cfg=cfg, device=torch.device("cpu"), algorithm=get_algorithm("fedavg"),
                       store=ClientStateStore(tmp_path / "store"))
    client = FedClient("c0", rt, train=DS(6))
    seen = []
    real = client_mod.train_local

    def spy(*args, scaler, start_step, **kw):
        entry = dict(scaler.state_dict())
        stats = real(*args, scaler=scaler, start_step=start_step, **kw)
        seen.append((entry, dict(scaler.state_dict()), start_step, stats.lr))
        return stats

    monkeypatch.setattr(client_mod, "train_local", spy)
    for rnd in (1, 3):  # the client is not sampled in round 2
        client.fit(Message(tensors=flatten({"adapter": init}), config={"round": rnd}))
    set_adapter_state(pm, init)
    (entry1, exit1, start1, lr1), (entry2, exit2, start2, lr2) = seen
    fresh = torch.amp.GradScaler("cpu", init_scale=cfg.train.fp16_init_scale).state_dict()  # 1024 unless set
    assert entry1 == fresh and exit1 != fresh  # two steps moved the growth tracker (or the scale)
    assert entry2 == exit1  # round 3 goes on with round 1's scale, not a fresh 2^16
    assert rt.store.get("c0").meta["scaler"] == exit2  # stored, hence checkpointed and resumed
    # linear schedule over 4 rounds x 2 steps: round 3's steps are global steps 4 and 5
    assert (start1, start2) == (0, 4)
    assert lr2 == pytest.approx(1e-3 * (1 - 5 / 8)) and lr1 == pytest.approx(1e-3 * (1 - 1 / 8))


# fp32: the same numbers to fp32 rounding, AdamW, every adapter element. bf16 (a bf16 base under
# bf16 autocast, as `precision: auto` runs on AMX): fedtune's chunked head, boolean-mask dropout
# without peft's fp32 cast and its own attention against HF's loss, peft's own path and SDPA — the
# same dropout masks, every product rounded to bf16 by other kernels. AdamW's per-element
# normalisation turns such rounding into sign flips of near-zero gradients, so bf16 trains with
# plain SGD, whose update is the gradient itself, and compares each adapter tensor's update as a
# whole: measured 2.4% apart at most (losses 2e-5), so 8% is bf16's noise with room; a head whose
# gradient is 10% off reads 11% in fp32.
GUARD = {"fp32": {"dtype": "float32", "optimizer": "adamw", "lr": 1e-2},
         "bf16": {"dtype": "bfloat16", "optimizer": "sgd", "lr": 0.5}}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_local_follows_a_plain_torch_loop_step_for_step(precision):
    """The regression guard for speed work: fedtune's trainer (label-only chunked LM head,
    length-grouped stream, clipping, LoRA dropout on) against a loop written here from torch, HF and
    peft alone (right-padding by hand, HF's full-logits loss, peft's own dropout, SDPA attention,
    clip_grad_norm_, AdamW) on the same batches from the same RNG state: the same loss at every step
    and the same adapter after, to the rounding of the precision used."""
    from fedtune.models.attention import ATTENTION

    g = GUARD[precision]
    pm, _ = _tiny_lora(0.1, dtype=g["dtype"])
    base = pm.get_base_model()
    assert base.config._attn_implementation == ATTENTION
    init, data, steps = get_adapter_state(pm), DS(16, seed=3), 6
    cfg = TrainConfig(batch_size=4, lr=g["lr"], max_grad_norm=1.0, precision=precision, optimizer=g["optimizer"])
    params = [p for _, p in trainable_parameters(pm)]

    torch.manual_seed(7)
    ours_losses = []
    train_local(pm, data, BatchStream(data.lengths, 4, 11, True), make_optimizer(params, cfg), cfg, steps=steps,
                start_step=0, total_steps=steps, pad_id=0, device=torch.device("cpu"),
                on_step=lambda st: ours_losses.append(st.loss_sum / st.label_tokens))
    ours = get_adapter_state(pm)

    set_adapter_state(pm, init)
    base.set_attn_implementation("sdpa")
    for m in pm.modules():  # peft's own dropout modules back (train_local swapped in MaskDropout)
        drops = getattr(m, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for k, d in list(drops.items()):
                drops[k] = torch.nn.Dropout(d.p) if not isinstance(d, torch.nn.Identity) else d
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    torch.manual_seed(7)
    opt = (torch.optim.AdamW(params, lr=g["lr"], weight_decay=0.0) if g["optimizer"] == "adamw"
           else torch.optim.SGD(params, lr=g["lr"]))
    stream, ref_losses = BatchStream(data.lengths, 4, 11, True), []
    sums = [0.0, 0]
    pm.train()
    for _ in range(steps):
        idx = next(stream)
        width = max(data.lengths[j] for j in idx)
        ids = torch.tensor([data.input_ids[j] + [0] * (width - data.lengths[j]) for j in idx])
        labels = torch.tensor([data.labels[j] + [IGNORE] * (width - data.lengths[j]) for j in idx])
        mask = torch.tensor([[1] * data.lengths[j] + [0] * (width - data.lengths[j]) for j in idx])
        with autocast:
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        n = int((labels[:, 1:] != IGNORE).sum())
        sums[0] += loss.item() * n
        sums[1] += n
        ref_losses.append(sums[0] / sums[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    ref = get_adapter_state(pm)
    set_adapter_state(pm, init)
    moved = max((ref[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3
    if precision == "fp32":
        assert ours_losses == pytest.approx(ref_losses, rel=1e-5)
        for k in init:
            assert torch.allclose(ours[k], ref[k], atol=1e-6, rtol=1e-4), k
    else:
        assert ours_losses == pytest.approx(ref_losses, rel=2**-8)  # bf16's epsilon
        for k in init:
            assert (ours[k] - ref[k]).norm() <= 0.08 * (ref[k] - init[k]).norm(), k


def test_gradient_checkpointing_recomputes_each_block_and_changes_no_number():
    """train.gradient_checkpointing: every decoder block runs its forward twice a step (once more in
    the backward, which is the memory it saves), and with LoRA dropout on the adapter after 3 steps
    equals the run without it — the replayed RNG gives the same masks. Switching it off restores one
    forward a block."""
    pm, _ = _tiny_lora(dropout=0.1)
    init, data = get_adapter_state(pm), DS(16, seed=3)
    # a pre-hook inside the block: the recompute stops early once it has what the backward needs, so
    # a post-hook may not see it
    mlp = pm.get_base_model().model.layers[0].mlp
    calls = []
    mlp.register_forward_pre_hook(lambda *a: calls.append(1))

    def train(on):
        calls.clear()
        return _three_steps(pm, init, data, gradient_checkpointing=on), len(calls)

    train(False)  # the first call also probes the model for the label-only LM head (extra forwards)
    (plain, n_plain), (ckpt, n_ckpt), (again, n_again) = train(False), train(True), train(False)
    assert (n_plain, n_ckpt, n_again) == (3, 6, 3)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)
        assert torch.equal(again[k], plain[k])


def test_pad_to_multiple_pads_with_masked_positions_and_keeps_the_fp32_update():
    """train.pad_to_multiple: a batch of lengths 5 and 3 padded to 8 has 3 and 5 masked, ignored
    positions; fp32 training on the padded batches lands on the same adapter (to rounding)."""
    b = collate([[5, 6, 7, 8, 9], [5, 6, 7]], [[IGNORE, 6, 7, 8, 9], [IGNORE, 6, 7]], 0, pad_to=8)
    assert b["input_ids"].shape == (2, 8)
    assert b["attention_mask"].sum(1).tolist() == [5, 3]
    assert (b["labels"][:, 5:] == IGNORE).all() and (b["labels"][1, 3:] == IGNORE).all()
    pm, _ = _tiny_lora(dropout=0.0)
    init, data = get_adapter_state(pm), DS(16, seed=3)
    a, b8 = _three_steps(pm, init, data, pad_to_multiple=1), _three_steps(pm, init, data, pad_to_multiple=16)
    for k in a:
        torch.testing.assert_close(b8[k], a[k], rtol=1e-4, atol=1e-6)
