"""``fedtune eval``: evaluate targets on tasks, print a table, save JSON + markdown + samples.

    fedtune eval TARGET [--suite fed-dolly | --tasks gsm8k,humaneval] [--limit N] [task.opt=value ...]

Results go to ``RUN_DIR/eval/`` when the target is (inside) a run directory, else to
``runs/eval-<name>/`` (or ``--out DIR``): ``results.json`` (everything), ``results.md`` (the
tables) and ``samples/<target>/<task>.jsonl`` (every prompt's output and grade).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError, unknown_name

log = logging.getLogger(__name__)

#: The paper's pairings of fine-tuning data and evaluation (FS-LLM Table 1).
SUITES: dict[str, tuple[str, ...]] = {
    "fed-codealpaca": ("humaneval",),
    "fed-mbxp": ("humaneval",),  # the offline stand-in for fed-codealpaca
    "fed-codesearchnet": ("humaneval",),
    "fed-dolly": ("helm-mini",),
    "alpaca": ("helm-mini",),
    "alpaca-cleaned": ("helm-mini",),
    "fed-gsm8k-3": ("gsm8k",),
}


@dataclass
class EvalSettings:
    tasks: list[str]
    limit: int | None = None
    seed: int = 0
    #: ``task.option=value`` settings, e.g. ``{"humaneval": {"n": 10}}``.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 16
    max_batch_tokens: int = 16384
    data_dir: str | None = None
    data_setting: str = "--data-dir"
    progress: bool = True


def parse_task_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["humaneval.n=10", "gsm8k.shots=4"]`` -> ``{"humaneval": {"n": 10}, "gsm8k": {"shots": 4}}``."""
    import yaml

    from fedtune.eval.tasks import TASKS

    class NoAliases(yaml.SafeLoader):
        """YAML without aliases: a value like ``[&a [1,1], [*a,*a], ...]`` doubles with every
        level (a "billion laughs"), and an option never needs one."""

        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                raise FedtuneError("a YAML alias (*name)")
            return super().compose_node(parent, index)

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if len(item) > 10_000:
            raise FedtuneError(f"task option '{item[:60]}...' is {len(item):,} characters long; options are short values")
        key, sep, raw = item.partition("=")
        task, dot, opt = key.partition(".")
        if not sep or not dot or not opt:
            raise FedtuneError(f"task option '{item}' must look like task.option=value, e.g. humaneval.n=10")
        if task not in TASKS:
            raise unknown_name("evaluation task", task, TASKS)
        try:
            value = yaml.load(raw, Loader=NoAliases)  # noqa: S506 - a SafeLoader subclass
        except FedtuneError as e:
            raise FedtuneError(f"task option '{key}' uses {e}, which task options do not allow") from None
        except yaml.YAMLError:
            value = raw
        out.setdefault(task, {})[opt] = value
    return out


def tasks_for(suite: str | None, tasks: str | None, run_cfg: Any) -> list[str]:
    from fedtune.eval.tasks import TASKS

    if suite and tasks:
        raise FedtuneError("give --suite or --tasks, not both")
    if suite:
        if suite not in SUITES:
            raise unknown_name("suite", suite, SUITES)
        return list(SUITES[suite])
    if tasks:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        if not names:
            raise FedtuneError(f"--tasks {tasks!r} names no task; e.g. --tasks gsm8k,mmlu")
        for t in names:
            if t not in TASKS:
                raise unknown_name("evaluation task", t, TASKS)
        twice = sorted({t for t in names if names.count(t) > 1})
        if twice:
            raise FedtuneError(f"--tasks lists {', '.join(twice)} more than once")
        return names
    preset = getattr(getattr(run_cfg, "data", None), "preset", None) if run_cfg is not None else None
    if preset in SUITES:
        return list(SUITES[preset])
    raise FedtuneError("say what to evaluate: --suite " + "|".join(SUITES) + ", or --tasks " + ",".join(TASKS))


