"""The two shared loops: batched generation equals one-at-a-time greedy generation (left padding,
cache compaction), stop strings end each row, seeded sampling does not depend on the batch, and
log-likelihoods equal a direct forward pass."""

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


def test_prompt_learning_adapters_generate_like_peft_one_at_a_time():
    """Prefix / P-tuning / prompt tuning prepend virtual tokens inside peft: batched generation
    through them equals peft's own generate on one prompt at a time."""
    from fedtune.adapters import attach_adapter
    from fedtune.config import ModelConfig, PeftConfig
    from fedtune.models import load_model

    for method in ("prompt_tuning", "prefix", "p_tuning"):
        model, tok = load_model(ModelConfig(name="tiny-llama"))
        torch.manual_seed(0)
        pm = attach_adapter(model.double(), PeftConfig(method=method, num_virtual_tokens=4)).double().eval()
        got = Engine(pm, tok, batch_size=4, progress=False).generate([GenRequest(p, 6) for p in PROMPTS[:3]])
        for p, g in zip(PROMPTS[:3], got):
            assert g.text == _hf_greedy(pm, tok, p, 6), method
