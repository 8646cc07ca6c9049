"""The two shared loops: batched generation equals one-at-a-time greedy generation (left padding,
cache compaction), stop strings end each row, seeded sampling does not depend on the batch, and
log-likelihoods equal a direct forward pass."""

import copy
import functools

import torch

from fedtune.eval.engine import Engine, GenRequest, cut_at_stop

PROMPTS = ["def add(a, b):", "Hello there, how are you doing today my friend? I", "x",
           "The quick brown fox jumps over the lazy dog and then", "1, 2, 3, 4,"]


def _hf_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_batched_generation_equals_unbatched_hf_greedy(tiny):
    model, tok = tiny
    # budgets differ per row, so rows leave the batch at different steps (cache compaction)
    reqs = [GenRequest(p, 6 + 3 * i) for i, p in enumerate(PROMPTS)]
    got = Engine(model, tok, batch_size=8, progress=False).generate(reqs)
    for r, g in zip(reqs, got):
        assert g.text == _hf_greedy(model, tok, r.prompt, r.max_new_tokens)
        assert g.finish in ("length", "eos") and g.num_tokens <= r.max_new_tokens


def test_batch_size_does_not_change_greedy_output(tiny):
    model, tok = tiny
    reqs = [GenRequest(p, 10) for p in PROMPTS]
    one = Engine(model, tok, batch_size=1, progress=False).generate(reqs)
    many = Engine(model, tok, batch_size=5, progress=False).generate(reqs)
    assert [g.text for g in one] == [g.text for g in many]


def test_stop_strings_end_each_row(tiny):
    model, tok = tiny
    free = Engine(model, tok, progress=False).generate([GenRequest(p, 12) for p in PROMPTS])
    # stop at a piece of each row's own free-running output: the row must end right before it
    reqs = []
    for p, g in zip(PROMPTS, free):
        stop = g.text[len(g.text) // 2:][:3] if len(g.text) >= 4 else "\x00never"
        reqs.append(GenRequest(p, 12, (stop,)))
    got = Engine(model, tok, batch_size=8, progress=False).generate(reqs)
    for r, g, f in zip(reqs, got, free):
        expected, hit = cut_at_stop(f.text, r.stop)
        assert g.text == expected
        if hit:
            assert g.finish == "stop" and g.num_tokens <= f.num_tokens


def test_seeded_sampling_is_independent_of_batching(tiny):
    model, tok = tiny
    reqs = [GenRequest(p, 8, temperature=1.0, top_p=0.9, seed=100 + i) for i, p in enumerate(PROMPTS)]
    a = Engine(model, tok, batch_size=1, progress=False).generate(reqs)
    b = Engine(model, tok, batch_size=5, progress=False).generate(list(reversed(reqs)))[::-1]
    assert [g.text for g in a] == [g.text for g in b]
    c = Engine(model, tok, progress=False).generate([GenRequest(p, 8, temperature=1.0, seed=7) for p in PROMPTS])
    greedy = Engine(model, tok, progress=False).generate([GenRequest(p, 8) for p in PROMPTS])
    assert [g.text for g in c] != [g.text for g in greedy]  # sampling does sample


def _direct_logprob(model, tok, context, continuation):
    ids = tok(context)["input_ids"] + tok(continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))


def test_loglikelihood_equals_a_direct_forward_pass(tiny):
    model, tok = tiny
    pairs = [("Question: what is two plus two?\nAnswer:", " four"),
             ("Question: what is two plus two?\nAnswer:", " a number larger than three"),
             ("The following are multiple choice questions.\nAnswer:", " A"),
             ("The following are multiple choice questions.\nAnswer:", " B"),
             ("x", " y z")]
    got = Engine(model, tok, batch_size=3, progress=False).loglikelihood(pairs)
    for (c, x), g in zip(pairs, got):
        assert abs(g - _direct_logprob(model, tok, c, x)) < 1e-9