def stop_token_ids(template: Any, tokenizer: Any) -> list[int]:
    """Token ids generation stops at besides EOS: the last id of the template's response
    terminator (the chat format's end-of-turn token for ``chat``; EOS itself for the others)."""
    if template is None or not hasattr(template, "end_ids"):
        return []
    try:
        return template.end_ids(tokenizer)[-1:]
    except FedtuneError:
        return []


def check_settings(settings: EvalSettings) -> None:
    """The command line's own numbers and paths: one error each, before anything is loaded."""
    if settings.limit is not None and (isinstance(settings.limit, bool) or settings.limit < 1):
        raise FedtuneError(f"--limit must be a positive number of examples per task, got {settings.limit} "
                           "(leave it out to evaluate every example)")
    if not 1 <= settings.batch_size <= 1 << 16:
        raise FedtuneError(f"--batch-size must be from 1 to 65536 sequences, got {settings.batch_size}")
    if not 0 <= settings.seed < 2**63:
        raise FedtuneError(f"--seed must be from 0 to 2^63-1, got {settings.seed}")
    if settings.data_dir is not None and not Path(settings.data_dir).expanduser().is_dir():
        what = "is a file, not a directory" if Path(settings.data_dir).expanduser().exists() else "does not exist"
        raise FedtuneError(f"{settings.data_setting} {settings.data_dir} {what}; give the directory that holds "
                           "the evaluation data (see docs/eval.md#data)")


