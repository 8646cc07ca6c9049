"""Typed run configuration: YAML in, dotted overrides from the CLI, validated where defined.

Unknown keys are rejected with the closest valid key (torchtune's ``_validate.py`` habit), and the
resolved config is saved beside every run so a run directory says exactly what produced it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedtune.errors import FedtuneError, did_you_mean
from fedtune.offsite.config import OffsiteConfig

#: bounds shared by many fields: counts that size an allocation or a loop stay far below what a
#: machine can hold (a typo such as ``train.batch_size=10**9`` is an error here, not an out-of-memory
#: traceback later), and every integer fits the int64 torch and NumPy need.
MAX_SEED = 2**63  # exclusive; derive_seed/np/torch all take 0 <= seed < 2**63
MAX_SIZE = 1 << 16  # ranks, widths, batch sizes, virtual tokens
MAX_COUNT = 10**9  # record caps and other plain counts
MAX_ROUNDS = 10**6
MAX_SECONDS = 10**7  # ~4 months: longer timeouts overflow the waits they feed


class _Section(BaseModel):
    # allow_inf_nan=False: every float field rejects inf and nan (``train.lr=inf`` used to pass and
    # then every client update was rejected as non-finite)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """Which base model to load (see :mod:`fedtune.models`)."""

    #: ``smollm2-135m-instruct`` (embedded, offline), ``tiny-llama``/``tiny-qwen2``/``tiny-gpt2``/
    #: ``tiny-opt`` (random, for tests), a local HF directory, a ``.gguf`` file or a hub id.
    name: str = "smollm2-135m-instruct"
    #: dtype of the frozen base weights; adapters always train in fp32. ``auto``: ``bfloat16``
    #: exactly when ``train.precision`` runs as bf16 on this machine, else ``float32``
    #: (:mod:`fedtune.hardware`).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    #: where dequantised GGUF weights are cached (default: ``~/.cache/fedtune/models``).
    cache_dir: str | None = None
    trust_remote_code: bool = False


class DataConfig(_Section):
    """Which data, how it is split across clients and how it becomes tokens."""

    #: a preset (``fed-dolly``, ``fed-gsm8k-3``, ...) fills the fields below; explicit keys win.
    preset: str | None = None
    #: a built-in source (``dolly``, ``gsm8k``, ``alpaca``, ...) or a path to a JSON/JSONL/CSV file.
    source: str | None = None
    #: for files: our field -> the file's column, e.g. ``{instruction: question, output: answer}``.
    fields: dict[str, str] = Field(default_factory=dict)
    #: local directory holding the source files (else ``$FEDTUNE_DATA_DIR``, else the cache).
    data_dir: str | None = None
    splitter: Literal["iid", "dirichlet", "meta"] | None = None
    num_clients: int | None = Field(default=None, ge=1, le=100_000)
    #: record field used by the dirichlet and meta splitters.
    label_field: str = "category"
    #: dirichlet concentration; smaller is more heterogeneous.
    alpha: float = Field(default=0.5, gt=0)
    #: dirichlet: every client gets at least this many records.
    min_client_size: int = Field(default=10, ge=1, le=MAX_COUNT)
    #: label values dropped before splitting (fed-codealpaca drops X86-64 Assembly).
    exclude_labels: list[str] = Field(default_factory=list)
    #: per-client fractions carved from each client's own data.
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    test_fraction: float = Field(default=0.05, ge=0, lt=1)
    #: cap each client's records (after splitting) for CPU-sized runs; ``null`` keeps all.
    max_records_per_client: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    #: cap val/test examples per client for fast in-loop evaluation.
    max_eval_records_per_client: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    #: ``alpaca`` (FS-LLM's exact wording), ``alpaca_no_input`` or ``chat`` (model's template).
    template: Literal["alpaca", "alpaca_no_input", "chat"] = "alpaca"
    #: checked against the model's context length before the run directory is made.
    max_length: int = Field(default=512, ge=8, le=1 << 20)
    #: an example longer than max_length: cut the prompt from the left, or drop (and count) it.
    truncation: Literal["left", "drop"] = "left"
    #: directory of the tokenisation cache (default: ``~/.cache/fedtune/tokenized``).
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self


class PeftConfig(_Section):
    """Adapter built with HF peft; options not used by the method are ignored."""

    method: Literal["lora", "prefix", "p_tuning", "prompt_tuning"] = "lora"
    #: also checked against the model's hidden size once it is loaded (before the run directory).
    r: int = Field(default=8, ge=1, le=MAX_SIZE)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    #: modules to adapt; ``null`` uses the architecture table in :mod:`fedtune.models`.
    target_modules: list[str] | None = None
    num_virtual_tokens: int = Field(default=20, ge=1, le=MAX_SIZE)
    #: prompt tuning: initialise the soft prompt from this text (``null``: random).
    prompt_init_text: str | None = None
    #: P-tuning prompt encoder width.
    encoder_hidden_size: int = Field(default=128, ge=1, le=MAX_SIZE)


class TrainConfig(_Section):
    """The local training loop each client runs every round."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    #: runs over the whole run (rounds x local steps), never restarted per round: local step s of
    #: round r is step (r-1)*steps + s for every client, sampled in earlier rounds or not.
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0, le=MAX_COUNT)
    #: optimizer steps per round; ignored when ``local_epochs`` is set.
    local_steps: int = Field(default=30, ge=1, le=10**7)
    local_epochs: float | None = Field(default=None, gt=0, le=10**4)
    batch_size: int = Field(default=1, ge=1, le=MAX_SIZE)
    grad_accum: int = Field(default=1, ge=1, le=MAX_SIZE)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    #: autocast dtype of the forward pass; adapter weights and optimizer state stay fp32.
    #: ``auto``: bf16 where this device multiplies bf16 natively (CUDA 8.0+, AMX/AVX512-BF16
    #: CPUs), else fp32 (:mod:`fedtune.hardware`). The default stays fp32 so a config gives the
    #: same numbers on every machine; the shipped configs say ``auto``.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    # --- harden-a (issue 13, item 14): the two fp16 loss-scale fields read by training.make_grad_scaler ---
    #: fp16 only: the loss scale each client's GradScaler starts from (then halved on an overflow,
    #: doubled after ``fp16_growth_interval`` clean steps). torch's own 2^16 made some models skip
    #: most first-round steps as non-finite.
    fp16_init_scale: float = Field(default=1024.0, ge=1, le=2.0**24)
    #: fp16 only: clean optimizer steps after which the loss scale doubles.
    fp16_growth_interval: int = Field(default=2000, ge=1)
    # --- end harden-a ---
    #: keep each client's optimizer state between rounds (else a fresh optimizer every round).
    keep_optimizer_state: bool = True
    #: batch examples of similar length so little compute goes to padding.
    group_by_length: bool = True
    #: LoRA dropout masks from 16-bit uniforms, four per draw of torch's generator, on the CPU
    #: (:mod:`fedtune.dropout`): faster masks, p rounded to a multiple of 2^-16, other random
    #: numbers than the default (a different, equally valid sample of the same run).
    fast_dropout: bool = False
    #: run each batch's real tokens only, as one row, attention in the padded layout
    #: (:mod:`fedtune.padding_free`): the padded batch's numbers without compute on its padding.
    #: Applies where fedtune's CPU training attention runs and the model passes a one-time check.
    padding_free: bool = True
    #: recompute each transformer block's activations in the backward instead of keeping them
    #: (transformers' gradient checkpointing, non-reentrant; the RNG state is replayed, so the
    #: gradients are the same): activation memory for about a third more compute, for long sequences.
    gradient_checkpointing: bool = False
    #: pad each training batch to a multiple of this many tokens (1: to its longest example). Fewer
    #: distinct shapes means fewer per-shape kernels cached by oneDNN (see docs/benchmarks.md#train_memory).
    pad_to_multiple: int = Field(default=1, ge=1, le=4096)
    #: where per-client state (optimizer moments, data position, fp16 loss scale) lives between rounds:
    #: ``disk`` keeps memory flat however many clients there are; ``memory`` is a bit faster.
    client_state: Literal["disk", "memory"] = "disk"
    #: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``; checked
    #: against this machine before a run writes anything.
    device: str = "auto"
    #: clustered mode: processes sharing each client's local training (torch DDP; each takes a
    #: disjoint slice of every step's examples). 1: a single process. See docs/codecs.md#clustered.
    world_size: int = Field(default=1, ge=1, le=64)
    #: ``auto``: NCCL on CUDA devices, gloo on CPU.
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        # the name only; whether this machine has the device is checked when the run starts
        # (fedtune.utils.resolve_device): a config may be written on one machine for another
        if v != "auto":
            import torch

            try:
                torch.device(v)
            except (RuntimeError, ValueError):
                raise ValueError(f"'{v}' is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
        return v


#: Message codec names by role; :mod:`fedtune.codecs` implements each (a contract test keeps the
#: two in step). A pipeline is: at most one sparsifier, then at most one value codec, then at most
#: one byte compressor — in that order (e.g. ``[topk, int8, zstd]``).
SPARSIFIERS = ("topk",)
VALUE_CODECS = ("fp16", "bf16", "int8", "int4")
COMPRESSORS = ("deflate", "gzip", "zstd")
CODEC_NAMES = SPARSIFIERS + VALUE_CODECS + COMPRESSORS


def check_codec_pipeline(names: list[str], where: str) -> None:
    """Raise ``ValueError`` unless ``names`` is a valid pipeline (known names, sensible order).

    Shared by config validation and by the strict parser of incoming messages.
    """
    roles = []
    for name in names:
        if name not in CODEC_NAMES:
            raise ValueError(f"unknown codec '{name}' in {where}{did_you_mean(name, CODEC_NAMES)}; "
                             f"valid: {', '.join(CODEC_NAMES)}")
        roles.append(0 if name in SPARSIFIERS else 1 if name in VALUE_CODECS else 2)
    if len(set(roles)) != len(roles) or roles != sorted(roles):
        raise ValueError(f"{where} = {list(names)}: use at most one sparsifier ({', '.join(SPARSIFIERS)}), "
                         f"then at most one value codec ({', '.join(VALUE_CODECS)}), then at most one "
                         f"compressor ({', '.join(COMPRESSORS)}), in that order, e.g. [topk, int8, zstd]")


class CommConfig(_Section):
    """Message codecs per direction (see docs/codecs.md). ``[]`` sends plain fp32 safetensors.

    ``up`` is client → server (the update), ``down`` server → client (the global adapter). With a
    lossy codec in either direction clients send their update as a difference from the adapter they
    received, and the server keeps an exact fp32 master copy (no rounding error piles up).
    """

    up: list[str] = Field(default_factory=list)
    down: list[str] = Field(default_factory=list)
    #: int8/int4: values per block sharing one fp32 scale (smaller: more accurate, more bytes).
    block_size: int = Field(default=64, ge=2, le=1 << 20)
    #: topk: fraction of each tensor's entries sent (at least one per tensor).
    topk_fraction: float = Field(default=0.1, gt=0, le=1)
    #: keep what a lossy ``up`` codec dropped on the client and add it to the next update
    #: (error feedback; Seide et al. 2014, Karimireddy et al. 2019, https://arxiv.org/abs/1901.09847).
    error_feedback: bool = True
    #: compressor level (deflate/gzip 0-9, default 6; zstd 1-22, default 3); ``null``: default.
    level: int | None = Field(default=None, ge=-(2**31), lt=2**31)

    @field_validator("up", "down")
    @classmethod
    def _pipeline(cls, v: list[str], info) -> list[str]:
        check_codec_pipeline(v, f"comm.{info.field_name}")
        if info.field_name == "down" and any(n in SPARSIFIERS for n in v):
            raise ValueError("comm.down cannot use topk: the global adapter is sent whole (a client may "
                             "not hold the previous one to add a sparse difference to); use it in comm.up")
        return v

    @model_validator(mode="after")
    def _level(self) -> CommConfig:
        if self.level is None:
            return self
        for name in {*self.up, *self.down} & set(COMPRESSORS):
            lo, hi = (1, 22) if name == "zstd" else (0, 9)
            if not lo <= self.level <= hi:
                raise ValueError(f"comm.level={self.level} is out of range for {name} ({lo}-{hi})")
        return self


class FLConfig(_Section):
    """The federated part: who trains, how updates are combined."""

    #: ``fed``: federated; ``global``: one client holding all data; ``local``: each client alone
    #: (the ``local`` algorithm: nothing is aggregated).
    scenario: Literal["fed", "global", "local"] = "fed"
    #: a registered algorithm (docs/algorithms.md): fedavg, fedprox, fedavgm, fedadam, fedyogi,
    #: fedadagrad, scaffold, median, trimmed_mean, krum, multi_krum, norm_bounding, local.
    algorithm: str = "fedavg"
    #: the algorithm's options, e.g. ``{mu: 0.01}`` for fedprox; validated against the algorithm's
    #: own typed options (unknown keys are rejected with the closest valid one).
    options: dict[str, Any] = Field(default_factory=dict)
    #: ``samples``: weight each update by its client's training examples; ``uniform``: equal.
    #: (The robust rules — median, trimmed_mean, krum, multi_krum, norm_bounding — ignore sizes:
    #: a Byzantine client could claim any number of examples.)
    weighting: Literal["samples", "uniform"] = "samples"
    rounds: int = Field(default=10, ge=1, le=MAX_ROUNDS)
    #: clients sampled per round: an int count, or a float fraction in (0, 1].
    clients_per_round: int | float | None = None

    @model_validator(mode="after")
    def _sampling(self) -> FLConfig:
        c = self.clients_per_round
        if isinstance(c, float) and not 0 < c <= 1:
            raise ValueError("clients_per_round as a fraction must lie in (0, 1]")
        if isinstance(c, int) and not isinstance(c, bool) and not 1 <= c <= 100_000:
            raise ValueError("clients_per_round must be at least 1 (and is checked against the "
                             "number of clients once the data is split)")
        if self.scenario == "local" and self.algorithm not in ("fedavg", "local"):
            raise ValueError(f"fl.scenario=local trains every client alone (the 'local' algorithm); "
                             f"fl.algorithm={self.algorithm} needs fl.scenario=fed or global")
        return self


class EvalConfig(_Section):
    """Loss/perplexity evaluation inside the round loop."""

    #: evaluate every k rounds (and always after the last round); 0 disables in-loop eval.
    every: int = Field(default=1, ge=0, le=MAX_ROUNDS)
    splits: list[Literal["val", "test"]] = Field(default_factory=lambda: ["val", "test"])
    batch_size: int = Field(default=8, ge=1, le=MAX_SIZE)
    #: also evaluate each client's own (local) adapter on its data, not only the global one.
    local_models: bool = False
    #: benchmark tasks of ``fedtune eval`` (e.g. ``[gsm8k]``) run on the adapter(s) in the loop,
    #: on a seeded subset of ``task_limit`` examples, every ``task_every`` rounds (and after the
    #: last); logged as ``<task>_<metric>`` with the other round metrics. Empty: none.
    tasks: list[str] = Field(default_factory=list)
    task_limit: int = Field(default=20, ge=1, le=MAX_COUNT)
    task_every: int = Field(default=1, ge=1, le=MAX_ROUNDS)
    #: per-task options as on the command line, e.g. ``{humaneval: {max_new_tokens: 256}}``.
    task_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class CheckpointConfig(_Section):
    #: checkpoint every k rounds (and always after the last round); 0: only at the end.
    every: int = Field(default=5, ge=0, le=MAX_ROUNDS)
    #: how many checkpoints to keep (older ones are deleted).
    keep: int = Field(default=2, ge=1, le=10_000)


class OutputConfig(_Section):
    #: run directory; ``null`` makes ``runs/<name>-<timestamp>``.
    dir: str | None = None
    #: when ``dir`` already holds a run: replace it (it is renamed aside and deleted once the new
    #: run is set up, put back if that fails) instead of refusing. ``--resume`` ignores this.
    overwrite: bool = False
    #: used in ``runs/<name>-<timestamp>`` when ``dir`` is null: letters, digits, ``.``, ``_``, ``-``
    #: (no path separators, so a name cannot point outside ``runs/``), at most 100 characters.
    name: str = "run"
    tensorboard: bool = True
    progress: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(f"{v[:60]!r} is not a run name: use at most 100 letters, digits, '.', '_' or "
                             "'-', not starting with '.' (no '/': set output.dir to choose the directory)")
        return v


class DeployConfig(_Section):
    """Networked federation on Flower (``fedtune deploy``); ignored by the in-process simulation.

    Addresses, certificates and keys are command-line flags of ``fedtune deploy ...``, not config:
    they differ per machine while this section is part of the run.
    """

    #: fedtune client ids in aggregation/sampling order. Empty: the clients the SuperNodes announce,
    #: in natural order (``client_2`` before ``client_10``; the simulation's order for every splitter).
    clients: list[str] = Field(default_factory=list)
    #: fewest fit replies a round needs. Fewer clients connected: the round waits up to
    #: ``join_timeout_s`` for them; fewer replies in time: the run stops (its last checkpoint stays,
    #: resume it with ``fedtune deploy submit --resume``). ``null``: every sampled client.
    min_clients: int | None = Field(default=None, ge=1, le=100_000)
    #: seconds to wait for the replies of one fit or evaluate exchange; a client that has not
    #: answered by then is recorded as missing and the round goes on without it.
    round_timeout_s: float = Field(default=600, gt=0, le=MAX_SECONDS)
    #: seconds to wait at start (and before a round that lacks clients) for SuperNodes to connect.
    join_timeout_s: float = Field(default=300, gt=0, le=MAX_SECONDS)
    #: seconds a SuperNode has to say which clients it holds. One that stays silent is left out and
    #: asked again after a back-off that doubles each time (up to 10 minutes), so a node that
    #: connects but never answers does not hold up the run.
    query_timeout_s: float = Field(default=30, gt=0, le=MAX_SECONDS)
    #: only SuperNodes registered with their client ids (``fedtune deploy register --client-id``)
    #: may hold clients. Without it a node registered under client ids may hold only those, and
    #: an unnamed node may announce any id that no live node holds yet.
    require_bound_clients: bool = False
    #: seconds between polls of the SuperLink for replies.
    poll_s: float = Field(default=0.2, gt=0, le=3600)


class Config(_Section):
    """A whole fedtune run."""

    #: 0 <= seed < 2**63 (what NumPy, torch and fedtune's derived seeds accept).
    seed: int = Field(default=0, ge=0, lt=MAX_SEED)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    fl: FLConfig = Field(default_factory=FLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    comm: CommConfig = Field(default_factory=CommConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    #: offsite tuning (FedOT/LocalOT, docs/offsite.md); its keys are defined in fedtune/offsite/config.py
    offsite: OffsiteConfig = Field(default_factory=OffsiteConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, *, exclude: tuple[str, ...] = ("output", "fl.rounds", "deploy")) -> str:
        """Hash of everything that determines the training trajectory (resume compatibility).

        ``fl.rounds`` is excluded so a finished run can be extended with more rounds; ``deploy``
        (how clients are reached) so a simulated run and its deployment share a fingerprint.
        """
        d = self.to_dict()
        for key in exclude:
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                node = node[p]
            node.pop(leaf, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: limits on YAML read as config (a config file, a run's saved config.yaml, an override value)
MAX_YAML_BYTES = 4 << 20
#: values a document may expand to once aliases are followed: a real config holds a few hundred;
#: a "billion laughs" document of a few hundred bytes expands to ~10**9 (and to GBs when dumped).
MAX_YAML_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently: a
    second ``train:`` section used to replace the first, its lr and batch size lost without a word).
    Keys brought in by a merge (``<<: *base``) may still be overridden, as YAML intends."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:  # unhashable: construct_mapping says so with its position
            continue
        if first is not key_node:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first given on line {first.start_mark.line + 1}); "
                "give each key, and each section, once", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _expanded_size(obj: Any, limit: int) -> int:
    """How many values ``obj`` holds once every alias is expanded (aliases share one object, so a
    small document can stand for an astronomically large one); raises ValueError past ``limit`` or
    on a recursive alias."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(o: Any) -> int:
        if not isinstance(o, (dict, list)):
            return 1
        if id(o) in memo:
            return memo[id(o)]
        if id(o) in active:
            raise ValueError("an alias refers to a value that contains it (a recursive structure)")
        active.add(id(o))
        items = [*o.keys(), *o.values()] if isinstance(o, dict) else o
        n = 1
        for x in items:
            n += size(x)
            if n > limit:
                raise ValueError(f"it expands to more than {limit} values once its aliases are followed "
                                 "(a YAML alias bomb?)")
        active.discard(id(o))
        memo[id(o)] = n
        return n

    return size(obj)


def parse_yaml(text: str | bytes, where: str) -> Any:
    """Parse config YAML strictly: UTF-8 only, no duplicate keys, bounded size and alias expansion.

    Every problem is a :class:`FedtuneError` naming ``where`` (a file, ``override 'k=v'``), with the
    line when there is one."""
    if len(text) > MAX_YAML_BYTES:
        raise FedtuneError(f"{where} is {len(text)} bytes; config YAML is limited to {MAX_YAML_BYTES} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text[: e.start].count(b"\n") + 1
            raise FedtuneError(f"{where}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                               "save the file as UTF-8") from None
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
        _expanded_size(value, MAX_YAML_NODES)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise FedtuneError(f"{where}{at}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise FedtuneError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise FedtuneError(f"{where}: YAML nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits, or the expansion limit
        import re

        long = re.search(r"[0-9_]{4000,}", text)
        if long is None:
            raise FedtuneError(f"{where}: {e}") from None
        line = text.count("\n", 0, long.start()) + 1
        raise FedtuneError(f"{where}:{line}: a number of {long.end() - long.start()} digits; no setting "
                           "takes one that long") from None
    return value


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """Read and :func:`parse_yaml` a file; a missing or unreadable file is a FedtuneError."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_YAML_BYTES:
            raise FedtuneError(f"{what} '{p}' is {p.stat().st_size} bytes; config YAML is limited to "
                               f"{MAX_YAML_BYTES} bytes")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise FedtuneError(f"{what} '{p}' not found") from None
    except IsADirectoryError:
        raise FedtuneError(f"{what} '{p}' is a directory, not a YAML file") from None
    except OSError as e:
        raise FedtuneError(f"cannot read {what} '{p}': {e.strerror or e}") from None
    return parse_yaml(raw, f"{what} '{p}'")


def _parse_scalar(text: str) -> Any:
    """CLI override values are YAML scalars: ``3e-4`` -> float, ``null`` -> None, ``[a,b]`` -> list."""
    try:
        yaml.safe_load(text)  # plain text that is not YAML (``a: b: c``) stays text, as before
    except yaml.YAMLError:
        return text
    except (ValueError, RecursionError):
        pass  # parse_yaml says what is wrong
    return parse_yaml(text, f"override value {text[:60]!r}")


def _unknown_keys(d: dict[str, Any], model: type[BaseModel], where: str) -> list[str]:
    """Every unknown key, each with the closest valid one (pydantic alone gives no suggestion)."""
    problems = []
    for key, value in d.items():
        fields = model.model_fields
        if key not in fields:
            name = f"{where}.{key}" if where else key
            problems.append(f"unknown config key '{name}'{did_you_mean(key, fields)}; "
                            f"valid keys{' in ' + where if where else ''}: {', '.join(fields)}")
            continue
        ann = fields[key].annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            problems += _unknown_keys(value, ann, f"{where}.{key}" if where else key)
    return problems


def _check_keys(d: dict[str, Any], model: type[BaseModel], where: str) -> None:
    """Reject unknown keys, all of them in one error (one line each)."""
    problems = _unknown_keys(d, model, where)
    if len(problems) == 1:
        raise FedtuneError(problems[0])
    if problems:
        raise FedtuneError(f"{len(problems)} unknown config keys:\n  " + "\n  ".join(problems))


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise FedtuneError(f"override '{item}' must look like key.subkey=value, e.g. train.lr=3e-4")
        key, _, raw = item.partition("=")
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FedtuneError(f"override '{item}': '{p}' is not a config section")
        node[parts[-1]] = _parse_scalar(raw)
    return d


def config_from_dict(d: dict[str, Any]) -> Config:
    """Validate a nested dict into a :class:`Config`, turning pydantic errors into one message."""
    _check_keys(d, Config, "")
    try:
        cfg = Config.model_validate(d)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            got = repr(err.get("input"))
            problems.append(f"{loc}: {err['msg']} (got {got[:80] + '...' if len(got) > 80 else got})")
        raise FedtuneError("invalid config:\n  " + "\n  ".join(problems)) from None
    _check_algorithm(cfg.fl)
    return cfg


def _check_algorithm(fl: FLConfig) -> None:
    """``fl.algorithm`` names a registered algorithm and ``fl.options`` fit its typed options.

    The options are defined (and typed) in each algorithm's own file; importing the registry here,
    inside the function, keeps this module importable without torch and without a cycle."""
    from fedtune.algorithms import parse_options, resolved_name

    parse_options(resolved_name(fl), fl.options)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        d = read_yaml_file(p) or {}
        if not isinstance(d, dict):
            raise FedtuneError(f"config file '{p}' must hold a mapping of sections, not {type(d).__name__}")
    apply_overrides(d, overrides or [])
    return config_from_dict(d)


def load_saved_config(path: str | Path) -> Config:
    """The resolved config a run saved (``RUN_DIR/config.yaml``): empty, malformed or invalid is one
    FedtuneError naming the file (a damaged run directory), never a traceback."""
    p = Path(path)
    d = read_yaml_file(p, "saved run config")
    if not isinstance(d, dict) or not d:
        raise FedtuneError(f"saved run config '{p}' is {'empty' if not d else 'not a mapping'}; the run "
                           "directory is damaged (it is rewritten from your config by a fresh run)")
    try:
        return config_from_dict(d)
    except FedtuneError as e:
        raise FedtuneError(f"saved run config '{p}' does not validate: {e}") from None


def save_config(cfg: Config, path: Path) -> None:
    from fedtune.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
