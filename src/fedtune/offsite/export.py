"""The plug-in model as a plain Hugging Face directory, usable without fedtune.

``fedtune offsite export RUN_DIR --out DIR`` writes the full model with the trained adapter plugged
in — its adapter blocks replaced by the trained ones (LoRA merged into their weights), trained
embeddings in place — with ``save_pretrained``, plus the tokenizer and the run's prompt template.
``AutoModelForCausalLM.from_pretrained(DIR)`` loads it; nothing of fedtune or peft is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedtune.errors import FedtuneError
from fedtune.offsite import emulator as E
from fedtune.offsite.files import ADAPTER_FILE, is_offsite_dir, read_meta
from fedtune.offsite.plan import Plan


def adapter_dir(target: str | Path, client: str | None = None) -> Path:
    """The offsite adapter directory ``target`` names: itself, or a run directory's global adapter
    (``adapter/``) or, with ``client``, that client's (``adapters/<client>/``)."""
    from fedtune.utils import safe_name

    p = Path(target).expanduser()
    if is_offsite_dir(p):
        return p
    cand = p / "adapters" / safe_name(client) if client else p / "adapter"
    if is_offsite_dir(cand):
        return cand
    if not client and (p / "adapters").is_dir():
        names = sorted(d.name for d in (p / "adapters").iterdir() if is_offsite_dir(d))
        if names:
            raise FedtuneError(f"{p} keeps one adapter per client (local scenario): say which with --client "
                               f"({', '.join(names[:8])})")
    raise FedtuneError(f"{p} is neither an offsite adapter directory (fedtune_offsite.json) nor a run directory "
                       "holding one (adapter/ or adapters/<client>/)")


def export_plugin(target: str | Path, out: str | Path, *, client: str | None = None, base: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write the plug-in model of ``target`` to ``out`` (atomically); returns ``out``."""
    from safetensors.torch import load_file

    from fedtune.config import ModelConfig
    from fedtune.models import load_model, probe_mismatch, weight_probe
    from fedtune.models.layout import layout_of

    src = adapter_dir(target, client)
    meta = read_meta(src)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedtuneError(f"{out} already exists; choose another --out or pass --overwrite")
    name = base or meta["base_model"]
    try:
        full, tok = load_model(ModelConfig(name=name, dtype=meta.get("model_dtype", "float32")))
    except FedtuneError as e:
        raise FedtuneError(f"exporting the plug-in model needs the full model '{name}': {e}") from None
    rec = json.loads((src / "fedtune_adapter.json").read_text()) if (src / "fedtune_adapter.json").is_file() else {}
    why = probe_mismatch(rec["base_model_probe"], weight_probe(full)) if rec.get("base_model_probe") else None
    if why is not None:
        raise FedtuneError(f"{src} was trained against other weights than '{name}' ({why}); give the right one with --base")
    plan = Plan.from_dict(meta["plan"])
    scaling = float(meta["lora"]["alpha"]) / float(meta["lora"]["r"]) if meta["train"] == "lora" else None
    values = E.plugin_values(full, load_file(str(src / ADAPTER_FILE)), plan, layout_of(full.config.model_type), scaling)
    params = E.plain_params(full)
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v)
    for attr in ("fedtune_name", "_fedtune_masked_logits"):
        if hasattr(full.config, attr):
            delattr(full.config, attr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        full.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if (src / "fedtune_template.json").is_file():
            shutil.copy2(src / "fedtune_template.json", tmp / "fedtune_template.json")
        (tmp / "fedtune_offsite_export.json").write_text(json.dumps(
            {"from": str(src.resolve()), "full_model": name, "plan": meta["plan"], "train": meta["train"],
             "round": rec.get("round")}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