def test_multiple_choice_picks_the_hand_computed_choice(tiny, data_dir):
    """MMLU's scoring on one question: the chosen letter is the argmax of independently computed
    next-token log-probabilities."""
    from fedtune.config import DataConfig
    from fedtune.eval.tasks import TaskContext, get_task

    model, tok = tiny
    ctx = TaskContext(engine=Engine(model, tok, progress=False), data_cfg=DataConfig(data_dir=str(data_dir)), limit=3)
    task = get_task("mmlu")()
    res = task.run(ctx)
    exs = [e for e in task.examples(ctx)]
    from fedtune.eval.tasks.base import select

    for rec, ex in zip(res.samples, select(exs, 3, 0)):
        prompt = task.prompt(ex)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
        letter_ids = [tok(f" {L}", add_special_tokens=False)["input_ids"] for L in "ABCD"]
        assert all(len(x) == 1 for x in letter_ids)
        expected = "ABCD"[int(torch.stack([logp[x[0]] for x in letter_ids]).argmax())]
        assert rec["pred"] == expected
        assert rec["accuracy"] == float(expected == ex["answer"])


ARCHS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt")
PROMPT_LEARNING = ("prompt_tuning", "prefix", "p_tuning")
# token lengths 7, 1, 7, 1: equal lengths share a batch, different ones do not (OPT crashed when
# the 7s and 1s were left-padded into one batch)
PL_PROMPTS = ["def add(a, b):", "x", "def sub(a, b):", "y"]


_BASES: dict = {}


def _adapted(arch, method, seed=0):
    """A tiny model (float64: greedy choices never hinge on rounding) with a fresh adapter whose
    weights are visibly non-zero (a fresh LoRA adapter is the identity). Each architecture is
    built once; every adapter gets its own copy (LoRA changes the model it wraps)."""
    from fedtune.adapters import attach_adapter
    from fedtune.config import ModelConfig, PeftConfig
    from fedtune.models import load_model

    if arch not in _BASES:
        model, tok = load_model(ModelConfig(name=arch))
        _BASES[arch] = (model.double(), tok)
    model, tok = _BASES[arch]
    model = copy.deepcopy(model)
    if method is None:
        return model, tok
    torch.manual_seed(seed)
    pm = attach_adapter(model, PeftConfig(method=method, r=4, num_virtual_tokens=4)).double().eval()
    if method == "lora":
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    return pm, tok


def test_prompt_learning_adapters_generate_like_peft_one_at_a_time():
    """Prefix / P-tuning / prompt tuning prepend virtual tokens inside peft and ignore position ids:
    batched generation through them equals peft's own generate on one prompt at a time, on every
    tiny architecture (OPT crashed on left-padded batches of prompts of different lengths)."""
    for arch in ARCHS:
        for method in PROMPT_LEARNING:
            pm, tok = _adapted(arch, method)
            engine = Engine(pm, tok, batch_size=4, progress=False)
            got = engine.generate([GenRequest(p, 4) for p in PL_PROMPTS])
            for p, g in zip(PL_PROMPTS, got):
                assert g.text == _hf_greedy(pm, tok, p, 4), (arch, method, p)


def test_prompt_learning_sampling_honours_each_requests_seed_and_settings():
    """Sampled generation through peft: each request reproduces peft's own sampling under its own
    seed, temperature and top-p, whatever the batch or order, and the global RNG is left alone."""
    pm, tok = _adapted("tiny-llama", "prompt_tuning")
    prompts = PL_PROMPTS + ["def add(a, b):"]
    reqs = [GenRequest(p, 6, temperature=t, top_p=tp, seed=s)
            for p, t, tp, s in zip(prompts, (1.0, 0.7, 1.5, 1.0, 0.0), (1.0, 0.9, 0.8, 0.5, 1.0), (3, 4, 5, 3, 0))]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = Engine(pm, tok, batch_size=4, progress=False).generate(reqs)
    assert torch.equal(torch.get_rng_state(), before)
    b = Engine(pm, tok, batch_size=1, progress=False).generate(list(reversed(reqs)))[::-1]
    assert [g.text for g in a] == [g.text for g in b]
    for r, g in zip(reqs, a):
        ids = tok(r.prompt, return_tensors="pt")
        kw = dict(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=0) if r.temperature > 0 else {}
        torch.manual_seed(r.seed)
        out = pm.generate(**ids, max_new_tokens=6, pad_token_id=tok.pad_token_id, **kw)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert g.text == tok.decode(new, skip_special_tokens=True), r