def check_output_dir(out_dir: Path, setting: str) -> None:
    """Refuse, before any evaluation work, an output directory that cannot be written: one that is
    a file, lies below a file, or sits on a read-only or otherwise unwritable file system (a file
    is created and removed in the nearest existing directory, which nothing short of writing
    proves). Nothing is created here."""
    import tempfile

    p = Path(out_dir).expanduser()
    if p.exists() and not p.is_dir():
        raise FedtuneError(f"{setting} {out_dir} is a file, not a directory; give a directory for the results")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise FedtuneError(f"{setting} {out_dir} lies below {probe}, which is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".fedtune-write-test-"):
            pass
    except OSError as e:
        raise FedtuneError(f"{setting} {out_dir} cannot be written ({probe}: {e.strerror or e}); give a writable "
                           "directory") from None


def evaluate_model(model: Any, tokenizer: Any, settings: EvalSettings, *, template: Any = None,
                   run_cfg: Any = None, device: Any = None, echo=print) -> dict[str, Any]:
    """Run ``settings.tasks`` on one opened model; returns ``{task: TaskResult}``.

    This is what both ``fedtune eval`` and the in-loop evaluation of ``fedtune run`` call.
    """
    from fedtune.config import DataConfig
    from fedtune.eval.engine import Engine
    from fedtune.eval.tasks import TaskContext, get_task

    add_special = getattr(template, "add_special_tokens", True) if template is not None else True
    engine = Engine(model, tokenizer, device=device, batch_size=settings.batch_size,
                    max_batch_tokens=settings.max_batch_tokens, add_special_tokens=add_special,
                    progress=settings.progress, stop_token_ids=stop_token_ids(template, tokenizer))
    ctx = TaskContext(engine=engine, template=template, data_cfg=DataConfig(data_dir=settings.data_dir),
                      data_setting=settings.data_setting, run_cfg=run_cfg, limit=settings.limit,
                      seed=settings.seed, progress=settings.progress)
    results = {}
    for name in settings.tasks:
        task = get_task(name).configure(settings.options.get(name, {}))
        res = task.run(ctx)
        results[name] = res
        echo(f"  {name}: {res.metric} {res.score:.4f} (n={res.num_examples}, {res.seconds:.1f}s)")
    results["_engine"] = engine.stats
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    """The results as markdown: one headline table, then each task's details."""
    targets = report["targets"]
    tasks = report["settings"]["tasks"]
    lines = [f"# fedtune eval: {report['target']}", "",
             f"{report['created']} · limit {report['settings']['limit'] or 'task default'} · seed "
             f"{report['settings']['seed']}", ""]
    head = ["target", "model"] + [f"{t} ({targets[0]['results'][t]['metric']})" if targets else t for t in tasks]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tg in targets:
        row = [tg["label"], f"`{tg['model']}`" + (f" + `{tg['adapter']}`" if tg.get("adapter") else "")]
        row += [_fmt(tg["results"][t]["score"]) + f" (n={tg['results'][t]['num_examples']})" for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    for t in tasks:
        first = targets[0]["results"][t] if targets else None
        if first is None:
            continue
        if first.get("parts"):
            lines += ["", f"## {t}", ""]
            parts = list(first["parts"])
            lines += ["| target | " + " | ".join(f"{p} ({first['parts'][p]['metric']})" for p in parts) + " | mean |",
                      "|" + "---|" * (len(parts) + 2)]
            for tg in targets:
                r = tg["results"][t]
                lines.append(f"| {tg['label']} | " + " | ".join(_fmt(r["parts"][p]["score"]) for p in parts)
                             + f" | {_fmt(r['score'])} |")
        cats = first["metrics"].get("per_category") or (first.get("parts", {}).get("mmlu", {}).get("metrics", {})
                                                        .get("per_category"))
        if cats:
            lines += ["", f"## {t}: MMLU accuracy per category", "",
                      "| target | " + " | ".join(cats) + " |", "|" + "---|" * (len(cats) + 1)]
            for tg in targets:
                r = tg["results"][t]
                pc = r["metrics"].get("per_category") or r["parts"]["mmlu"]["metrics"]["per_category"]
                lines.append(f"| {tg['label']} | " + " | ".join(
                    f"{_fmt(pc[c]['accuracy'])} (n={pc[c]['n']})" if c in pc else "-" for c in cats) + " |")
        pc = first["metrics"].get("per_client")
        if pc:
            lines += ["", f"## {t}: per client ({first['metrics'].get('split')})", "",
                      "| target | " + " | ".join(pc) + " | pooled |", "|" + "---|" * (len(pc) + 2)]
            for tg in targets:
                m = tg["results"][t]["metrics"]
                lines.append(f"| {tg['label']} | " + " | ".join(_fmt(m["per_client"].get(c, {}).get("loss", math.nan))
                                                              for c in pc) + f" | {_fmt(m['loss'])} |")
    if report.get("offsite_gap"):
        from fedtune.offsite.evaluation import gap_markdown

        lines.append(gap_markdown(report["offsite_gap"]))
    notes = sorted({n for tg in targets for r in tg["results"].values() for n in r.get("notes", [])})
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def run_eval(target: str, settings: EvalSettings, *, base: str | None = None, clients: bool = True,
             compare_base: bool = False, out: str | None = None, dtype: str = "float32", device: str = "auto",
             suite: str | None = None, tasks: str | None = None, verbose: bool = True,
             command: str | None = None, offsite: str = "both") -> dict[str, Any]:
    """Resolve ``target``, evaluate every target on the tasks, write the results; return the report."""
    from fedtune.eval.targets import ModelCache, open_target, resolve_targets
    from fedtune.utils import atomic_write_json, atomic_write_text, resolve_device, safe_name, seed_everything

    echo = (lambda s: print(s, flush=True)) if verbose else (lambda s: None)
    resolved = resolve_targets(target, base=base, clients=clients, compare_base=compare_base, offsite=offsite)
    settings.tasks = tasks_for(suite, tasks, resolved.run_cfg) if not settings.tasks else settings.tasks
    if settings.data_dir is None and resolved.run_cfg is not None and resolved.run_cfg.data.data_dir:
        settings.data_dir = resolved.run_cfg.data.data_dir
    # fail fast on bad options, before any model is loaded
    from fedtune.eval.tasks import get_task

    for name in settings.tasks:
        get_task(name).configure(settings.options.get(name, {}))
    for name in settings.options:
        if name not in settings.tasks and not (name in ("mmlu", "nq-open-book", "openbookqa", "imdb")
                                               and "helm-mini" in settings.tasks):
            raise FedtuneError(f"options given for task '{name}', which is not being evaluated ({', '.join(settings.tasks)})")
    if out:
        out_dir = Path(out)
    elif resolved.run_dir is not None:
        out_dir = resolved.run_dir / "eval"
    else:
        out_dir = Path("runs") / f"eval-{safe_name(Path(target).name or target)}"
    check_output_dir(out_dir, "--out" if out else "the results directory (--out)")
    dev = resolve_device(device)
    cache = ModelCache(dtype=dtype, device=str(dev))
    report: dict[str, Any] = {
        "target": target, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
        "settings": {"tasks": settings.tasks, "limit": settings.limit, "seed": settings.seed,
                     "options": settings.options, "dtype": dtype, "device": str(dev),
                     "batch_size": settings.batch_size},
        "targets": [],
    }
    echo(f"fedtune eval: {len(resolved.targets)} target(s) × {', '.join(settings.tasks)}"
         f"{f' (limit {settings.limit})' if settings.limit else ''} → {out_dir}")
    for t in resolved.targets:
        echo(f"[{t.label}] {t.model}" + (f" + {t.path}" if t.path else ""))
        seed_everything(settings.seed)
        with open_target(t, cache) as (model, tok, template):
            res = evaluate_model(model, tok, settings, template=template, run_cfg=resolved.run_cfg,
                                 device=dev, echo=echo)
        stats = res.pop("_engine")
        entry = {"label": t.label, "kind": t.kind, "model": t.model, "adapter": str(t.path) if t.path else None,
                 "results": {k: v.to_dict() for k, v in res.items()},
                 "engine": {"generated_tokens": stats.generated_tokens, "generate_seconds": stats.generate_seconds,
                            "generated_tokens_per_s": stats.tokens_per_s, "scored_tokens": stats.scored_tokens,
                            "score_seconds": stats.score_seconds}}
        report["targets"].append(entry)
        try:
            for name, r in res.items():
                _write_samples(out_dir / "samples" / safe_name(t.label), name, r)
        except OSError as e:
            samples_error = e
            break
    else:
        samples_error = None
    if any(t.kind == "plugin" for t in resolved.targets):  # offsite tuning: emulator vs plug-in
        from fedtune.offsite.evaluation import gap_report

        report["offsite_gap"] = gap_report(report)
    md = markdown(_jsonable(report))
    echo("\n" + md)  # first, so a failed write below loses nothing a person can read
    try:
        if samples_error is not None:
            raise samples_error
        atomic_write_json(out_dir / "results.json", _jsonable(report))
        atomic_write_text(out_dir / "results.md", md)
    except OSError as e:
        raise FedtuneError(f"could not write the results to {out_dir}: {e.strerror or e} ({e.filename or out_dir})"
                           + ("; the tables are printed above" if verbose else "")) from None
    echo(f"written: {out_dir}/results.json, results.md, samples/")
    return report


def _write_samples(d: Path, name: str, r: Any) -> None:
    from fedtune.utils import atomic_write_text

    for part_name, part in r.parts.items():
        _write_samples(d, f"{name}.{part_name}", part)
    if r.samples:
        atomic_write_text(d / f"{name}.jsonl", "".join(json.dumps(_jsonable(s)) + "\n" for s in r.samples))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def main(args: Any) -> None:
    """Entry point of the ``fedtune eval`` subcommand (arguments defined in :mod:`fedtune.cli`)."""
    settings = EvalSettings(tasks=[], limit=args.limit, seed=args.seed, options=parse_task_options(args.options),
                            batch_size=args.batch_size, data_dir=args.data_dir, progress=not args.quiet)
    check_settings(settings)
    run_eval(args.target, settings, base=args.base, clients=not args.no_clients, compare_base=args.compare_base,
             out=args.out, dtype=args.dtype, device=args.device, suite=args.suite, tasks=args.tasks,
             verbose=True, command="fedtune eval " + " ".join(sys.argv[2:]), offsite=getattr(args, "offsite", "both"))
