"""What ``fedtune eval`` evaluates: a base model, an adapter, a merged model, per-client adapters,
or a whole run directory — resolved into a list of :class:`Target` and opened one at a time.

Kinds of target (the registry :data:`TARGET_KINDS`, one opener each):

* ``base`` — a model name or directory as ``model.name`` accepts it (``smollm2-135m-instruct``, a
  tiny model, a local HF directory, a ``.gguf`` file, a hub id). A *merged* model (an adapter
  folded into the weights and saved with ``save_pretrained``) is a local HF directory, so it is
  this kind too;
* ``adapter`` — a PEFT adapter directory (``adapter_config.json``). Its base model is the one
  recorded by :func:`fedtune.adapters.save_adapter` (``fedtune_adapter.json``) unless ``--base``
  names another; the recorded base-model fingerprint must match, otherwise a clear error. A LoRA
  adapter is merged into the weights for the evaluation (same function, no adapter overhead per
  token) and unmerged afterwards.

Offsite tuning (FS-LLM's FedOT) plugs in here: it needs two more kinds, ``offsite-emulator``
(the layer-dropped emulator with the trained adapter layers) and ``offsite-full`` (the full model
with the adapter layers plugged back in). Each is an opener ``(target, cache) -> (model,
tokenizer, template)`` registered with :func:`register_target_kind`, and :func:`resolve_targets`
would list both for a run whose ``peft.method`` is an offsite method. fedtune has no offsite
tuning yet, so nothing is registered for them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.config import Config

log = logging.getLogger(__name__)


@dataclass
class Target:
    #: short name used in tables and file names: ``base``, ``adapter``, ``client:<id>``.
    label: str
    kind: str
    #: the base model (``model.name`` syntax).
    model: str
    #: the adapter directory (kind ``adapter``).
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Resolved:
    targets: list[Target]
    #: the run's config when the target is (inside) a run directory.
    run_cfg: Config | None = None
    run_dir: Path | None = None


def _is_adapter_dir(p: Path) -> bool:
    return (p / "adapter_config.json").is_file()


def _is_run_dir(p: Path) -> bool:
    return (p / "config.yaml").is_file() and ((p / "adapter").is_dir() or (p / "adapters").is_dir())


def _read_run_cfg(run_dir: Path) -> Config:
    from fedtune.config import config_from_dict

    return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})


def _adapter_meta(p: Path) -> dict[str, Any]:
    f = p / "fedtune_adapter.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _adapter_target(p: Path, label: str, base: str | None) -> Target:
    meta = _adapter_meta(p)
    model = base or meta.get("base_model")
    if not model:
        cfg = json.loads((p / "adapter_config.json").read_text())
        model = cfg.get("base_model_name_or_path")
    if not model:
        raise FedtuneError(f"adapter {p} does not record its base model; give it with --base MODEL")
    return Target(label, "adapter", str(model), p, meta)


def _client_dirs(adapters: Path) -> list[Path]:
    return sorted(d for d in adapters.iterdir() if d.is_dir() and _is_adapter_dir(d))


def resolve_targets(target: str, *, base: str | None = None, clients: bool = True,
                    compare_base: bool = False) -> Resolved:
    """Turn the command line's TARGET into what is evaluated.

    A run directory gives its global adapter (``adapter/``) and, with ``clients``, every
    client's own adapter (``adapters/<client>/``, the ``local`` scenario); ``compare_base`` adds
    the base model so one table shows the change.
    """
    p = Path(target).expanduser()
    run_cfg = run_dir = None
    out: list[Target] = []
    if p.is_dir() and _is_run_dir(p):
        run_dir, run_cfg = p, _read_run_cfg(p)
        if (p / "adapter").is_dir():
            out.append(_adapter_target(p / "adapter", "adapter", base))
        if clients and (p / "adapters").is_dir():
            out += [_adapter_target(d, f"client:{d.name}", base) for d in _client_dirs(p / "adapters")]
        if not out:
            raise FedtuneError(f"run directory {p} holds no adapter yet (adapter/ or adapters/<client>/); "
                               "has the run finished a round?")
    elif p.is_dir() and _is_adapter_dir(p):
        out.append(_adapter_target(p, "adapter", base))
        if _is_run_dir(p.parent):
            run_dir, run_cfg = p.parent, _read_run_cfg(p.parent)
        elif p.parent.name == "adapters" and _is_run_dir(p.parent.parent):
            run_dir, run_cfg = p.parent.parent, _read_run_cfg(p.parent.parent)
            out[0].label = f"client:{p.name}"
    elif p.is_dir() and _client_dirs(p):
        out += [_adapter_target(d, f"client:{d.name}", base) for d in _client_dirs(p)]
        if _is_run_dir(p.parent):
            run_dir, run_cfg = p.parent, _read_run_cfg(p.parent)
    elif p.is_dir() and not (p / "config.json").is_file():
        raise FedtuneError(f"{p} is a directory but neither a run directory (config.yaml + adapter/), a PEFT "
                           "adapter (adapter_config.json), a folder of client adapters, nor a model "
                           "directory (config.json)")
    else:
        if base:
            raise FedtuneError("--base only applies to adapters; the target itself is a model")
        kind_label = "merged" if p.is_dir() else "base"
        return Resolved([Target(kind_label, "base", target)])
    if compare_base:
        out.insert(0, Target("base", "base", out[0].model))
    return Resolved(out, run_cfg, run_dir)


# ---- opening ---------------------------------------------------------------------------------

class ModelCache:
    """Base models loaded once per (name, dtype) and reused across targets."""

    def __init__(self, dtype: str = "float32", device: str = "cpu"):
        self.dtype, self.device = dtype, device
        self._models: dict[str, tuple[Any, Any]] = {}

    def get(self, name: str) -> tuple[Any, Any]:
        if name not in self._models:
            from fedtune.config import ModelConfig
            from fedtune.models import load_model

            model, tok = load_model(ModelConfig(name=name, dtype=self.dtype))
            self._models[name] = (model.to(self.device), tok)
        return self._models[name]


Opener = Callable[[Target, ModelCache], contextlib.AbstractContextManager]
TARGET_KINDS: dict[str, Opener] = {}


def register_target_kind(kind: str, opener: Opener) -> None:
    """Register how a kind of target is opened (the seam offsite tuning plugs into)."""
    TARGET_KINDS[kind] = opener


@contextlib.contextmanager
def _open_base(t: Target, cache: ModelCache) -> Iterator[tuple[Any, Any, Any]]:
    model, tok = cache.get(t.model)
    yield model, tok, None


def _mismatch(adapter_dir: Path, meta: dict[str, Any], base_name: str, have: str | None) -> FedtuneError:
    recorded = meta.get("base_model")
    return FedtuneError(
        f"adapter {adapter_dir} was trained on base model '{recorded}' (fingerprint "
        f"{meta.get('base_model_fingerprint')}), but the base model given is '{base_name}'"
        + (f" (fingerprint {have})" if have else "") + ": an adapter only works on the model it was trained on. "
        + (f"Use --base {recorded} (or drop --base)" if recorded else "Give the right model with --base")
    )


def check_base(adapter_dir: Path, meta: dict[str, Any], pm: Any, base_name: str) -> None:
    """Refuse an adapter trained on another base model.

    :func:`fedtune.adapters.save_adapter` records ``model_fingerprint`` of the base model as the
    peft wrapper holds it (adapter layers injected), so the check is made the same way, after
    loading the adapter.
    """
    from fedtune.models import model_fingerprint

    want = meta.get("base_model_fingerprint")
    if not want:
        log.warning("adapter %s records no base-model fingerprint; cannot check it matches %s", adapter_dir, base_name)
        return
    inner = pm.get_base_model()
    have = model_fingerprint(inner)
    if have == want:
        return
    # The fingerprint includes the model's name; the same model under another name (a path to the
    # dequantised cache, say) has the same architecture and shapes: accept it with a warning.
    saved = getattr(inner.config, "fedtune_name", None)
    try:
        inner.config.fedtune_name = meta.get("base_model")
        same_shapes = model_fingerprint(inner) == want
    finally:
        inner.config.fedtune_name = saved
    if same_shapes:
        log.warning("adapter %s was trained on '%s'; evaluating it on '%s', which has the same architecture",
                    adapter_dir, meta.get("base_model"), base_name)
        return
    raise _mismatch(adapter_dir, meta, base_name, have)


@contextlib.contextmanager
def _open_adapter(t: Target, cache: ModelCache) -> Iterator[tuple[Any, Any, Any]]:
    from peft import PeftModel

    from fedtune.data import template_from_dict

    assert t.path is not None
    base, tok = cache.get(t.model)
    try:
        pm = PeftModel.from_pretrained(base, str(t.path), is_trainable=False)
    except (ValueError, RuntimeError, KeyError, AttributeError) as e:
        if t.meta.get("base_model") and t.meta["base_model"] != t.model:
            raise _mismatch(t.path, t.meta, t.model, None) from None
        raise FedtuneError(f"could not load adapter {t.path} onto '{t.model}': {e}") from None
    lora = pm.active_peft_config.peft_type.value == "LORA"
    try:
        check_base(t.path, t.meta, pm, t.model)
        pm.to(cache.device).eval()
        tpl_file = t.path / "fedtune_template.json"
        template = template_from_dict(json.loads(tpl_file.read_text())) if tpl_file.is_file() else None
        if lora:
            pm.merge_adapter()  # fold B·A into the weights: one matmul per layer, as the base
        yield pm, tok, template
    finally:
        if lora:
            if pm.peft_config and any(getattr(m, "merged", False) for m in pm.modules()):
                pm.unmerge_adapter()
            pm.unload()  # strip the LoRA layers: the cached base model is plain again
        # prompt learning never touches the base weights; dropping the wrapper is enough


register_target_kind("base", _open_base)
register_target_kind("adapter", _open_adapter)


def open_target(t: Target, cache: ModelCache) -> contextlib.AbstractContextManager:
    """Context manager yielding ``(model, tokenizer, template)`` for one target."""
    opener = TARGET_KINDS.get(t.kind)
    if opener is None:
        raise FedtuneError(f"no way to open a '{t.kind}' target (known kinds: {', '.join(sorted(TARGET_KINDS))})")
    return opener(t, cache)