def _direct_logprob_any(model, tok, context, continuation):
    """One unpadded sequence through the model; the last len(ids) outputs belong to the input
    tokens (prompt / P-tuning put their virtual tokens' outputs in front)."""
    ids = tok(context)["input_ids"] + tok(continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))


def test_loglikelihood_does_not_depend_on_batch_size_for_any_adapter():
    """Every architecture, plain and with every PEFT method: batched log-likelihoods equal a
    direct unpadded forward pass of each pair (so they cannot depend on the batch)."""
    pairs = [("Question: what is two plus two?\nAnswer:", " A"),
             ("Question: what is two plus two?\nAnswer:", " B"),
             ("x", " y z"),
             ("The quick brown fox jumps over the lazy dog and then", " it slept for a while")]
    for arch in ARCHS:
        for method in (None, "lora") + PROMPT_LEARNING:
            model, tok = _adapted(arch, method)
            one = Engine(model, tok, batch_size=1, progress=False).loglikelihood(pairs)
            many = Engine(model, tok, batch_size=4, progress=False).loglikelihood(pairs)
            for (c, x), g1, g6 in zip(pairs, one, many):
                want = _direct_logprob_any(model, tok, c, x)
                assert abs(g1 - want) < 1e-6 and abs(g6 - want) < 1e-6, (arch, method, c, x, g1, g6, want)


def test_loglikelihood_projects_only_the_scored_positions(tiny, monkeypatch):
    """The vocabulary projection sees only the positions that predict continuation tokens (or the
    last context position), never the whole padded batch."""
    model, tok = tiny
    engine = Engine(model, tok, batch_size=8, progress=False)
    engine.loglikelihood([("x", " y")])  # the first call probes logits_to_keep (two extra forwards)
    shapes = []
    real = type(model).forward

    @functools.wraps(real)  # keeps the signature: the engine looks for logits_to_keep in it
    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        shapes.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    pairs = [("The following are multiple choice questions about biology and chemistry.\nAnswer:", f" {x}")
             for x in "ABCD"] + [("x", " y z w")]
    engine.loglikelihood(pairs)
    assert len(shapes) == 1
    rows, width, vocab = shapes[0]
    assert (rows, width, vocab) == (2, 3, len(tok))  # two rows (MMLU shortcut + one pair), 3 = len(" y z w")


def test_loglikelihood_on_models_without_2d_logits_to_keep_falls_back(monkeypatch):
    """transformers < 5.21 has a ``logits_to_keep`` parameter but slices every row with a whole 2-D
    position tensor: the engine probes the capability instead of trusting the parameter's name, and
    scores stay exact through the full-logits path."""
    import transformers.models.llama.modeling_llama as llama

    from fedtune.config import ModelConfig
    from fedtune.eval.engine import _accepts_logits_to_keep
    from fedtune.models import load_model

    def old_slice(hidden_states, logits_to_keep):  # transformers 5.20's code, inlined in each model
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]

    model, tok = load_model(ModelConfig(name="tiny-llama"))
    assert _accepts_logits_to_keep(model)  # transformers here takes per-row positions
    monkeypatch.setattr(llama, "slice_logits_to_keep", old_slice, raising=False)
    assert not _accepts_logits_to_keep(model)
    pairs = [("Question: what is two plus two?\nAnswer:", " A"), ("x", " y z"),
             ("The quick brown fox jumps over the lazy dog and then", " it slept")]
    got = Engine(model, tok, batch_size=4, progress=False).loglikelihood(pairs)
    for (c, x), g in zip(pairs, got):
        want = _direct_logprob_any(model, tok, c, x)
        assert abs(g - want) < 1e-6 * max(1.0, abs(want))  # fp32 model: relative rounding
