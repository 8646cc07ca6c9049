"""Benchmark tasks inside ``fedtune run``: every ``eval.task_every`` rounds, on a seeded subset.

The simulation shares one PeftModel between clients; the evaluator copies the round's adapter
into it (as a client does before training), runs the configured tasks through the same engine
as ``fedtune eval``, and puts the previous adapter back. It consumes no global random numbers
(greedy decoding, or per-request seeded generators), so training is the same with or without it.
Metrics are logged as ``<task>_<metric>`` (``gsm8k_accuracy``, ``humaneval_pass@1``) in the round
row; in the ``local`` scenario each client's adapter is evaluated, logged in its client row, and
the round row holds the mean.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.eval.runner import EvalSettings, evaluate_model
from fedtune.eval.tasks import get_task

log = logging.getLogger(__name__)


class InLoopEvaluator:
    def __init__(self, cfg: Any, model: torch.nn.Module, tokenizer: Any, device: torch.device, template: Any,
                 echo=None):
        self.cfg, self.model, self.tok, self.device, self.template = cfg, model, tokenizer, device, template
        self.echo = echo or (lambda s: None)
        ev = cfg.eval
        for name in ev.tasks:  # unknown tasks or options fail before the first round
            get_task(name).configure(ev.task_options.get(name, {}))
        self.settings = EvalSettings(tasks=list(ev.tasks), limit=ev.task_limit, seed=cfg.seed,
                                     options={k: dict(v) for k, v in ev.task_options.items()},
                                     batch_size=ev.batch_size * 2, data_dir=cfg.data.data_dir,
                                     data_setting="data.data_dir", progress=cfg.output.progress)

    def due(self, rnd: int) -> bool:
        return rnd == self.cfg.fl.rounds or rnd % self.cfg.eval.task_every == 0

    def __call__(self, rnd: int, models: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        if not self.due(rnd):
            return {}, {}
        t0 = time.perf_counter()
        saved, was_training = get_adapter_state(self.model), self.model.training
        per_key: dict[str, dict[str, float]] = {}
        try:
            with torch.random.fork_rng(devices=[]):
                for key, state in models.items():
                    set_adapter_state(self.model, state)
                    res = evaluate_model(self.model, self.tok, self.settings, template=self.template,
                                         run_cfg=self.cfg, device=self.device, echo=log.info)
                    res.pop("_engine", None)
                    per_key[key] = {f"{name}_{r.metric}": r.score for name, r in res.items()}
        finally:
            set_adapter_state(self.model, saved)
            self.model.train(was_training)
        keys = sorted({k for v in per_key.values() for k in v})
        round_metrics: dict[str, Any] = {k: sum(v[k] for v in per_key.values() if k in v) /
                                         sum(1 for v in per_key.values() if k in v) for k in keys}
        round_metrics["task_eval_seconds"] = time.perf_counter() - t0
        self.echo("  tasks: " + ", ".join(f"{k} {v:.4f}" for k, v in round_metrics.items() if k in keys)
                  + f" (limit {self.settings.limit}, {round_metrics['task_eval_seconds']:.1f}s)")
        per_client = {k: v for k, v in per_key.items() if len(models) > 1}
        return round_metrics, per_client
