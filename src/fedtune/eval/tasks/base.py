"""The one interface every evaluation task implements (nanochat's ``tasks/`` habit).

A task is a small dataclass: its fields are its options (``fedtune eval ... gsm8k.shots=4``), and
it says what kind it is:

* ``generate``: :meth:`Task.requests` turns an example into prompts, the shared generation loop
  (:meth:`~fedtune.eval.engine.Engine.generate`) completes them, :meth:`Task.score` grades them;
* ``choice``: :meth:`Task.pairs` turns an example into ``(context, continuation)`` pairs, the
  shared log-likelihood loop scores them, :meth:`Task.score` picks and grades;
* anything else overrides :meth:`Task.run` (held-out loss; suites such as HELM-MINI).

Adding a task is one file with one such class, one ``register_task`` line, and one test.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fedtune.errors import FedtuneError, did_you_mean, unknown_name

if TYPE_CHECKING:
    from fedtune.config import Config, DataConfig
    from fedtune.data.templates import Template
    from fedtune.eval.engine import Engine, GenRequest


@dataclass
class TaskContext:
    """What a task may use: the engine (model + tokenizer), where data lives, the run."""

    engine: Engine
    #: the prompt template the adapter was trained with (``None`` for a base model).
    template: Template | None = None
    #: ``data_dir`` for locating files (plus ``$FEDTUNE_DATA_DIR`` and the cache).
    data_cfg: DataConfig | None = None
    #: the option that sets ``data_cfg.data_dir``, named in missing-file errors.
    data_setting: str = "--data-dir"
    #: the run's config when evaluating a run directory (held-out loss uses its data split).
    run_cfg: Config | None = None
    #: evaluate at most this many examples (a seeded random subset); ``None``: the task's default.
    limit: int | None = None
    seed: int = 0
    progress: bool = True

    @property
    def tokenizer(self) -> Any:
        return self.engine.tok


@dataclass
class TaskResult:
    task: str
    #: the headline metric's name and value (what tables show).
    metric: str
    score: float
    #: every metric (headline included), e.g. per-subject accuracy.
    metrics: dict[str, Any]
    num_examples: int
    seconds: float = 0.0
    #: things a reader must know (e.g. "MMLU: the authors' pre-release snapshot").
    notes: list[str] = field(default_factory=list)
    #: per-example records (prompt, output, correctness, reason), saved as JSONL.
    samples: list[dict[str, Any]] = field(default_factory=list)
    #: sub-results (HELM-MINI's parts).
    parts: dict[str, TaskResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("task", "metric", "score", "metrics", "num_examples", "seconds", "notes")}
        if self.parts:
            d["parts"] = {k: v.to_dict() for k, v in self.parts.items()}
        return d


def select(examples: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """At most ``limit`` examples: a seeded random subset, kept in the original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise FedtuneError(f"--limit must be at least 1, got {limit}")
    picked = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in picked]


