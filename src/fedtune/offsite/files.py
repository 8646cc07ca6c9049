"""The offsite adapter directory: what a run saves per adapter (``adapter/``, ``adapters/<client>/``,
and inside each checkpoint), what ``fedtune eval`` and ``fedtune offsite export`` read.

    offsite_adapter.safetensors   the adapter's tensors, named as in the emulator model
    offsite_realign.safetensors   the emulator's low-rank re-alignment (FedBiOT), when there is one
    fedtune_offsite.json          plan (blocks kept/dropped), training mode, LoRA settings, the
                                  emulator's content hash and file, the full model's name
    fedtune_adapter.json          the full model's fingerprint and weight probe (as PEFT adapters)
    fedtune_template.json         the prompt template
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import FedtuneError
from fedtune.offsite.plan import Plan

ADAPTER_FILE = "offsite_adapter.safetensors"
REALIGN_FILE = "offsite_realign.safetensors"
META_FILE = "fedtune_offsite.json"


def is_offsite_dir(p: Path) -> bool:
    return (Path(p) / META_FILE).is_file()


def read_meta(p: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(p) / META_FILE).read_text())
        Plan.from_dict(meta["plan"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FedtuneError(f"{p}/{META_FILE} is not a fedtune offsite adapter description: {e}") from None


def save_offsite_adapter(dest: Path, adapter: dict[str, torch.Tensor], meta: dict[str, Any],
                         files: dict[str, str], realign: dict[str, torch.Tensor] | None = None) -> None:
    """An offsite adapter directory, written atomically (temp dir + rename): the adapter tensors
    (names as in the emulator model), ``fedtune_offsite.json`` (plan, training mode, LoRA settings,
    the emulator's hash and file, the full model and its fingerprint), the re-alignment factors when
    there are any, and ``files`` (the prompt template, ``fedtune_adapter.json``)."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER_FILE))
        if realign:
            save_file({k: v.contiguous() for k, v in realign.items()}, str(tmp / REALIGN_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name, text in files.items():
            (tmp / name).write_text(text)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
