"""The algorithm interface: one class per federated algorithm, holding its server half and its
client half (Flower's ``Strategy`` split into ``configure``/``aggregate``, plus the client side
Flower leaves to the user). See docs/architecture.md for the whole design and a worked example.

**Server half** (runs where the server runs; the round loop in :mod:`fedtune.server` calls it):

* :meth:`Algorithm.init` builds the server state from the initial adapter;
* :meth:`Algorithm.configure_fit` returns one :class:`Instruction` per sampled client — the
  same object for a broadcast (encoded once), or a different one per client;
* :meth:`Algorithm.begin` / :meth:`Algorithm.fold` / :meth:`Algorithm.finish` aggregate the
  round's :class:`Update` s. Every algorithm goes through these three, so streaming (FedAvg folds
  each reply as it arrives and drops it) and batch rules (the median needs them all) are one path;
* :meth:`Algorithm.configure_evaluate` says which adapter each evaluation client scores;
* :meth:`Algorithm.adapters` is what gets saved in PEFT format and evaluated;
* :meth:`Algorithm.state_dict` / :meth:`Algorithm.load_state_dict`: everything the server half
  keeps across rounds (the global adapter, moments, control variates, an accountant), saved in
  every checkpoint and restored on resume.

**Client half** (runs on every client, in the simulation and on a SuperNode alike):

* :meth:`Algorithm.instruction_spec`: what an instruction to this client may hold (it is parsed
  strictly against it before anything else happens);
* :meth:`Algorithm.client_fit`: the local procedure, built from the parts a
  :class:`~fedtune.client.ClientContext` offers (swap adapters in and out, the training loop with
  loss and gradient hooks, evaluation, the client's persistent state). The default is plain local
  training; FedProx adds a loss term, SCAFFOLD a gradient hook, Ditto would train twice.

**What travels** is named *groups* of tensors (``adapter``, ``control``, ...). :attr:`Algorithm.groups`
declares, per group, whether the lossy codecs apply and whether the reply may carry it as a
difference from what the client was sent (see :class:`Group`); shapes are declared per client and
round as :class:`TensorSpec` s. Anything outside the declared spec is rejected with a logged reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fedtune.codecs.base import TensorSpec
from fedtune.errors import FedtuneError, did_you_mean, unknown_name

if TYPE_CHECKING:
    from fedtune.client import ClientContext

TensorDict = dict[str, torch.Tensor]
#: the key of the single global adapter in :meth:`Algorithm.adapters`
GLOBAL = "global"
ADAPTER = "adapter"


# ---- what travels ----------------------------------------------------------------------------
#: group -> tensor name -> spec: what one message may hold
Spec = dict[str, dict[str, TensorSpec]]


def spec_of(groups: dict[str, TensorDict]) -> Spec:
    """The exact spec of ``groups`` (a reply shaped like its instruction)."""
    return {g: {k: TensorSpec.of(t) for k, t in ts.items()} for g, ts in groups.items()}


@dataclass(frozen=True)
class Group:
    """How one named group of tensors travels (the same policy both ways).

    ``lossy``: the configured tensor codecs (``comm.up``/``comm.down``: fp16, int8, top-k, ...)
    apply to it; off for tensors that must arrive exactly (seeds, integer masks). ``delta``: when a
    lossy codec runs in either direction, a reply carries this group as its difference from what the
    client was sent under the same names (small differences lose less to quantisation, and the
    server adds them to its exact copy); only for a group the reply shapes like its instruction.
    ``update``: the values are already an update (SCAFFOLD's change of control variate), so what a
    lossy ``up`` codec drops is kept by the client and added next time (error feedback), as for a
    ``delta`` group.
    """

    lossy: bool = True
    delta: bool = False
    update: bool = False


@dataclass
class Instruction:
    """What the server sends one client: tensor groups, config (round, per-client settings), and
    what the reply must hold (``reply``: ``None`` means shaped like ``groups`` for ``fit`` and no
    tensors for ``evaluate``)."""

    groups: dict[str, TensorDict] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    reply: Spec | None = None


@dataclass
class ClientResult:
    """What the client half's procedure returns: tensor groups (full values; the framework turns
    ``delta`` groups into differences and applies the codecs) and metrics (finite numbers)."""

    groups: dict[str, TensorDict] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Update:
    """One client's reply as the server half sees it: full values (differences already added
    back to what the server sent), the client's training-set size as the server knows it, and the
    metrics it reported."""

    cid: str
    groups: dict[str, TensorDict]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def tensors(self) -> TensorDict:
        """The ``adapter`` group, which every algorithm here sends."""
        return self.groups[ADAPTER]


# ---- what the server half knows -----------------------------------------------------------------
@dataclass
class Setup:
    """The federation, before the first round: checked by :meth:`Algorithm.check`."""

    clients: list[str]  # the training clients, in aggregation order
    num_train: dict[str, int]
    rounds: int
    per_round: int  # clients sampled each round
    adapter: TensorDict  # the initial adapter (names, shapes)


@dataclass
class RoundContext:
    """A round as the server half sees it."""

    round: int
    rounds: int  # total rounds of the run
    sampled: list[str]
    clients: list[str]  # every training client
    num_train: dict[str, int]
    #: config every instruction of the exchange carries: for ``fit`` the round and whether to
    #: evaluate the local adapter afterwards; for ``evaluate`` the round and the splits to score
    config: dict[str, Any] = field(default_factory=dict)
    #: clients whose adapters are evaluated (``configure_evaluate``)
    eval_clients: list[str] = field(default_factory=list)
    #: ``exchange(kind, {cid: Instruction}) -> [Update]``: one more round trip of one of the
    #: algorithm's own message kinds (:attr:`Algorithm.exchanges`), e.g. a key agreement before the
    #: fit (called from ``configure_fit``) or an unmasking after it (from ``finish``). Same
    #: transport, same strict parsing, same codecs as the fit.
    exchange: Callable[[str, dict[str, Instruction]], list[Update]] | None = None


# ---- options --------------------------------------------------------------------------------
class Options(BaseModel):
    """An algorithm's options (``fl.options`` in the config): typed, validated at load, unknown
    keys rejected with the closest valid one. Subclass per algorithm."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _options_error(name: str, err: ValidationError, cls: type[Options]) -> FedtuneError:
    problems = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = list(cls.model_fields)
            problems.append(f"unknown option 'fl.options.{key}' for {name}{did_you_mean(key, valid)}; "
                            f"options of {name}: {', '.join(valid) or '(none)'}")
        else:
            problems.append(f"fl.options.{key} ({name}): {e['msg']} (got {e.get('input')!r})")
    return FedtuneError("invalid config:\n  " + "\n  ".join(problems))