@dataclass
class Task:
    """Base class; subclasses set the class variables and implement the kind's methods."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "generate"  # generate | choice | custom
    #: the headline metric (a key of the aggregated metrics).
    metric: ClassVar[str] = "accuracy"
    description: ClassVar[str] = ""
    #: examples evaluated when no ``--limit`` is given (``None``: all).
    default_limit: ClassVar[int | None] = None
    #: inclusive bounds of this task's numeric options, on top of :data:`COMMON_BOUNDS`.
    bounds: ClassVar[dict[str, tuple[float, float]]] = {}

    def __post_init__(self) -> None:
        """Check the options generation tasks share, when the task is configured: a bad value is
        one error before any model is loaded, not a crash after the generation work."""
        opts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        where = f"option '{self.name}."
        if opts.get("temperature", 0.0) < 0:
            raise FedtuneError(f"{where}temperature' must be 0 (greedy) or positive, got {opts['temperature']}")
        if not 0 < opts.get("top_p", 1.0) <= 1:
            raise FedtuneError(f"{where}top_p' must lie in (0, 1], got {opts['top_p']}")
        if opts.get("max_new_tokens", 1) < 1:
            raise FedtuneError(f"{where}max_new_tokens' must be at least 1, got {opts['max_new_tokens']}")
        if opts.get("prompt", "raw") not in ("raw", "template"):
            raise FedtuneError(f"{where}prompt' must be 'raw' or 'template', got {opts['prompt']!r}")
        for key, (lo, hi) in {**COMMON_BOUNDS, **self.bounds}.items():
            v = opts.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not lo <= v <= hi:
                raise FedtuneError(f"{where}{key}' must be from {lo:,.10g} to {hi:,.10g}, got {v!r}")

    # ---- what subclasses implement ------------------------------------------------------
    def examples(self, ctx: TaskContext) -> list[dict[str, Any]]:
        raise NotImplementedError

    def requests(self, ex: dict[str, Any], ctx: TaskContext) -> list[GenRequest]:
        raise NotImplementedError(f"{self.name} is not a generation task")

    def pairs(self, ex: dict[str, Any], ctx: TaskContext) -> list[tuple[str, str]]:
        raise NotImplementedError(f"{self.name} is not a multiple-choice task")

    def score(self, ex: dict[str, Any], output: list[Any], ctx: TaskContext) -> dict[str, Any]:
        """Grade one example; ``output`` is its Generations (generate) or log-likelihoods (choice).

        Returns a per-example record; numeric keys named in :meth:`aggregate` are averaged.
        """
        raise NotImplementedError

    def score_all(self, exs: list[dict[str, Any]], outputs: list[list[Any]], ctx: TaskContext) -> list[dict[str, Any]]:
        return [self.score(ex, out, ctx) for ex, out in zip(exs, outputs)]

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean of the headline metric over examples (override for more)."""
        vals = [float(r[self.metric]) for r in records]
        return {self.metric: sum(vals) / len(vals) if vals else float("nan")}

    def notes(self) -> list[str]:
        return []

    # ---- the two shared loops ---------------------------------------------------------------
    def run(self, ctx: TaskContext) -> TaskResult:
        t0 = time.perf_counter()
        limit = ctx.limit if ctx.limit is not None else self.default_limit
        exs = select(self.examples(ctx), limit, ctx.seed)
        if self.kind == "generate":
            per_ex = [self.requests(ex, ctx) for ex in exs]
            flat = ctx.engine.generate([r for rs in per_ex for r in rs], desc=self.name)
        elif self.kind == "choice":
            per_ex = [self.pairs(ex, ctx) for ex in exs]
            flat = ctx.engine.loglikelihood([p for ps in per_ex for p in ps], desc=self.name)
        else:
            raise NotImplementedError(f"task kind '{self.kind}' must override run()")
        outputs, k = [], 0
        for items in per_ex:
            outputs.append(flat[k : k + len(items)])
            k += len(items)
        records = self.score_all(exs, outputs, ctx)
        metrics = self.aggregate(records)
        return TaskResult(self.name, self.metric, float(metrics[self.metric]), metrics, len(exs),
                          time.perf_counter() - t0, self.notes(), records)

    # ---- options ----------------------------------------------------------------------------
    @classmethod
    def options(cls) -> dict[str, Any]:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(cls)}

    @classmethod
    def configure(cls, opts: dict[str, Any]) -> Task:
        """An instance with ``opts`` applied; unknown or mistyped options give one clear error."""
        valid = cls.options()
        kwargs = {}
        for key, value in opts.items():
            if key not in valid:
                raise FedtuneError(f"unknown option '{cls.name}.{key}'{did_you_mean(key, valid)}; "
                                   f"options of {cls.name}: {', '.join(valid) or '(none)'}")
            default = valid[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise FedtuneError(f"option '{cls.name}.{key}' must be true or false, got {value!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise FedtuneError(f"option '{cls.name}.{key}' must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise FedtuneError(f"option '{cls.name}.{key}' must be a finite number, got {value!r}")
                if isinstance(default, int) and value != int(value):
                    raise FedtuneError(f"option '{cls.name}.{key}' must be a whole number, got {value!r}")
                value = type(default)(value)
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)


#: bounds every task's options of these names obey (a typo such as max_new_tokens=1e9 is one
#: error, not an hour of generation or an allocation failure).
COMMON_BOUNDS: dict[str, tuple[float, float]] = {
    "max_new_tokens": (1, 1 << 20), "shots": (0, 1000), "batch_size": (1, 1 << 16), "temperature": (0, 1000)}


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise unknown_name("evaluation task", name, TASKS)
    return TASKS[name]


def wrap_prompt(text: str, ctx: TaskContext, how: str) -> str:
    """``raw``: the text itself; ``template``: the text as the instruction of the adapter's
    training template (``alpaca`` when evaluating a base model)."""
    if how == "raw":
        return text
    if how != "template":
        raise FedtuneError(f"prompt format must be 'raw' or 'template', got {how!r}")
    from fedtune.data import Record, get_template

    tpl = ctx.template or get_template("alpaca")
    return tpl.prompt(Record(text, "", "", ""), ctx.tokenizer)
