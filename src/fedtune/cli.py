"""The ``fedtune`` command.

    fedtune run CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]
    fedtune data describe PRESET_OR_CONFIG [key.sub=value ...] [--out DIR]

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
    return p


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
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("FEDTUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            from fedtune.config import load_config
            from fedtune.run import run

            cfg = load_config(args.config, args.overrides)
            run(cfg, resume=args.resume, verbose=not args.quiet)
        elif args.command == "data" and args.data_command == "describe":
            _describe(args)
    except FedtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
