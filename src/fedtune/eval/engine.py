"""The evaluation engine: one batched generation loop and one log-likelihood loop.

Every task goes through these two functions, so every task gets the same speed:

* :meth:`Engine.generate` — prompts sorted by length (little padding), left-padded batches, a KV
  cache, per-sequence stop criteria (stop strings, EOS, a per-request token budget), and rows that
  finish leave the batch at once (their cache rows are dropped), so a long completion never makes
  short ones pay for its steps. Greedy or sampled (temperature, top-p); every request draws from
  its own ``torch.Generator`` seeded from its own seed, so samples do not depend on the batch size
  or on which other prompts share the batch.
* :meth:`Engine.loglikelihood` — ``log p(continuation | context)`` for many pairs, batched, with a
  shortcut for single-token continuations that share a context (MMLU's ``A``–``D``: one forward
  pass per question instead of four). Rows are *right*-padded: causal attention means the trailing
  pads never influence the positions before them, so every row sees exactly the positions it would
  see alone, with no position ids at all (which matters for prompt-learning adapters: peft drops
  position ids for them). Only the positions that predict a continuation token are projected onto
  the vocabulary (``logits_to_keep``), not every position of the batch.

Why not ``model.generate``: transformers' generate keeps finished rows in the batch until every
row is done (it pads them), which on evaluation sets with very uneven completion lengths (HumanEval,
GSM8K) wastes most of the compute; it also has no notion of per-request seeds. This loop is small
and hand-written for those two reasons.

Prompt-learning adapters (prefix / P-tuning / prompt tuning) prepend virtual tokens inside peft's
own ``generate`` (prefix tuning rewrites the KV cache on every forward call, so the loop above
cannot drive it), so for them generation is delegated to ``PeftModel.generate``. peft ignores
position ids for these methods, so a left-padded row would see its positions shifted by its
padding (and OPT crashes on it): such batches hold only prompts of exactly the same token length,
which need no padding at all. Sampled requests through them run one at a time, each under its own
seed, temperature and top-p, inside :func:`torch.random.fork_rng` so the global random state is
left as it was.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class GenRequest:
    """One completion to generate."""

    prompt: str
    max_new_tokens: int = 256
    #: the completion ends before the first of these strings (which is not part of it).
    stop: tuple[str, ...] = ()
    #: 0 means greedy decoding.
    temperature: float = 0.0
    top_p: float = 1.0
    #: seed of this request's own random generator (sampling only).
    seed: int = 0


@dataclass
class Generation:
    text: str
    #: tokens generated up to and including the one that completed a stop string or EOS.
    num_tokens: int
    #: ``stop`` (a stop string), ``eos``, or ``length`` (ran out of ``max_new_tokens``).
    finish: str
    prompt_tokens: int = 0


@dataclass
class EngineStats:
    """What the engine did (for throughput reports)."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    generate_seconds: float = 0.0
    scored_tokens: int = 0
    score_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    idx = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not idx:
        return text, False
    return text[: min(idx)], True


