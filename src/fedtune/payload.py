"""What travels, between the algorithm layer and the wire: tensor groups ↔ :class:`Message`.

An algorithm speaks in named groups of tensors (``adapter``, ``control``, ...) with a
:class:`~fedtune.algorithms.base.Group` policy each; a :class:`~fedtune.messages.Message` holds a
flat dict. A tensor travels as ``group/name`` (group names hold no ``/``; peft's parameter names
hold none either). :class:`Wire` applies the run's ``comm`` settings to both directions, the same
way for every algorithm:

* the lossy tensor codecs of ``comm.up``/``comm.down`` touch only groups with ``lossy``;
* with a lossy codec in either direction, a reply carries each ``delta`` group as its difference
  from what the client received, and the server adds it to what it sent — its exact fp32 master —
  so downlink rounding never piles up round after round;
* what a lossy ``up`` codec drops from a difference (a ``delta`` or ``update`` group) is kept in the
  client's state and added to the next one (error feedback); the state lives in checkpoints;
* what may arrive is checked strictly: an instruction against what the client half declares
  (:meth:`~fedtune.algorithms.base.Algorithm.instruction_spec`), a reply against what the server
  half said it expects from that client (:attr:`~fedtune.algorithms.base.Instruction.reply`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from fedtune.algorithms.base import ClientResult, Group, Instruction, Spec, TensorDict, Update, spec_of
from fedtune.codecs import Pipeline, build_pipeline
from fedtune.codecs.base import TensorSpec
from fedtune.config import CommConfig
from fedtune.errors import MessageError
from fedtune.messages import Message
from fedtune.state import ClientState

SEP = "/"


def flatten(groups: dict[str, TensorDict]) -> TensorDict:
    out: TensorDict = {}
    for g, tensors in groups.items():
        if not g or SEP in g:
            raise ValueError(f"tensor group name {g!r} must be non-empty and hold no '{SEP}'")
        out.update({f"{g}{SEP}{k}": v for k, v in tensors.items()})
    return out


def unflatten(tensors: TensorDict) -> dict[str, TensorDict]:
    groups: dict[str, TensorDict] = {}
    for key, t in tensors.items():
        g, sep, name = key.partition(SEP)
        if not sep or not name:
            raise MessageError(f"tensor '{key[:80]}' belongs to no group (names are group/name)")
        groups.setdefault(g, {})[name] = t
    return groups


def flat_spec(spec: Spec) -> dict[str, TensorSpec]:
    return {f"{g}{SEP}{k}": s for g, names in spec.items() for k, s in names.items()}


def _sq_norm(tensors: TensorDict) -> float:
    return sum(float(v.double().pow(2).sum()) for v in tensors.values())


@dataclass
class Wire:
    """One run's message policy: the codecs of both directions and an algorithm's group policies."""

    comm: CommConfig
    groups: dict[str, Group]

    @cached_property
    def up(self) -> Pipeline:
        return build_pipeline(self.comm, "up")

    @cached_property
    def down(self) -> Pipeline:
        return build_pipeline(self.comm, "down")

    @cached_property
    def sends_delta(self) -> bool:
        """Replies carry ``delta`` groups as differences whenever a lossy codec runs either way:
        small differences lose less to quantisation than whole weights."""
        return self.up.lossy or self.down.lossy

    def _policy(self, group: str) -> Group:
        return self.groups.get(group, Group())

    def _exact(self, tensors_by_group: dict[str, TensorDict]) -> frozenset[str]:
        return frozenset(f"{g}{SEP}{k}" for g, ts in tensors_by_group.items() if not self._policy(g).lossy
                         for k in ts)

    # ---- server → client --------------------------------------------------------------------
    def instruction(self, ins: Instruction) -> Message:
        return Message(flatten(ins.groups), config=dict(ins.config), codec=self.down, exact=self._exact(ins.groups))

    def as_sent(self, groups: dict[str, TensorDict]) -> dict[str, TensorDict]:
        """What a client decodes when the server sends ``groups`` (the ``down`` codec in memory:
        deterministic, so it equals decoding the real bytes)."""
        return {g: (self.down.roundtrip(ts) if self._policy(g).lossy else dict(ts)) for g, ts in groups.items()}

    @staticmethod
    def reply_spec(kind: str, ins: Instruction) -> dict[str, TensorSpec]:
        """What ``kind``'s reply to ``ins`` must hold (an evaluation: no tensors)."""
        if kind == "evaluate":
            return {}
        return flat_spec(ins.reply if ins.reply is not None else spec_of(ins.groups))

    # ---- client side -------------------------------------------------------------------------
    @staticmethod
    def read_instruction(msg: Message) -> Instruction:
        return Instruction(unflatten(msg.tensors), dict(msg.config))

    def result(self, res: ClientResult, received: Instruction, state: ClientState) -> Message:
        """The reply message of a client procedure's result: ``delta`` groups as differences from
        ``received`` (when a lossy codec runs), error feedback on what the ``up`` codec drops."""
        groups: dict[str, TensorDict] = {}
        delta: list[str] = []
        diffs: dict[str, TensorDict] = {}  # groups that are differences (error feedback applies)
        for g, tensors in res.groups.items():
            pol, ref = self._policy(g), received.groups.get(g)
            if self.sends_delta and pol.delta and ref is not None and spec_of({g: ref}) == spec_of({g: tensors}):
                tensors = {k: tensors[k] - ref[k] for k in tensors}
                delta.append(g)
            groups[g] = tensors
            if pol.lossy and (g in delta or pol.update):
                diffs[g] = tensors
        metrics = dict(res.metrics)
        if self.up.lossy and diffs:
            metrics["up_rel_error"] = self._feedback(groups, diffs, state)
        return Message(flatten(groups), metrics=metrics, codec=self.up, delta=tuple(delta), exact=self._exact(groups))

    def _feedback(self, groups: dict[str, TensorDict], diffs: dict[str, TensorDict], state: ClientState) -> float:
        """Error feedback (Seide et al. 2014; Karimireddy et al. 2019, arXiv 1901.09847): add the
        residual kept from last time, then keep ``x - C(x)`` for the ``x`` sent now. Returns the
        relative error of what is sent (‖x − C(x)‖ / ‖x‖)."""
        ef = self.comm.error_feedback
        residual = state.group("ef") if ef else {}
        sq, lost = 0.0, 0.0
        new_residual: TensorDict = {}
        for g, tensors in diffs.items():
            x = {k: v + residual[f"{g}{SEP}{k}"] if f"{g}{SEP}{k}" in residual else v for k, v in tensors.items()}
            sent = self.up.roundtrip(x)
            err = {k: x[k] - sent[k] for k in x}
            groups[g] = x
            new_residual.update({f"{g}{SEP}{k}": v for k, v in err.items()})
            sq, lost = sq + _sq_norm(x), lost + _sq_norm(err)
        if ef:
            state.set_group("ef", new_residual)
        return math.sqrt(lost) / math.sqrt(sq) if sq > 0 else 0.0

    # ---- server side -------------------------------------------------------------------------
    def update(self, cid: str, msg: Message, sent: Instruction, num_examples: int) -> Update:
        """A parsed reply as full values: ``delta`` groups added back to what the server sent this
        client (its exact copy). A delta the algorithm did not allow is a :class:`MessageError`."""
        groups = unflatten(msg.tensors)
        for g in msg.delta:
            ref = sent.groups.get(g)
            if not self._policy(g).delta or ref is None or g not in groups or groups[g].keys() != ref.keys():
                raise MessageError(f"reply carries group '{g[:64]}' as a difference, which this exchange does not allow")
            groups[g] = {k: ref[k] + v for k, v in groups[g].items()}
        return Update(cid, groups, num_examples, dict(msg.metrics))
