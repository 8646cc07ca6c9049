"""What ``fedtune eval`` evaluates: a base model, an adapter, a merged model, per-client adapters,
or a whole run directory — resolved into a list of :class:`Target` and opened one at a time.

Kinds of target (the registry :data:`TARGET_KINDS`, one opener each):

* ``base`` — a model name or directory as ``model.name`` accepts it (``smollm2-135m-instruct``, a
  tiny model, a local HF directory, a ``.gguf`` file, a hub id). A *merged* model (an adapter
  folded into the weights and saved with ``save_pretrained``) is a local HF directory, so it is
  this kind too;
* ``adapter`` — a PEFT adapter directory (``adapter_config.json``). Its base model is the one
  recorded by :func:`fedtune.adapters.save_adapter` (``fedtune_adapter.json``) unless ``--base``
  names another; the recorded base-model fingerprint (architecture) and weight probe (a sample of
  the weights) must match, otherwise a clear error. A LoRA adapter on an fp32 base is merged into
  the weights for the evaluation (same function, no adapter overhead per token) and the pristine
  weights are put back afterwards; on a bf16/fp16 base it runs unmerged.

Offsite tuning (FS-LLM's FedOT) plugs in here: it needs two more kinds, ``offsite-emulator``
(the layer-dropped emulator with the trained adapter layers) and ``offsite-full`` (the full model
with the adapter layers plugged back in). Each is an opener ``(target, cache) -> (model,
tokenizer, template)`` registered with :func:`register_target_kind`, and :func:`resolve_targets`
lists both for an offsite adapter directory: :mod:`fedtune.offsite.evaluation` registers them as
``emulator`` and ``plugin``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any


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
    #: a LoRA adapter on an fp32 base is merged into the weights while open (fastest); False keeps it
    #: unmerged, so ``disable_adapter()`` gives the base model exactly (``fedtune chat --compare-base``).
    merge: bool = True


@dataclass
class Resolved:
    targets: list[Target]
    #: the run's config when the target is (inside) a run directory.
    run_cfg: Config | None = None
    run_dir: Path | None = None


def _is_adapter_dir(p: Path) -> bool:
    # an offsite-tuning adapter (fedtune.offsite.files) is a directory of its own format
    return (p / "adapter_config.json").is_file() or (p / "fedtune_offsite.json").is_file()


def _is_run_dir(p: Path) -> bool:
    return (p / "config.yaml").is_file() and ((p / "adapter").is_dir() or (p / "adapters").is_dir())


def _read_run_cfg(run_dir: Path) -> Config:
    from fedtune.config import load_saved_config

    return load_saved_config(run_dir / "config.yaml")  # strict: a damaged file is one error naming it


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
                    compare_base: bool = False, offsite: str = "both") -> Resolved:
    """Turn the command line's TARGET into what is evaluated.

    A run directory gives its global adapter (``adapter/``) and, with ``clients``, every
    client's own adapter (``adapters/<client>/``, the ``local`` scenario); ``compare_base`` adds
    the base model so one table shows the change. An offsite-tuning adapter gives an
    ``emulator`` and a ``plugin`` target (``offsite``: both, or one of them; fedtune.offsite.evaluation).
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
    if any(t.path is not None and (t.path / "fedtune_offsite.json").is_file() for t in out):
        from fedtune.offsite.evaluation import expand

        out = expand(out, offsite)
    if compare_base:
        out.insert(0, Target("base", "base", out[0].model))
    return Resolved(out, run_cfg, run_dir)


def pick_one(resolved: Resolved, target: str) -> Target:
    """The one target a command that needs a single model (``fedtune chat``, ``fedtune export``)
    works on: a run directory's global adapter, else the only target; a folder of client adapters
    (a ``local`` run) is an error that names them."""
    ts = resolved.targets
    glob = [t for t in ts if t.label == "adapter"]
    if len(ts) == 1 or glob:
        return glob[0] if glob else ts[0]
    names = [t.label.split(":", 1)[-1] for t in ts]
    where = resolved.run_dir / "adapters" if resolved.run_dir is not None else Path(target)
    raise FedtuneError(f"{target} holds {len(ts)} client adapters ({', '.join(names[:8])}{', ...' if len(ts) > 8 else ''})"
                       f" and no global adapter (a 'local' scenario run): pick one, e.g. {where / names[0]}")


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


def _mismatch(adapter_dir: Path, meta: dict[str, Any], base_name: str, have: str | None,
              why: str | None = None) -> FedtuneError:
    recorded = meta.get("base_model")
    if why is None:
        what = (f"(fingerprint {meta.get('base_model_fingerprint')}), but the base model given is '{base_name}'"
                + (f" (fingerprint {have})" if have else ""))
    else:
        what = f"but the base model given, '{base_name}', has the same architecture and different weights ({why})"
    if recorded and recorded == base_name:
        fix = ("the weights under that name are not the ones the adapter was trained on; give the exact "
               "checkpoint it was trained on with --base PATH")
    elif recorded:
        fix = f"Use --base {recorded} (or drop --base)"
    else:
        fix = "Give the right model with --base"
    return FedtuneError(
        f"adapter {adapter_dir} was trained on base model '{recorded}' {what}: an adapter only works on the "
        "model it was trained on (another checkpoint of the same architecture, a fine-tune such as SmolLM2 "
        f"base vs Instruct, is another model). {fix}"
    )


