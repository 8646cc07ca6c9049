"""SCAFFOLD (Karimireddy et al. 2019, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", https://arxiv.org/abs/1910.06378), on the adapter tensors.

State: a server control variate c and one client variate c_i per client (adapter-shaped, 0 at
the start; c in the server state, c_i in the client's state — both checkpointed and resumed).

Rule — client i, given x and c: every optimizer step's gradient g (the step's raw minibatch gradient of
the local loss) is corrected to g − c_i + c before clipping and the optimizer step; afterwards
c_i⁺ = the mean of the raw gradients g over the steps actually applied. Under plain SGD with a
constant learning rate this equals the paper's option II, c_i − c + (x − y_i)/(K·η_l); unlike that
formula (OpenFedLLM's) it stays exact under AdamW, warm-up, schedules and skipped steps. The
client replies with its adapter y_i and Δc_i = c_i⁺ − c_i.

Server: x ← x + η_g·(ȳ − x), with ȳ the round's weighted mean (``fl.weighting``) of the y_i;
c ← c + (1/N)·Σ_{i∈S} Δc_i, with N the total number of clients (not the sampled ones).

What travels: the adapter and c down, the adapter and Δc_i up, both through the configured codecs
(Δc_i is an update: what a lossy up codec drops is kept for next time by error feedback).

Options: ``server_lr`` (η_g, default 1.0).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from fedtune.algorithms.base import (ADAPTER, ClientResult, Group, Instruction, Options, RoundContext, Setup,
                                     TensorDict, Update, register)
from fedtune.algorithms.fedavg import FedAvg, WeightedMean, l2_distance

CONTROL = "control"


class ScaffoldOptions(Options):
    #: global step size η_g on the averaged model change
    server_lr: float = Field(default=1.0, gt=0, allow_inf_nan=False)


class _Acc:
    def __init__(self) -> None:
        self.mean = WeightedMean()
        self.control_sum: dict[str, torch.Tensor] = {}

    def add_control(self, delta: TensorDict) -> None:
        for k, t in delta.items():
            self.control_sum[k] = self.control_sum.get(k, torch.zeros(t.shape, dtype=torch.float64)) + t.double()


@register
class Scaffold(FedAvg):
    name = "scaffold"
    Options = ScaffoldOptions
    groups = {ADAPTER: Group(delta=True), CONTROL: Group(update=True)}

    def __init__(self, options=None, *, weighting: str = "samples"):
        super().__init__(options, weighting=weighting)
        self.control: TensorDict = {}

    # ---- server half -------------------------------------------------------------------
    def init(self, setup: Setup) -> None:
        super().init(setup)
        self.control = {k: torch.zeros_like(v) for k, v in setup.adapter.items()}

    def configure_fit(self, ctx: RoundContext) -> dict[str, Instruction]:
        ins = Instruction({ADAPTER: self.adapter, CONTROL: self.control}, dict(ctx.config))
        return {cid: ins for cid in ctx.sampled}

    def begin(self, ctx: RoundContext) -> _Acc:
        return _Acc()

    def fold(self, ctx: RoundContext, acc: _Acc, update: Update) -> None:
        super().fold(ctx, acc.mean, update)
        acc.add_control(update.groups[CONTROL])

    def finish(self, ctx: RoundContext, acc: _Acc) -> dict[str, float]:
        mean = acc.mean.result()
        if mean is None:
            return {}
        lr = self.options.server_lr
        new = {k: (self.adapter[k].double() + lr * (mean[k].double() - self.adapter[k].double())).float() for k in mean}
        step = l2_distance(new, self.adapter)
        self.adapter = new
        n = len(ctx.clients)
        self.control = {k: (c.double() + acc.control_sum[k] / n).float() if k in acc.control_sum else c
                        for k, c in self.control.items()}
        norm = sum(float(c.double().pow(2).sum()) for c in self.control.values()) ** 0.5
        return {"server_step_norm": step, "control_norm": norm}

    def state_dict(self) -> tuple[dict[str, TensorDict], dict[str, Any]]:
        tensors, meta = super().state_dict()
        return {**tensors, CONTROL: self.control}, meta

    def load_state_dict(self, tensors: dict[str, TensorDict], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.control = dict(tensors.get(CONTROL, {}))

    # ---- client half ---------------------------------------------------------------------
    def instruction_spec(self, c, kind: str):
        spec = c.adapter_spec()
        return {ADAPTER: spec, CONTROL: dict(spec)} if kind == "fit" else {ADAPTER: spec}

    def client_fit(self, c, ins: Instruction) -> ClientResult:
        c.set_adapter(ins.groups[ADAPTER])
        names = [n for n, _ in c.params()]
        own = c.state.group("scaffold") or {n: torch.zeros_like(ins.groups[CONTROL][n]) for n in names}
        params = dict(c.params())
        correction = [(ins.groups[CONTROL][n] - own[n]).to(params[n].device) for n in names]
        grad_sum = [torch.zeros(params[n].shape, dtype=torch.float64, device=params[n].device) for n in names]
        seen = [0]

        def on_grads(ps: list[torch.nn.Parameter]) -> None:
            for p, corr, acc in zip(ps, correction, grad_sum):
                if p.grad is None:
                    continue
                acc.add_(p.grad.double())  # the raw minibatch gradient, before the correction
                p.grad.add_(corr.to(p.grad.dtype))
            seen[0] += 1

        stats = c.train(on_grads=on_grads)
        if seen[0]:
            new_own = {n: (acc / seen[0]).float().cpu() for n, acc in zip(names, grad_sum)}
        else:  # no step applied (all skipped as non-finite): the variate stays
            new_own = own
        c.state.set_group("scaffold", new_own)
        delta = {n: new_own[n] - own[n] for n in names}
        return ClientResult({ADAPTER: c.adapter(), CONTROL: delta}, c.fit_metrics(stats))
