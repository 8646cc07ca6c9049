"""``fedtune eval`` on an offsite run: two targets per adapter, and the gap between them.

* ``emulator`` — the emulator with the trained adapter (and the run's last re-alignment): what the
  clients can see. Its weights come from the run's emulator file (checked against its content
  hash); when that file is gone, an undistilled emulator is rebuilt from the full model (and must
  hash the same), a distilled one cannot be.
* ``plugin`` — the adapter plugged back into the full model: what the owner ships. Needs the full
  model; without it, one clear error before anything is evaluated (``--offsite emulator`` scores
  the emulator alone).

The gap (emulator − plugin, per task) goes into ``results.json`` (``offsite_gap``) and
``results.md``: for a loss, positive means the emulator alone is worse — the owner's protection,
not a bug (Offsite-Tuning reports it as such).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import FedtuneError
from fedtune.eval.targets import ModelCache, Target, register_target_kind
from fedtune.offsite import emulator as E
from fedtune.offsite.files import ADAPTER_FILE, REALIGN_FILE, is_offsite_dir, read_meta
from fedtune.offsite.plan import Plan

log = logging.getLogger(__name__)

KINDS = ("emulator", "plugin")


def run_config(meta: dict[str, Any], base: str | None = None):
    """The parts of a run's config an offsite adapter needs (model, LoRA settings, plan knobs)."""
    from fedtune.config import config_from_dict

    lora = meta.get("lora") or {}
    peft = {"method": "lora", **{k: v for k, v in lora.items() if v is not None}}
    return config_from_dict({
        "seed": int(meta.get("seed", 0)),
        "model": {"name": base or meta["base_model"], "dtype": meta.get("model_dtype", "float32")},
        "peft": peft,
        "offsite": {"enabled": True, "drop": float(meta.get("drop", 0.0)), "bottom": meta["plan"]["bottom"],
                    "top": meta["plan"]["top"], "train": meta["train"],
                    "train_embeddings": bool(meta.get("train_embeddings"))},
    })


def _check_full_available(name: str) -> None:
    from fedtune.config import ModelConfig
    from fedtune.models.loading import TINY_MODELS, _resolve_dir

    if name in TINY_MODELS:
        return
    try:
        _resolve_dir(ModelConfig(name=name))
    except FedtuneError as e:
        raise FedtuneError(f"plug-in evaluation needs the full model '{name}' (the adapter is plugged back into it), "
                           f"and it is not available here: {e}. Give its location with --base MODEL, or score the "
                           "emulator alone with --offsite emulator") from None


def expand(targets: list[Target], which: str = "both") -> list[Target]:
    """Each offsite adapter target becomes ``emulator`` and/or ``plugin`` targets (others stay)."""
    if which not in ("both", *KINDS):
        raise FedtuneError(f"--offsite must be both, emulator or plugin, not {which!r}")
    out: list[Target] = []
    for t in targets:
        if t.path is None or not is_offsite_dir(t.path):
            out.append(t)
            continue
        meta = read_meta(t.path)
        suffix = "" if t.label == "adapter" else f":{t.label}"
        for kind in KINDS:
            if which in ("both", kind):
                if kind == "plugin":
                    _check_full_available(t.model)
                out.append(Target(f"{kind}{suffix}", kind, t.model, t.path, {**t.meta, "offsite": meta}))
    return out


def _adapter(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(p / ADAPTER_FILE))


def _template(p: Path):
    from fedtune.data import template_from_dict

    f = p / "fedtune_template.json"
    return template_from_dict(json.loads(f.read_text())) if f.is_file() else None