def check_base(adapter_dir: Path, meta: dict[str, Any], pm: Any, base_name: str) -> None:
    """Refuse an adapter trained on another base model.

    :func:`fedtune.adapters.save_adapter` records ``model_fingerprint`` (architecture and shapes,
    taken as the peft wrapper holds the base: adapter layers injected, so the check is made the
    same way, after loading the adapter) and ``weight_probe`` (a sample of the weights and their
    dtype). A different architecture is refused; the same architecture is accepted only when the
    sampled weights agree up to the rounding of the two dtypes, so the same model under another
    name or path, or loaded in another dtype, passes and a differently trained one does not.
    Adapters saved without a probe (older fedtune, other tools) can only be checked for shapes:
    a same-shaped base gets a warning.
    """
    from fedtune.models import model_fingerprint, probe_mismatch, weight_probe

    want = meta.get("base_model_fingerprint")
    if not want:
        log.warning("adapter %s records no base-model fingerprint; cannot check it matches %s", adapter_dir, base_name)
        return
    inner = pm.get_base_model()
    have = model_fingerprint(inner)
    if have != want:
        # The fingerprint includes the model's name; the same model under another name (a path to
        # the dequantised cache, say) has the same architecture and shapes.
        saved = getattr(inner.config, "fedtune_name", None)
        try:
            inner.config.fedtune_name = meta.get("base_model")
            same_shapes = model_fingerprint(inner) == want
        finally:
            inner.config.fedtune_name = saved
        if not same_shapes:
            raise _mismatch(adapter_dir, meta, base_name, have)
    probe = meta.get("base_model_probe")
    if not probe:
        if have != want:
            log.warning("adapter %s was trained on '%s'; evaluating it on '%s', which has the same architecture "
                        "(the adapter records no weight sample, so the weights cannot be compared)",
                        adapter_dir, meta.get("base_model"), base_name)
        return
    why = probe_mismatch(probe, weight_probe(inner))
    if why is not None:
        raise _mismatch(adapter_dir, meta, base_name, have, why)
    if have != want:
        log.info("adapter %s: '%s' holds the weights of '%s' it was trained on", adapter_dir, base_name,
                 meta.get("base_model"))


def load_target_adapter(base: Any, t: Target) -> Any:
    """``t``'s adapter on ``base`` (a PeftModel, for inference): a load failure is one error, which
    names the base model the adapter was trained on when that is another one."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(t.path), is_trainable=False)
    except (ValueError, RuntimeError, KeyError, AttributeError) as e:
        if t.meta.get("base_model") and t.meta["base_model"] != t.model:
            raise _mismatch(t.path, t.meta, t.model, None) from None
        raise FedtuneError(f"could not load adapter {t.path} onto '{t.model}': {e}") from None


@contextlib.contextmanager
def _open_adapter(t: Target, cache: ModelCache) -> Iterator[tuple[Any, Any, Any]]:
    import torch
    from peft.tuners.lora import LoraLayer

    from fedtune.data import template_from_dict

    assert t.path is not None
    base, tok = cache.get(t.model)
    pm = load_target_adapter(base, t)
    lora = pm.active_peft_config.peft_type.value == "LORA"
    # The base model is cached and shared by every target, so it must come back bit-identical.
    # Merging B·A into the weights (one matmul per layer, as fast as the base) and unmerging is not
    # exact in floating point (W + D - D != W), so the merged layers' weights are copied first and
    # put back. In bf16/fp16 the adapter is not merged at all: W + D rounded to 8 or 11 bits loses
    # most of a small D, so the merged model would not be the trained one; unmerged, peft adds the
    # adapter's output computed in fp32.
    merge = t.merge and lora and not any(p.dtype in (torch.float16, torch.bfloat16) for p in base.parameters())
    pristine: list[tuple[Any, Any]] = []  # (parameter, its copy)
    try:
        check_base(t.path, t.meta, pm, t.model)
        pm.to(cache.device).eval()
        tpl_file = t.path / "fedtune_template.json"
        template = template_from_dict(json.loads(tpl_file.read_text())) if tpl_file.is_file() else None
        if merge:
            pristine = [(p, p.detach().clone()) for m in pm.modules() if isinstance(m, LoraLayer)
                        for p in m.get_base_layer().parameters(recurse=False)]
            pm.merge_adapter()
        yield pm, tok, template
    finally:
        if lora:
            pm.unload()  # strip the LoRA layers (without unmerging): the cached base model is plain again
            with torch.no_grad():
                for p, saved in pristine:
                    p.copy_(saved)
        # prompt learning never touches the base weights; dropping the wrapper is enough


register_target_kind("base", _open_base)
register_target_kind("adapter", _open_adapter)


def open_target(t: Target, cache: ModelCache) -> contextlib.AbstractContextManager:
    """Context manager yielding ``(model, tokenizer, template)`` for one target."""
    opener = TARGET_KINDS.get(t.kind)
    if opener is None:
        raise FedtuneError(f"no way to open a '{t.kind}' target (known kinds: {', '.join(sorted(TARGET_KINDS))})")
    return opener(t, cache)
