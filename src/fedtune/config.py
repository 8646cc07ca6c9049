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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which base model to load (see :mod:`fedtune.models`)."""

    #: ``smollm2-135m-instruct`` (embedded, offline), ``tiny-llama``/``tiny-qwen2``/``tiny-gpt2``/
    #: ``tiny-opt`` (random, for tests), a local HF directory, a ``.gguf`` file or a hub id.
    name: str = "smollm2-135m-instruct"
    #: dtype of the frozen base weights; adapters always train in fp32.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
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
    num_clients: int | None = Field(default=None, ge=1)
    #: record field used by the dirichlet and meta splitters.
    label_field: str = "category"
    #: dirichlet concentration; smaller is more heterogeneous.
    alpha: float = Field(default=0.5, gt=0)
    #: dirichlet: every client gets at least this many records.
    min_client_size: int = Field(default=10, ge=1)
    #: label values dropped before splitting (fed-codealpaca drops X86-64 Assembly).
    exclude_labels: list[str] = Field(default_factory=list)
    #: per-client fractions carved from each client's own data.
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    test_fraction: float = Field(default=0.05, ge=0, lt=1)
    #: cap each client's records (after splitting) for CPU-sized runs; ``null`` keeps all.
    max_records_per_client: int | None = Field(default=None, ge=1)
    #: cap val/test examples per client for fast in-loop evaluation.
    max_eval_records_per_client: int | None = Field(default=None, ge=1)
    #: ``alpaca`` (FS-LLM's exact wording), ``alpaca_no_input`` or ``chat`` (model's template).
    template: Literal["alpaca", "alpaca_no_input", "chat"] = "alpaca"
    max_length: int = Field(default=512, ge=8)
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
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    #: modules to adapt; ``null`` uses the architecture table in :mod:`fedtune.models`.
    target_modules: list[str] | None = None
    num_virtual_tokens: int = Field(default=20, ge=1)
    #: prompt tuning: initialise the soft prompt from this text (``null``: random).
    prompt_init_text: str | None = None
    #: P-tuning prompt encoder width.
    encoder_hidden_size: int = Field(default=128, ge=1)


class TrainConfig(_Section):
    """The local training loop each client runs every round."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    #: runs over the whole run (rounds x local steps), never restarted per round: local step s of
    #: round r is step (r-1)*steps + s for every client, sampled in earlier rounds or not.
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    #: optimizer steps per round; ignored when ``local_epochs`` is set.
    local_steps: int = Field(default=30, ge=1)
    local_epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=1, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    #: autocast dtype of the forward pass; adapter weights and optimizer state stay fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: keep each client's optimizer state between rounds (else a fresh optimizer every round).
    keep_optimizer_state: bool = True
    #: batch examples of similar length so little compute goes to padding.
    group_by_length: bool = True
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
    level: int | None = None

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
    rounds: int = Field(default=10, ge=1)
    #: clients sampled per round: an int count, or a float fraction in (0, 1].
    clients_per_round: int | float | None = None

    @model_validator(mode="after")
    def _sampling(self) -> FLConfig:
        c = self.clients_per_round
        if isinstance(c, float) and not 0 < c <= 1:
            raise ValueError("clients_per_round as a fraction must lie in (0, 1]")
        if isinstance(c, int) and not isinstance(c, bool) and c < 1:
            raise ValueError("clients_per_round must be at least 1")
        if self.scenario == "local" and self.algorithm not in ("fedavg", "local"):
            raise ValueError(f"fl.scenario=local trains every client alone (the 'local' algorithm); "
                             f"fl.algorithm={self.algorithm} needs fl.scenario=fed or global")
        return self


class EvalConfig(_Section):
    """Loss/perplexity evaluation inside the round loop."""

    #: evaluate every k rounds (and always after the last round); 0 disables in-loop eval.
    every: int = Field(default=1, ge=0)
    splits: list[Literal["val", "test"]] = Field(default_factory=lambda: ["val", "test"])
    batch_size: int = Field(default=8, ge=1)
    #: also evaluate each client's own (local) adapter on its data, not only the global one.
    local_models: bool = False
    #: benchmark tasks of ``fedtune eval`` (e.g. ``[gsm8k]``) run on the adapter(s) in the loop,
    #: on a seeded subset of ``task_limit`` examples, every ``task_every`` rounds (and after the
    #: last); logged as ``<task>_<metric>`` with the other round metrics. Empty: none.
    tasks: list[str] = Field(default_factory=list)
    task_limit: int = Field(default=20, ge=1)
    task_every: int = Field(default=1, ge=1)
    #: per-task options as on the command line, e.g. ``{humaneval: {max_new_tokens: 256}}``.
    task_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class CheckpointConfig(_Section):
    #: checkpoint every k rounds (and always after the last round); 0: only at the end.
    every: int = Field(default=5, ge=0)
    #: how many checkpoints to keep (older ones are deleted).
    keep: int = Field(default=2, ge=1)


class OutputConfig(_Section):
    #: run directory; ``null`` makes ``runs/<name>-<timestamp>``.
    dir: str | None = None
    #: when ``dir`` already holds a run: replace it (it is renamed aside and deleted once the new
    #: run is set up, put back if that fails) instead of refusing. ``--resume`` ignores this.
    overwrite: bool = False
    name: str = "run"
    tensorboard: bool = True
    progress: bool = True


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
    min_clients: int | None = Field(default=None, ge=1)
    #: seconds to wait for the replies of one fit or evaluate exchange; a client that has not
    #: answered by then is recorded as missing and the round goes on without it.
    round_timeout_s: float = Field(default=600, gt=0)
    #: seconds to wait at start (and before a round that lacks clients) for SuperNodes to connect.
    join_timeout_s: float = Field(default=300, gt=0)
    #: seconds a SuperNode has to say which clients it holds. One that stays silent is left out and
    #: asked again after a back-off that doubles each time (up to 10 minutes), so a node that
    #: connects but never answers does not hold up the run.
    query_timeout_s: float = Field(default=30, gt=0)
    #: only SuperNodes registered with their client ids (``fedtune deploy register --client-id``)
    #: may hold clients. Without it a node registered under client ids may hold only those, and
    #: an unnamed node may announce any id that no live node holds yet.
    require_bound_clients: bool = False
    #: seconds between polls of the SuperLink for replies.
    poll_s: float = Field(default=0.2, gt=0)


class Config(_Section):
    """A whole fedtune run."""

    seed: int = 0
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


def _parse_scalar(text: str) -> Any:
    """CLI override values are YAML scalars: ``3e-4`` -> float, ``null`` -> None, ``[a,b]`` -> list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _check_keys(d: dict[str, Any], model: type[BaseModel], where: str) -> None:
    """Reject unknown keys with the closest valid one (pydantic alone gives no suggestion)."""
    for key, value in d.items():
        fields = model.model_fields
        if key not in fields:
            name = f"{where}.{key}" if where else key
            raise FedtuneError(
                f"unknown config key '{name}'{did_you_mean(key, fields)}; "
                f"valid keys{' in ' + where if where else ''}: {', '.join(fields)}"
            )
        ann = fields[key].annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(value, ann, f"{where}.{key}" if where else key)


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
            problems.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
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
        if not p.is_file():
            raise FedtuneError(f"config file '{p}' not found")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise FedtuneError(f"config file '{p}' is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise FedtuneError(f"config file '{p}' must hold a mapping of sections, not {type(d).__name__}")
    apply_overrides(d, overrides or [])
    return config_from_dict(d)


def save_config(cfg: Config, path: Path) -> None:
    from fedtune.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