def emulator_model(path: Path, meta: dict[str, Any], base: str, cache: ModelCache | None = None,
                   device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The emulator + adapter model of an offsite adapter directory, and the tokenizer."""
    from fedtune.adapters import set_adapter_state
    from fedtune.config import ModelConfig
    from fedtune.models import load_tokenizer
    from fedtune.models.layout import layout_of
    from fedtune.offsite.distill import apply_lowrank

    cfg = run_config(meta, base)
    plan = Plan.from_dict(meta["plan"])
    tok = load_tokenizer(ModelConfig(name=base))
    config = E.model_config(cfg.model, tok)
    layout = layout_of(config.model_type)
    skel = E.build_skeleton(E.emulator_config(config, plan, layout), cfg.model.dtype, pad_id=tok.pad_token_id,
                            name=f"{base} (emulator)")
    torch.manual_seed(0)  # the adapter's initial values are overwritten below
    model = E.attach_offsite_adapter(skel, cfg, plan, layout)
    spec = E.frozen_spec(model)
    em = meta.get("emulator") or {}
    f = Path(em.get("file") or "")
    if f.is_file() and E.file_hash(f) == em.get("hash"):
        weights = E.read_emulator(f, plan, spec)
    elif em.get("distilled"):
        raise FedtuneError(f"the run's distilled emulator file {f} is missing (or changed); it cannot be rebuilt "
                           "without redoing the distillation: rerun the run's set-up, or evaluate --offsite plugin")
    else:  # rebuild the layer-dropped emulator from the full model; it must be the same one
        full = (cache.get(base)[0] if cache is not None else None)
        if full is None:
            from fedtune.models import load_model

            full = load_model(ModelConfig(name=base, dtype=cfg.model.dtype))[0]
        skel2 = E.build_skeleton(E.emulator_config(config, plan, layout), cfg.model.dtype)
        E.load_weights(skel2, E.emulator_state(full, plan, layout))
        weights = {n: E.plain_params(skel2)[n].detach() for n in spec}
        info = {"model": meta.get("base_model"), "model_type": config.model_type, "train": meta["train"],
                "train_embeddings": bool(meta.get("train_embeddings"))}
        if E.content_hash(E.emulator_bytes(weights, plan, info)) != em.get("hash"):
            raise FedtuneError(f"the emulator rebuilt from '{base}' differs from the run's ({str(em.get('hash'))[:12]}); "
                               "is it the full model the run used?")
    E.load_weights(model, weights, names=set(spec))
    set_adapter_state(model, _adapter(path))
    if (path / REALIGN_FILE).is_file():
        from safetensors.torch import load_file

        factors = load_file(str(path / REALIGN_FILE))
        names = {k.rsplit(".", 1)[0] for k in factors}
        apply_lowrank(model, {n: weights[n] for n in names}, factors)
    return model.to(device).eval(), tok


@contextlib.contextmanager
def open_emulator(t: Target, cache: ModelCache) -> Iterator[tuple[Any, Any, Any]]:
    model, tok = emulator_model(t.path, t.meta["offsite"], t.model, cache, cache.device)
    try:
        yield model, tok, _template(t.path)
    finally:
        del model


def _check_probe(full: torch.nn.Module, t: Target) -> None:
    from fedtune.models import probe_mismatch, weight_probe

    probe = t.meta.get("base_model_probe")
    why = probe_mismatch(probe, weight_probe(full)) if probe else None
    if why is not None:
        raise FedtuneError(f"offsite adapter {t.path} was trained against the full model '{t.meta.get('base_model')}', "
                           f"but '{t.model}' has different weights ({why}); give the right one with --base")


@contextlib.contextmanager
def open_plugin(t: Target, cache: ModelCache) -> Iterator[tuple[Any, Any, Any]]:
    from fedtune.models.layout import layout_of

    meta = t.meta["offsite"]
    try:
        full, tok = cache.get(t.model)
    except FedtuneError as e:
        raise FedtuneError(f"plug-in evaluation needs the full model '{t.model}': {e}") from None
    _check_probe(full, t)
    plan = Plan.from_dict(meta["plan"])
    layout = layout_of(full.config.model_type)
    scaling = (float(meta["lora"]["alpha"]) / float(meta["lora"]["r"])) if meta["train"] == "lora" else None
    values = E.plugin_values(full, _adapter(t.path), plan, layout, scaling)
    with E.plugged(full, values):  # the cached full model comes back bit for bit afterwards
        yield full, tok, _template(t.path)


register_target_kind("emulator", open_emulator)
register_target_kind("plugin", open_plugin)


def gap_report(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per adapter and task: the emulator's score, the plug-in's, and emulator − plugin."""
    by_label = {tg["label"]: tg for tg in report["targets"]}
    out = []
    for label, tg in by_label.items():
        if tg["kind"] != "emulator":
            continue
        other = by_label.get("plugin" + label[len("emulator"):])
        if other is None:
            continue
        for task, r in tg["results"].items():
            p = other["results"].get(task)
            if p is None or r.get("score") is None or p.get("score") is None:
                continue
            e_s, p_s = float(r["score"]), float(p["score"])
            out.append({"adapter": label[len("emulator"):].lstrip(":") or "global", "task": task, "metric": r["metric"],
                        "emulator": e_s, "plugin": p_s, "gap": e_s - p_s if math.isfinite(e_s - p_s) else None})
    return out


def gap_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["", "## offsite: emulator vs plug-in", "",
             "gap = emulator − plugin (a loss: positive means the emulator alone is worse; a score: negative)", "",
             "| adapter | task | emulator | plugin | gap |", "|---|---|---|---|---|"]
    for r in rows:
        gap = "-" if r["gap"] is None else f"{r['gap']:+.4f}"
        lines.append(f"| {r['adapter']} | {r['task']} ({r['metric']}) | {r['emulator']:.4f} | {r['plugin']:.4f} | {gap} |")
    return "\n".join(lines) + "\n"
