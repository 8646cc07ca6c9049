"""The ``fedtune`` command.

    fedtune run CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]
    fedtune data describe PRESET_OR_CONFIG [key.sub=value ...] [--out DIR]
    fedtune eval TARGET [--suite NAME | --tasks a,b] [--limit N] [task.option=value ...]

User mistakes print one ``error:`` line (or a few for several invalid keys) and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fedtune.errors import FedtuneError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated PEFT fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a federated fine-tuning job")
    r.add_argument("config", help="YAML config file (see configs/)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 fl.rounds=5")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    r.add_argument("-q", "--quiet", action="store_true", help="no per-round tables")
    d = sub.add_parser("data", help="inspect federated datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    desc = dsub.add_parser("describe", help="clients × sizes, label histograms, token lengths, heatmap")
    desc.add_argument("target", help="a preset name (fed-dolly, ...) or a YAML config")
    desc.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.num_clients=4")
    desc.add_argument("--out", default=None, help="directory for the heatmap PNG and JSON (default: runs/describe-<target>)")
    desc.add_argument("--no-tokens", action="store_true", help="skip token-length statistics (no tokenizer load)")
    _eval_parser(sub)
    return p


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model, adapter(s) or run directory on benchmark tasks",
                       description="Evaluate a base model, a merged model, a PEFT adapter, per-client adapters "
                       "or a whole run directory on HumanEval, GSM8K, MMLU, HELM-MINI, held-out loss (docs/eval.md).")
    e.add_argument("target", help="a run directory, an adapter directory, a folder of client adapters, "
                   "or a model (smollm2-135m-instruct, a HF directory, ...)")
    e.add_argument("options", nargs="*", help="task options, e.g. humaneval.n=10 humaneval.temperature=0.8 gsm8k.shots=4")
    what = e.add_mutually_exclusive_group()
    what.add_argument("--suite", help="the paper's pairing for a training preset: fed-dolly -> helm-mini, "
                      "fed-gsm8k-3 -> gsm8k, fed-codealpaca/fed-mbxp -> humaneval (default for a run: its preset)")
    what.add_argument("--tasks", help="comma-separated tasks: humaneval, gsm8k, mmlu, helm-mini, nq-open-book, "
                      "openbookqa, imdb, heldout")
    e.add_argument("--limit", type=int, default=None, help="evaluate at most N examples per task (a seeded subset)")
    e.add_argument("--base", default=None, help="base model for the adapter(s) (default: the one they record)")
    e.add_argument("--compare-base", action="store_true", help="also evaluate the base model, in the same table")
    e.add_argument("--no-clients", action="store_true", help="run directory: skip the per-client adapters")
    e.add_argument("--out", default=None, help="results directory (default: RUN_DIR/eval or runs/eval-<name>)")
    e.add_argument("--data-dir", default=None, help="directory holding the evaluation data (else $FEDTUNE_DATA_DIR, "
                   "the run's data.data_dir, or the download cache)")
    e.add_argument("--seed", type=int, default=0, help="subset selection and sampling seed")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default="auto")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _eval(args) -> None:
    from fedtune.eval.runner import main as eval_main

    eval_main(args)


def _describe(args) -> None:
    import json

    from fedtune.config import load_config
    from fedtune.data import PRESETS, build_federated_data, describe_federated_data, format_description
    from fedtune.utils import atomic_write_json

    if args.target.endswith((".yaml", ".yml")):
        cfg = load_config(args.target, args.overrides)
        label = Path(args.target).stem
    else:
        if args.target not in PRESETS:
            from fedtune.errors import unknown_name

            raise unknown_name("preset (or a .yaml config)", args.target, PRESETS)
        cfg = load_config(None, [f"data.preset={args.target}", *args.overrides])
        label = args.target
    fed = build_federated_data(cfg.data, cfg.seed)
    tokenizer = None
    if not args.no_tokens:
        from fedtune.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    out = Path(args.out) if args.out else Path("runs") / f"describe-{label}"
    out.mkdir(parents=True, exist_ok=True)
    desc = describe_federated_data(fed, tokenizer, out)
    print(format_description(desc))
    atomic_write_json(out / "description.json", json.loads(json.dumps(desc, default=str)))
    print(f"\nwritten: {out}/description.json and the label heatmap in {out}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "eval" and all("=" in x and not x.startswith("-") for x in extra):
        args.options += extra  # task options after flags: `fedtune eval RUN --limit 5 humaneval.n=10`
    elif extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    logging.basicConfig(level=os.environ.get("FEDTUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            from fedtune.config import load_config
            from fedtune.run import run

            cfg = load_config(args.config, args.overrides)
            run(cfg, resume=args.resume, verbose=not args.quiet)
        elif args.command == "data" and args.data_command == "describe":
            _describe(args)
        elif args.command == "eval":
            _eval(args)
    except FedtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
