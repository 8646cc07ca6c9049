"""PEFT adapters through HF peft: build by name, read and write only the trainable tensors.

Only trainable adapter tensors are exchanged and aggregated. They are addressed by their
``named_parameters`` names (stable for a given model + peft config) so a client can swap its
state into the one shared base model in place, without rebuilding anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedtune.errors import FedtuneError
from fedtune.models import arch_info, model_fingerprint, weight_probe

if TYPE_CHECKING:
    from peft import PeftConfig as HFPeftConfig
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedtune.config import PeftConfig

PEFT_METHODS = ("lora", "prefix", "p_tuning", "prompt_tuning")

TensorDict = dict[str, torch.Tensor]


def build_peft_config(
    cfg: PeftConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> HFPeftConfig:
    """Translate fedtune's :class:`~fedtune.config.PeftConfig` into a peft config object."""
    import peft

    task = peft.TaskType.CAUSAL_LM
    if cfg.method == "lora":
        targets = cfg.target_modules or list(arch_info(model.config.model_type, model).lora_targets)
        return peft.LoraConfig(
            task_type=task, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=targets, bias="none",
        )
    if cfg.method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "p_tuning":
        return peft.PromptEncoderConfig(
            task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
            encoder_hidden_size=cfg.encoder_hidden_size,
        )
    if cfg.method == "prompt_tuning":
        if cfg.prompt_init_text:
            if tokenizer is None:
                raise FedtuneError("prompt_tuning with prompt_init_text needs the tokenizer")
            return peft.PromptTuningConfig(
                task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=cfg.prompt_init_text,
                tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None),
            )
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    raise FedtuneError(f"unknown peft.method '{cfg.method}'; valid: {', '.join(PEFT_METHODS)}")


def attach_adapter(
    model: PreTrainedModel, cfg: PeftConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> PeftModel:
    """Wrap ``model`` with a fresh adapter; the base weights stay frozen, the adapter is fp32."""
    import peft

    if cfg.method == "lora":
        # LoRA's targets are module names of this model: peft rejects names that match nothing (or
        # a module it cannot adapt) with a ValueError, which here is the user's config, not a bug
        try:
            pm = peft.get_peft_model(model, build_peft_config(cfg, model, tokenizer))
        except ValueError as e:
            raise _target_error(model, cfg, e) from None
    elif cfg.method == "prompt_tuning" and cfg.prompt_init_text:
        # peft re-loads the tokenizer by name for text init; a locally built tokenizer has no
        # loadable name, so we initialise from the token embeddings ourselves (same math).
        pcfg = build_peft_config(cfg, model, tokenizer)
        pcfg.prompt_tuning_init = peft.PromptTuningInit.RANDOM
        pm = peft.get_peft_model(model, pcfg)
        _init_prompt_from_text(pm, tokenizer, cfg.prompt_init_text, cfg.num_virtual_tokens)
    else:
        pm = peft.get_peft_model(model, build_peft_config(cfg, model, tokenizer))
    for _, p in trainable_parameters(pm):
        p.data = p.data.float()  # fp32 adapter weights even on a half-precision base
    return pm


def detach_adapter(pm: PeftModel) -> torch.nn.Module:
    """Take the adapter off a model :func:`attach_adapter` wrapped; the base model comes back as it
    was (frozen, eval mode), ready for another adapter. LoRA injects its layers into the base model
    in place, so they are unloaded (not merged: the base weights stay untouched); prompt-learning
    methods leave the base model alone. Raises when anything of an adapter is left (a leak would
    silently change the next run on this base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if getattr(pm, "_fedtune_detached", False):
        return pm.get_base_model()
    cfgs = getattr(pm, "peft_config", {}) or {}
    prompt = any(getattr(c, "is_prompt_learning", False) for c in cfgs.values())
    base = pm.get_base_model() if prompt else pm.unload()
    left = [n for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)]
    if left or hasattr(base, "peft_config"):
        raise RuntimeError(f"adapter layers left in the base model after unloading: {left[:3]}")
    base.requires_grad_(False)
    base.eval()
    pm._fedtune_detached = True
    return base


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of the model's linear layers: what ``peft.target_modules`` can name.

    GPT-2 style models use transformers' ``Conv1D`` for their linear layers; LoRA adapts both."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))})


def _target_error(model: torch.nn.Module, cfg: PeftConfig, err: Exception) -> FedtuneError:
    given = cfg.target_modules or list(arch_info(model.config.model_type, model).lora_targets)
    which = "peft.target_modules" if cfg.target_modules else f"the default LoRA targets of {model.config.model_type}"
    hint = " (or null for this architecture's default)" if cfg.target_modules else ""
    return FedtuneError(
        f"LoRA cannot be attached with {which} = {given}: {err}\nthis model's linear layers are: "
        f"{', '.join(linear_module_names(model))}; set peft.target_modules to some of them{hint}"
    )


def _init_prompt_from_text(pm: PeftModel, tok, text: str, n: int) -> None:
    """Initialise the soft prompt with the embeddings of ``text`` repeated/cut to ``n`` tokens.

    This mirrors ``peft.PromptTuningInit.TEXT`` (which needs a tokenizer loadable by name).
    """
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise FedtuneError("peft.prompt_init_text tokenises to nothing; give some words")
    ids = (ids * (n // len(ids) + 1))[:n]
    emb = pm.get_input_embeddings()
    with torch.no_grad():
        vec = emb(torch.tensor(ids, device=emb.weight.device)).detach().float()
        pm.prompt_encoder[pm.active_adapter].embedding.weight.copy_(vec)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's trainable parameters, in a fixed (registration) order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def get_adapter_state(model: torch.nn.Module) -> TensorDict:
    """Copy of the trainable adapter tensors (on CPU, fp32)."""
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in trainable_parameters(model)}


def set_adapter_state(model: torch.nn.Module, state: TensorDict) -> None:
    """Copy ``state`` into the model's adapter in place; names and shapes must match exactly."""
    params = dict(trainable_parameters(model))
    if params.keys() != state.keys():
        missing = sorted(params.keys() - state.keys())[:3]
        extra = sorted(state.keys() - params.keys())[:3]
        raise FedtuneError(f"adapter state does not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n, p in params.items():
            t = state[n]
            if t.shape != p.shape:
                raise FedtuneError(f"adapter tensor '{n}' has shape {tuple(t.shape)}, model expects {tuple(p.shape)}")
            p.copy_(t)


def save_adapter(model: PeftModel, state: TensorDict, out_dir: Path, extra: dict | None = None,
                 files: dict[str, str] | None = None) -> None:
    """Save ``state`` in PEFT format (``PeftModel.from_pretrained`` loads it) plus fedtune metadata.

    Writes into a temp directory that is renamed into place, so a crash never leaves a
    half-written adapter; ``files`` (name -> text, e.g. the prompt template) go in with it.
    """
    import os
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    current = get_adapter_state(model)
    try:
        set_adapter_state(model, state)
        model.save_pretrained(str(tmp))
        base = model.get_base_model()
        # fingerprint: the architecture; probe: the weights themselves (checked by fedtune eval,
        # so an adapter is never silently evaluated on a same-shaped but different model)
        meta = {"base_model_fingerprint": model_fingerprint(base), "base_model_probe": weight_probe(base),
                "base_model": getattr(base.config, "fedtune_name", None)}
        meta.update(extra or {})
        (tmp / "fedtune_adapter.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        set_adapter_state(model, current)