# ---- weighting: one rule for every path ---------------------------------------------------------
def weight(update: Update, weighting: str) -> float:
    """An update's aggregation weight: its client's training-set size (``samples``) or 1 (``uniform``).

    The one rule every path uses (there is no separate batch path to disagree with). A weight of 0
    contributes nothing; when the weights of a round sum to 0 (every client reports an empty
    training set) nothing is learned from it and the global adapter stays as it was (see
    :class:`fedtune.algorithms.fedavg.WeightedMean`)."""
    return 1.0 if weighting == "uniform" else float(max(update.num_examples, 0))


# ---- the interface ---------------------------------------------------------------------------------
class Algorithm:
    """Base class: FedAvg's structure with a pluggable aggregation. Subclasses override what differs."""

    name: ClassVar[str] = "base"
    Options: ClassVar[type[Options]] = Options
    groups: ClassVar[dict[str, Group]] = {ADAPTER: Group(delta=True)}
    #: message kinds beyond ``fit`` and ``evaluate`` this algorithm exchanges (key agreement,
    #: unmasking, ...): the client half answers them in :meth:`client_exchange`
    exchanges: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Options | None = None, *, weighting: str = "samples"):
        self.options = options if options is not None else self.Options()
        self.weighting = weighting
        #: the global adapter: the server's exact fp32 master copy (what clients hold is what the
        #: ``down`` codec makes of it)
        self.adapter: TensorDict = {}

    # ---- set-up ---------------------------------------------------------------------------
    def check(self, setup: Setup) -> None:
        """Refuse a federation this algorithm cannot work with (:class:`FedtuneError`), before the
        run writes anything (Krum needs n > 2f + 2 clients per round)."""

    def init(self, setup: Setup) -> None:
        """The server state at round 0."""
        self.adapter = dict(setup.adapter)

    # ---- server half ----------------------------------------------------------------------
    def configure_fit(self, ctx: RoundContext) -> dict[str, Instruction]:
        ins = Instruction({ADAPTER: self.adapter}, dict(ctx.config))
        return {cid: ins for cid in ctx.sampled}

    def begin(self, ctx: RoundContext) -> Any:
        """A fresh accumulator for the round's updates (default: a list of them)."""
        return []

    def fold(self, ctx: RoundContext, acc: Any, update: Update) -> None:
        """Take one update into the accumulator, in the sampled order (fixed whatever the network
        does). The server drops the update's tensors afterwards unless the accumulator keeps them."""
        acc.append(update)

    def finish(self, ctx: RoundContext, acc: Any) -> dict[str, float]:
        """Turn the round's accumulator into the next server state; returns round metrics."""
        raise NotImplementedError

    def configure_evaluate(self, ctx: RoundContext) -> dict[str, Instruction]:
        ins = Instruction({ADAPTER: self.adapter}, dict(ctx.config))
        return {cid: ins for cid in ctx.eval_clients}

    def adapters(self) -> dict[str, TensorDict]:
        """The adapter(s) to save and evaluate: ``{GLOBAL: adapter}``, or one per client."""
        return {GLOBAL: self.adapter}

    def state_dict(self) -> tuple[dict[str, TensorDict], dict[str, Any]]:
        """Server state as named tensor groups plus JSON metadata (never pickled)."""
        return {"global": self.adapter}, {}

    def load_state_dict(self, tensors: dict[str, TensorDict], meta: dict[str, Any]) -> None:
        self.adapter = dict(tensors.get("global", {}))

    # ---- client half ---------------------------------------------------------------------
    def instruction_spec(self, c: ClientContext, kind: str) -> Spec:
        """What an instruction of ``kind`` to this client must hold: the adapter it holds."""
        return {ADAPTER: c.adapter_spec()}

    def client_fit(self, c: ClientContext, ins: Instruction) -> ClientResult:
        """Plain local training on the received adapter (FedAvg's client)."""
        c.set_adapter(ins.groups[ADAPTER])
        stats = c.train(extra_loss=self.local_loss(c, ins))
        return ClientResult({ADAPTER: c.adapter()}, c.fit_metrics(stats))

    def local_loss(self, c: ClientContext, ins: Instruction):
        """A term added to the local objective (``model -> scalar tensor``), or ``None``."""
        return None

    def client_evaluate(self, c: ClientContext, ins: Instruction) -> dict[str, float]:
        """Loss of the received adapter on this client's splits (sums, for exact pooling)."""
        c.set_adapter(ins.groups[ADAPTER])
        return c.evaluate(list(ins.config.get("splits", ["val", "test"])))

    def client_exchange(self, kind: str, c: ClientContext, ins: Instruction) -> ClientResult:
        raise FedtuneError(f"{self.name} exchanges no '{kind}' messages")


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Register an algorithm class under ``cls.name`` (``fl.algorithm``)."""
    if cls.name in ALGORITHMS and ALGORITHMS[cls.name] is not cls:
        raise ValueError(f"algorithm '{cls.name}' is registered twice")
    ALGORITHMS[cls.name] = cls
    return cls


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise unknown_name("fl.algorithm", name, ALGORITHMS)
    return ALGORITHMS[name]


def parse_options(name: str, options: dict[str, Any] | None) -> Options:
    """``fl.options`` validated against the algorithm's :class:`Options` (one clear error)."""
    cls = algorithm_class(name).Options
    if options is not None and not isinstance(options, dict):
        raise FedtuneError(f"fl.options must be a mapping of {name}'s options, got {options!r}")
    try:
        return cls.model_validate(options or {})
    except ValidationError as e:
        raise _options_error(name, e, cls) from None


def get_algorithm(name: str, options: dict[str, Any] | None = None, *, weighting: str = "samples") -> Algorithm:
    """The algorithm ``name`` with ``options`` (a mapping, validated)."""
    return algorithm_class(name)(parse_options(name, options), weighting=weighting)


def build_algorithm(fl) -> Algorithm:
    """The algorithm a config's ``fl`` section asks for."""
    return get_algorithm(resolved_name(fl), fl.options, weighting=fl.weighting)


def resolved_name(fl) -> str:
    """``fl.scenario: local`` trains every client alone: the ``local`` algorithm."""
    return "local" if fl.scenario == "local" else fl.algorithm
