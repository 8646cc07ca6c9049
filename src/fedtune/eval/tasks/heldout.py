"""Held-out loss and perplexity on a federated data split: per client and pooled (global).

The split is the one a run trains with (the run directory's ``config.yaml``), or any preset or
YAML config given as ``heldout.data=...``: the same splitter, seed and per-client val/test
carving as training, so the numbers are comparable with the run's own round metrics. Loss is the
token-weighted mean over labelled (response) tokens, exactly as in training's evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.eval.tasks.base import Task, TaskContext, TaskResult, register_task


@dataclass
class HeldOut(Task):
    name = "heldout"
    kind = "loss"
    metric = "loss"
    description = "held-out loss / perplexity on each client's split and pooled"

    #: ``val``, ``test`` or ``train``.
    split: str = "test"
    #: a preset (fed-dolly, ...) or a YAML config; default: the evaluated run's config.
    data: str = ""
    batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in ("train", "val", "test"):
            raise FedtuneError(f"option 'heldout.split' must be train, val or test, got {self.split!r}")
        if not isinstance(self.data, str):
            raise FedtuneError(f"option 'heldout.data' must be a preset name or a YAML file, got {self.data!r}")

    def run(self, ctx: TaskContext) -> TaskResult:
        from fedtune.config import load_config
        from fedtune.data import build_federated_data, tokenize_records
        from fedtune.training import evaluate_loss

        t0 = time.perf_counter()
        if self.split not in ("train", "val", "test"):
            raise FedtuneError(f"heldout.split must be train, val or test, got {self.split!r}")
        if self.data:
            cfg = load_config(self.data) if self.data.endswith((".yaml", ".yml")) else \
                load_config(None, [f"data.preset={self.data}"])
        elif ctx.run_cfg is not None:
            cfg = ctx.run_cfg
        else:
            raise FedtuneError("the heldout task needs a data split: evaluate a run directory, or set "
                               "heldout.data=<preset or config.yaml> (e.g. heldout.data=fed-dolly)")
        data_cfg = cfg.data
        if ctx.data_cfg is not None and ctx.data_cfg.data_dir:
            data_cfg = data_cfg.model_copy(update={"data_dir": ctx.data_cfg.data_dir})
        fed = build_federated_data(data_cfg, cfg.seed)
        template = ctx.template.name if ctx.template is not None else data_cfg.template
        tok_cfg = data_cfg.model_copy(update={"template": template})
        eng = ctx.engine
        per_client: dict[str, Any] = {}
        loss_sum = n_tok = 0.0
        records = []
        for client in fed.clients:
            recs = list(getattr(client, self.split))
            if ctx.limit is not None:
                recs = recs[: ctx.limit]
            if not recs:
                continue
            ds = tokenize_records(recs, eng.tok, tok_cfg)
            s, n = evaluate_loss(eng.model, ds, batch_size=self.batch_size, pad_id=eng.pad_id, device=eng.device)
            if n:
                per_client[client.name] = {"loss": s / n, "ppl": math.exp(min(s / n, 50)), "examples": len(ds),
                                           "tokens": n}
                records.append({"client": client.name, **per_client[client.name]})
            loss_sum += s
            n_tok += n
        if not n_tok:
            raise FedtuneError(f"no {self.split} examples with labelled tokens in this data split")
        loss = loss_sum / n_tok
        losses = [v["loss"] for v in per_client.values()]
        metrics = {"loss": loss, "ppl": math.exp(min(loss, 50)), "split": self.split,
                   "loss_mean_of_clients": sum(losses) / len(losses), "per_client": per_client}
        return TaskResult(self.name, self.metric, loss, metrics, sum(v["examples"] for v in per_client.values()),
                          time.perf_counter() - t0, [], records)


register_task(HeldOut)