def _is_prompt_learning(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return bool(cfg is not None and getattr(cfg, "is_prompt_learning", False))


def _virtual_positions(model: torch.nn.Module) -> int:
    """How many positions a prompt-learning adapter inserts in front of the input: prompt tuning
    and P-tuning prepend their virtual tokens to the input embeddings (so the model's outputs are
    that much longer); prefix tuning puts them into the KV cache instead (outputs as long as the
    input)."""
    if not _is_prompt_learning(model):
        return 0
    cfg = model.active_peft_config  # type: ignore[union-attr]
    if str(getattr(cfg.peft_type, "value", cfg.peft_type)) in ("PREFIX_TUNING", "CARTRIDGE"):
        return 0
    return int(cfg.num_virtual_tokens)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes a 2-D tensor of positions as ``logits_to_keep`` (row ``b`` keeps the
    positions ``keep[b]``): transformers' models do from 5.21 (``slice_logits_to_keep``), older ones
    index every row with the whole tensor, so it is tried once (:func:`fedtune.training.keeps_logits`);
    without it the scoring loop computes all positions and picks."""
    from fedtune.training import keeps_logits

    return keeps_logits(model, torch.tensor([[0, 2], [1, 1]]) + _virtual_positions(model))


def _rng_devices() -> list[int]:
    """CUDA devices whose random state :func:`torch.random.fork_rng` must save and restore
    (``torch.manual_seed`` reseeds every initialised one)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


class Engine:
    """Batched evaluation over one causal LM (a plain model, a merged model or a PeftModel)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        device: torch.device | str | None = None,
        batch_size: int = 16,
        max_batch_tokens: int = 16384,
        add_special_tokens: bool = True,
        progress: bool = True,
        stop_token_ids: Sequence[int] = (),
    ):
        self.model = model
        self.tok = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size = batch_size
        #: a batch holds at most this many (rows x final length) tokens (KV cache memory).
        self.max_batch_tokens = max_batch_tokens
        self.add_special_tokens = add_special_tokens
        self.progress = progress
        self.stats = EngineStats()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {int(eos)} if eos is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            self.eos_ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            self.eos_ids.update(int(e) for e in gen_eos)
        # the end-of-turn token of the adapter's chat format (<|eot_id|>, <end_of_turn>, ...): a
        # chat-trained adapter ends its answer with it, not with EOS
        self.eos_ids.update(int(t) for t in stop_token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self._accepts_keep: bool | None = None  # 2-D logits_to_keep: probed at the first scoring call

    # ---- helpers --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="seq", leave=False, file=sys.stderr,
                    disable=not self.progress or total == 0)

    def _batches(self, order: list[int], lengths: list[int], budget: list[int],
                 key: Any = None) -> list[list[int]]:
        """Cut ``order`` (sorted longest first) into batches by row count and token budget; with
        ``key`` (row -> value), a batch holds only rows with equal keys (``order`` must keep rows
        with equal keys together)."""
        out: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            width = lengths[cur[0]] + max(budget[j] for j in cur + [i]) if cur else lengths[i] + budget[i]
            if cur and (len(cur) >= self.batch_size or width * (len(cur) + 1) > self.max_batch_tokens
                        or (key is not None and key(i) != key(cur[0]))):
                out.append(cur)
                cur = []
            cur.append(i)
        if cur:
            out.append(cur)
        return out

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Sequence[GenRequest], desc: str = "generate") -> list[Generation]:
        """Completions for ``requests``, in their order."""
        self.model.eval()
        ids = [self.encode(r.prompt) for r in requests]
        lengths = [len(x) for x in ids]
        budget = [r.max_new_tokens for r in requests]
        prompt_learning = _is_prompt_learning(self.model)
        # Longest first: the biggest batch comes first (memory errors surface at once) and rows of
        # similar length share a batch, so left padding wastes little.
        order = sorted(range(len(requests)), key=lambda i: (-lengths[i], i))
        key = None
        if prompt_learning:
            # no padding through peft (see the module docstring): a batch is greedy prompts of one
            # token length; a sampled request is a batch of its own (its own seed and settings)
            def key(i: int) -> Any:
                return lengths[i] if requests[i].temperature <= 0 else ("sampled", i)

            order = sorted(order, key=lambda i: (-lengths[i], requests[i].temperature > 0, i))
        results: list[Generation | None] = [None] * len(requests)
        bar = self._bar(len(requests), desc)
        t0 = time.perf_counter()
        try:
            for batch in self._batches(order, lengths, budget, key):
                if prompt_learning:
                    gens = self._generate_peft([ids[i] for i in batch], [requests[i] for i in batch])
                    bar.update(len(batch))
                else:  # the bar moves as each row finishes
                    gens = self._generate_batch([ids[i] for i in batch], [requests[i] for i in batch],
                                                on_done=lambda: bar.update(1))
                for i, g in zip(batch, gens):
                    g.prompt_tokens = lengths[i]
                    results[i] = g
                    self.stats.generated_tokens += g.num_tokens
                    self.stats.prompt_tokens += lengths[i]
                bar.set_postfix(tok_s=f"{self.stats.generated_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
        finally:
            bar.close()
            self.stats.generate_seconds += time.perf_counter() - t0
        return [r for r in results if r is not None]

    def _pad(self, rows: list[list[int]], left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of ``rows`` padded to one length, on the left
        (generation: every row's next token is at the end) or on the right (scoring)."""
        n = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), n), dtype=torch.long)
        for b, r in enumerate(rows):
            if r:
                span = slice(n - len(r), n) if left else slice(0, len(r))
                input_ids[b, span] = torch.tensor(r)
                attn[b, span] = 1
        return input_ids.to(self.device), attn.to(self.device)

    @staticmethod
    def _pick(logits: torch.Tensor, reqs: list[GenRequest], gens: list[torch.Generator | None]) -> torch.Tensor:
        """Next token per row: argmax, or a sample from the temperature/top-p distribution."""
        out = logits.argmax(-1)
        for b, (r, g) in enumerate(zip(reqs, gens)):
            if r.temperature <= 0 or g is None:
                continue
            probs = torch.softmax(logits[b].float() / r.temperature, -1)
            if r.top_p < 1.0:
                sp, si = probs.sort(descending=True)
                keep = sp.cumsum(-1) - sp < r.top_p  # the smallest set whose mass reaches top_p
                sp = sp * keep
                probs = torch.zeros_like(probs).scatter_(0, si, sp)
            out[b] = torch.multinomial(probs.cpu(), 1, generator=g).to(out.device)[0]
        return out

    def _generate_batch(self, prompts: list[list[int]], reqs: list[GenRequest],
                        on_done: Any = None) -> list[Generation]:
        from transformers import DynamicCache

        model = self.model
        input_ids, attn = self._pad(prompts)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=getattr(model, "config", None))
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]
        cache = out.past_key_values
        last_pos = pos[:, -1]
        gens = [self._generator(r) for r in reqs]
        new: list[list[int]] = [[] for _ in reqs]
        done: list[Generation | None] = [None] * len(reqs)
        active = list(range(len(reqs)))  # batch row -> request index
        while active:
            nxt = self._pick(logits, [reqs[i] for i in active], [gens[i] for i in active])
            keep_rows = []
            for row, i in enumerate(active):
                tok = int(nxt[row])
                new[i].append(tok)
                fin = self._finished(new[i], reqs[i], tok)
                if fin is None:
                    keep_rows.append(row)
                else:
                    done[i] = fin
                    if on_done is not None:
                        on_done()
            if not keep_rows:
                break
            if len(keep_rows) < len(active):
                idx = torch.tensor(keep_rows, device=self.device)
                cache.batch_select_indices(idx)
                attn, last_pos, nxt = attn[idx], last_pos[idx], nxt[idx]
                active = [active[r] for r in keep_rows]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=last_pos[:, None],
                        past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1, :]
            cache = out.past_key_values
        return [d for d in done if d is not None]

    @staticmethod
    def _generator(r: GenRequest) -> torch.Generator | None:
        if r.temperature <= 0:
            return None
        g = torch.Generator()
        g.manual_seed(int(r.seed) & (2**63 - 1))
        return g

    def _finished(self, new: list[int], req: GenRequest, tok: int) -> Generation | None:
        """A :class:`Generation` when the row is complete after ``tok``, else None."""
        if tok in self.eos_ids:
            text = self.tok.decode(new[:-1], skip_special_tokens=True)
            return Generation(cut_at_stop(text, req.stop)[0], len(new), "eos")
        if req.stop:
            # Decode a tail long enough to hold any stop string: a stop string can span tokens.
            text = self.tok.decode(new, skip_special_tokens=True)
            cut, hit = cut_at_stop(text, req.stop)
            if hit:
                return Generation(cut, len(new), "stop")
        if len(new) >= req.max_new_tokens:
            text = self.tok.decode(new, skip_special_tokens=True)
            return Generation(cut_at_stop(text, req.stop)[0], len(new), "length")
        return None

    def _generate_peft(self, prompts: list[list[int]], reqs: list[GenRequest]) -> list[Generation]:
        """Prompt-learning adapters: peft's own generate (it prepends the virtual tokens).

        ``prompts`` all have the same length (no padding: peft drops the position ids that would
        make padding harmless); more than one request only when all are greedy.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList

        assert len({len(p) for p in prompts}) == 1, "prompt-learning batches hold prompts of one length"
        engine = self
        input_ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        n_prompt = input_ids.shape[1]

        class _Stop(StoppingCriteria):
            def __call__(self, ids: torch.LongTensor, scores, **kw) -> torch.BoolTensor:
                flags = [engine._finished(ids[b, n_prompt:].tolist(), reqs[b], int(ids[b, -1])) is not None
                         for b in range(ids.shape[0])]
                return torch.tensor(flags, device=ids.device)

        kw: dict[str, Any] = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=max(r.max_new_tokens for r in reqs),
                                  stopping_criteria=StoppingCriteriaList([_Stop()]), pad_token_id=self.pad_id)
        r0 = reqs[0]
        if r0.temperature > 0:
            assert len(reqs) == 1, "sampled requests through peft run one at a time"
            # peft's generate samples from the global generator: seed it with this request's seed
            # inside fork_rng, so the caller's random state (CUDA's too) is untouched. top_k=0:
            # only temperature and top-p shape the distribution, as in the engine's own loop.
            with torch.random.fork_rng(devices=_rng_devices()):
                torch.manual_seed(int(r0.seed) & (2**63 - 1))
                out = self.model.generate(**kw, do_sample=True, temperature=r0.temperature, top_p=r0.top_p, top_k=0)
        else:
            out = self.model.generate(**kw, do_sample=False)
        gens = []
        for b, r in enumerate(reqs):
            new = out[b, n_prompt:].tolist()
            g = None
            for t in range(1, len(new) + 1):
                g = self._finished(new[:t], r, new[t - 1])
                if g is not None:
                    break
            gens.append(g or Generation(cut_at_stop(self.tok.decode(new, skip_special_tokens=True), r.stop)[0],
                                        len(new), "length"))
        return gens

    # ---- log-likelihood ---------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "score") -> list[float]:
        """``sum log p(continuation tokens | context)`` for each ``(context, continuation)``.

        Context and continuation are tokenised separately and concatenated (the boundary is exact,
        as in training: see :mod:`fedtune.data.templates`). The continuation gets no special tokens.
        """
        self.model.eval()
        t0 = time.perf_counter()
        ctx_ids: dict[str, list[int]] = {}
        for c, _ in pairs:
            if c not in ctx_ids:
                ctx_ids[c] = self.encode(c)
        cont_ids = [list(self.tok(x, add_special_tokens=False)["input_ids"]) for _, x in pairs]
        scores: list[float] = [math.nan] * len(pairs)
        # Shortcut: single-token continuations of one context need one forward pass in all.
        single: dict[str, list[int]] = {}
        multi: list[int] = []
        for i, ((c, _), cont) in enumerate(zip(pairs, cont_ids)):
            if not cont:
                scores[i] = 0.0
            elif len(cont) == 1 and ctx_ids[c]:
                single.setdefault(c, []).append(i)
            else:
                multi.append(i)
        rows = [(ctx_ids[c], [], idx) for c, idx in single.items()]
        rows += [(ctx_ids[pairs[i][0]], cont_ids[i], [i]) for i in multi]
        if any(not ctx for ctx, cont, _ in rows if cont):
            raise ValueError("log-likelihood of a continuation needs a non-empty context "
                             "(its first token has nothing to be predicted from)")
        order = sorted(range(len(rows)), key=lambda k: -(len(rows[k][0]) + len(rows[k][1])))
        lengths = [len(r[0]) + len(r[1]) for r in rows]
        # the outputs of prompt / P-tuning start with the virtual tokens' positions
        shift = _virtual_positions(self.model)
        if self._accepts_keep is None:  # probed on first use (the model is in eval mode here)
            self._accepts_keep = _accepts_logits_to_keep(self.model)
        use_keep = self._accepts_keep
        bar = self._bar(len(pairs), desc)
        try:
            for batch in self._batches(order, lengths, [0] * len(rows)):
                # right padding: no position ids needed, the pads come after everything scored
                input_ids, attn = self._pad([rows[k][0] + rows[k][1] for k in batch], left=False)
                # Position t predicts token t+1: a row needs the positions before each continuation
                # token, or (single-token shortcut) the last context position. Only those are
                # projected onto the vocabulary; a row with fewer repeats its last one.
                want = []
                for k in batch:
                    ctx, cont, _ = rows[k]
                    end = len(ctx) + len(cont)
                    want.append(list(range(end - len(cont) - 1, end - 1)) if cont else [end - 1])
                width = max(len(w) for w in want)
                keep = torch.tensor([w + w[-1:] * (width - len(w)) for w in want], device=self.device) + shift
                if use_keep:
                    logits = self.model(input_ids=input_ids, attention_mask=attn, logits_to_keep=keep).logits
                else:  # a model without logits_to_keep: all positions, then pick
                    logits = self.model(input_ids=input_ids, attention_mask=attn).logits
                    logits = torch.take_along_dim(logits, keep[..., None], dim=1)
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()  # half-precision log-softmax loses the small differences
                logp = torch.log_softmax(logits, dim=-1)  # rows x width x vocab
                for b, k in enumerate(batch):
                    ctx, cont, idx = rows[k]
                    if not cont:  # single-token continuations: the distribution after the context
                        for i in idx:
                            scores[i] = float(logp[b, 0, cont_ids[i][0]])
                    else:
                        tok = torch.tensor(cont, device=logp.device)
                        scores[idx[0]] = float(logp[b, : len(cont)].gather(1, tok[:, None]).sum())
                    self.stats.scored_tokens += len(ctx) + len(cont)
                bar.update(sum(len(rows[k][2]) for k in batch))
        finally:
            bar.close()
            self.stats.score_seconds += time.perf_counter() - t0
        return scores
