"""The ``fedtune`` command.

    fedtune run CONFIG.yaml [key.sub=value ...] [--resume RUN_DIR]
    fedtune data describe PRESET_OR_CONFIG [key.sub=value ...] [--out DIR]
    fedtune eval TARGET [--suite NAME | --tasks a,b] [--limit N] [task.option=value ...]
    fedtune hpo STUDY.yaml [key.sub=value | hpo.key=value ...]   (hyperparameter search on optuna)
    fedtune deploy certs|superlink|register|supernode|submit|worker ...   (networked, on Flower)
    fedtune chat TARGET [--prompt TEXT | --prompts FILE] [--compare-base] [--history N] ...
    fedtune export TARGET --out DIR [--merged] [--dtype float32|bfloat16|float16] [--overwrite]
    fedtune compare RUN_DIR RUN_DIR ... [--out DIR] [--per-client] [--markdown]
    fedtune offsite export RUN_DIR --out DIR      (offsite tuning: the plug-in model as an HF directory)

User mistakes print one ``error:`` line (or a few for several invalid keys) and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
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
    r.add_argument("-v", "--verbose", action="store_true", help="show library warnings too (else only in RUN_DIR/run.log)")
    r.set_defaults(intermixed=r)
    d = sub.add_parser("data", help="inspect federated datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    desc = dsub.add_parser("describe", help="clients × sizes, label histograms, token lengths, heatmap")
    desc.add_argument("target", help="a preset name (fed-dolly, ...) or a YAML config")
    desc.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.num_clients=4")
    desc.add_argument("--out", default=None, help="directory for the heatmap PNG and JSON (default: runs/describe-<target>)")
    desc.add_argument("--no-tokens", action="store_true", help="skip token-length statistics (no tokenizer load)")
    desc.set_defaults(intermixed=desc)
    _eval_parser(sub)
    _hpo_parser(sub)
    _deploy_parser(sub)
    _use_parsers(sub)
    from fedtune.offsite.cli import add_parser as _offsite_parser

    _offsite_parser(sub)
    return p


def _use_parsers(sub) -> None:
    """``chat``, ``export``, ``compare``: using what a run produced (README, "Using the results")."""
    c = sub.add_parser("chat", help="talk to a run's adapter (or a model) in the prompt format it was trained with",
                       description="Interactive chat (Ctrl-C stops an answer, Ctrl-D exits), or one answer per "
                       "prompt with --prompt / --prompts / piped stdin.")
    c.add_argument("target", help="a run directory, an adapter directory, RUN/adapters/<client>, a merged export, or a model")
    c.add_argument("--prompt", action="append", default=None, help="answer this prompt and exit (repeatable)")
    c.add_argument("--prompts", default=None, metavar="FILE", help="answer each line of FILE ('-': stdin) and exit")
    c.add_argument("--history", type=int, default=None, metavar="N",
                   help="earlier turns the model sees (default 3 interactive, 0 one-shot)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--seed", type=int, default=0, help="sampling seed of every answer")
    c.add_argument("--compare-base", action="store_true", help="also print the base model's answer (adapter off)")
    c.add_argument("--system", default=None, help="system message (chat template; Alpaca: before the instruction)")
    c.add_argument("--template", default=None, choices=["alpaca", "alpaca_no_input", "chat"],
                   help="prompt format (default: the adapter's saved template)")
    c.add_argument("--json", action="store_true", help="one-shot: one JSON object per answer instead of text")
    c.add_argument("--base", default=None, help="base model for the adapter (default: the one it records)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--device", default="auto")
    c.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    x = sub.add_parser("export", help="a run's adapter, or a merged model that loads without peft, with a model card")
    x.add_argument("target", help="a run directory, an adapter directory or RUN/adapters/<client>")
    x.add_argument("--out", required=True, help="directory to create (must not exist, unless --overwrite)")
    x.add_argument("--merged", action="store_true", help="fold the LoRA adapter into the base weights (plain HF model)")
    x.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (merged: default float32; adapter: as saved)")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    x.add_argument("--base", default=None, help="base model for the adapter (default: the one it records)")
    x.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    m = sub.add_parser("compare", help="runs side by side: one table, one loss-curve plot, markdown")
    m.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    m.add_argument("--out", default=None, help="directory for compare.md/png/json (default runs/compare-<runs>)")
    m.add_argument("--per-client", action="store_true", help="per-client curves and a per-client table too")
    m.add_argument("--markdown", action="store_true", help="print the markdown table instead of the text table")
    m.add_argument("--labels", default=None, help="comma-separated names for the runs (default: directory names)")
    m.add_argument("-v", "--verbose", action="store_true", help="show library warnings")


def _hpo_parser(sub) -> None:
    h = sub.add_parser("hpo", help="hyperparameter search over federated runs (optuna; resumable; docs/hpo.md)")
    h.add_argument("study", help="a run config with an hpo: section (search space, objective, sampler, pruner)")
    h.add_argument("overrides", nargs="*", help="dotted overrides: hpo.n_trials=8 hpo.sampler=random for the study, "
                   "anything else (fl.rounds=4) for the base run config")
    h.add_argument("-q", "--quiet", action="store_true", help="no per-round progress lines")
    h.set_defaults(intermixed=h)


def _hpo(args) -> None:
    from fedtune.hpo import load_study, run_study

    study = load_study(args.study, args.overrides)
    run_study(study, round_lines=not args.quiet)


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
    e.add_argument("--offsite", choices=["both", "emulator", "plugin"], default="both",
                   help="offsite-tuning adapters: score the emulator, the plug-in (full model), or both (default)")
    e.add_argument("--out", default=None, help="results directory (default: RUN_DIR/eval or runs/eval-<name>)")
    e.add_argument("--data-dir", default=None, help="directory holding the evaluation data (else $FEDTUNE_DATA_DIR, "
                   "the run's data.data_dir, or the download cache)")
    e.add_argument("--seed", type=int, default=0, help="subset selection and sampling seed")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default="auto")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(intermixed=e)


def _eval(args) -> None:
    from fedtune.eval.runner import main as eval_main

    eval_main(args)


def _deploy_parser(sub) -> None:
    d = sub.add_parser("deploy", help="networked federation on Flower (see docs/deployment.md)")
    ds = d.add_subparsers(dest="deploy_command", required=True)
    c = ds.add_parser("certs", help="a CA, the SuperLink's TLS certificate and SuperNode keys (for a test deployment)")
    c.add_argument("--out", required=True, help="directory for ca.crt, server.pem/.key and the node keys")
    c.add_argument("--host", action="append", default=[], help="address SuperNodes dial (IP or DNS name; repeatable)")
    c.add_argument("--node", action="append", default=[], help="a SuperNode key pair to create: NAME and NAME.pub (repeatable)")
    c.add_argument("--days", type=int, default=365, help="validity of the certificates")
    c.add_argument("--overwrite", action="store_true", help="replace existing files")
    sl = ds.add_parser("superlink", help="start the SuperLink (flower-superlink with TLS)")
    sl.add_argument("--certs", required=True, help="directory from `fedtune deploy certs`")
    sl.add_argument("--host", default="0.0.0.0", help="address to listen on")
    sl.add_argument("--port", type=int, default=9093, help="port of its Fleet, Control and Runtime APIs")
    sl.add_argument("--auth", action="store_true", help="only SuperNodes registered with `fedtune deploy register` may connect")
    sl.add_argument("--database", default="superlink.db",
                    help="SQLite file for the SuperLink's state, so a restarted SuperLink keeps its SuperNodes "
                         "(default: superlink.db; ':flwr-in-memory:' keeps it in memory)")
    _connection_args(rg := ds.add_parser("register", help="allow a SuperNode's public key (node authentication)"))
    rg.add_argument("public_key", help="NAME.pub from `fedtune deploy certs --node NAME`")
    rg.add_argument("--client-id", default=None,
                    help="bind the key to these client ids (comma-separated): its node may hold only them")
    sn = ds.add_parser("supernode", help="start one organisation's SuperNode (with fedtune's warm worker)")
    _connection_args(sn)
    sn.add_argument("--client-id", required=True, help="fedtune client id(s) this node answers for (comma-separated)")
    sn.add_argument("--data", default=None, help="this organisation's own data file (else its partition of the run's data)")
    sn.add_argument("--state-dir", default=None, help="where its client state persists (default ./fedtune-state-<id>)")
    sn.add_argument("--key", default=None, help="private key for node authentication (NAME from `fedtune deploy certs --node`)")
    sn.add_argument("--runtime-port", type=int, default=9094, help="local port of the SuperNode's Runtime API")
    sn.add_argument("--no-worker", action="store_true", help="load the model in every ClientApp process instead (slower)")
    # this node's policy: what a submitted run may do on this machine (docs/deployment.md#security)
    sn.add_argument("--allow-remote-code", action="store_true",
                    help="let a run's model.trust_remote_code run the model's own Python code here")
    sn.add_argument("--model-dir", action="append", default=[],
                    help="a directory model.name may point into (repeatable; default: none, only built-in names and hub ids)")
    sn.add_argument("--data-dir", default=None,
                    help="where built-in sources and data files named by a run are looked up (default: $FEDTUNE_DATA_DIR)")
    sn.add_argument("--cache-dir", default=None, help="this node's caches (default: $FEDTUNE_CACHE or ~/.cache/fedtune)")
    sn.add_argument("--max-world-size", type=int, default=1,
                    help="processes a run may start per client (train.world_size; default 1)")
    sb = ds.add_parser("submit", help="submit a fedtune run to the SuperLink (flwr run)")
    _connection_args(sb)
    sb.add_argument("config", help="YAML config file")
    sb.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fl.rounds=5 deploy.min_clients=2")
    sb.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (on the SuperLink machine)")
    sb.add_argument("--stream", action="store_true", help="follow the run's log")
    sb.set_defaults(intermixed=sb)
    w = ds.add_parser("worker", help="fedtune's warm worker on a Unix socket (`supernode` starts it)")
    w.add_argument("--socket", required=True)
    w.add_argument("--ready-file", default=None)
    w.add_argument("--parent-pid", type=int, default=None)


def _connection_args(p) -> None:
    p.add_argument("--superlink", required=True, help="the SuperLink's address as HOST:PORT, e.g. 10.0.0.1:9093")
    p.add_argument("--ca", required=True, help="CA certificate that signed the SuperLink's certificate (ca.crt)")
    p.add_argument("--flwr-home", default=None, help="Flower CLI config dir (default $FLWR_HOME or ~/.cache/fedtune/flwr)")


def _deploy(args) -> int:
    from fedtune.flower import deploy

    cmd = args.deploy_command
    if cmd == "certs":
        from fedtune.flower.certs import make_certificates, make_node_keys

        if not args.host:
            raise FedtuneError("give the address SuperNodes will dial: --host 10.0.0.1 (repeatable; loopback is always added)")
        from fedtune.preflight import check_output_location

        check_output_location(Path(args.out), "--out")
        paths = make_certificates(Path(args.out), args.host, days=args.days, overwrite=args.overwrite)
        keys = make_node_keys(Path(args.out), args.node, overwrite=args.overwrite)
        for role, pth in paths.items():
            print(f"{role:12s} {pth}")
        for name, (priv, pub) in keys.items():
            print(f"node {name:7s} {priv} (stays on its machine), {pub} (register it)")
        return 0
    if cmd == "superlink":
        argv = deploy.superlink_command(Path(args.certs), host=args.host, port=args.port, auth=args.auth,
                                        database=args.database)
        print("$ " + " ".join(argv), flush=True)
        os.execv(argv[0], argv)
    if cmd == "register":
        home = deploy.flwr_home(args.flwr_home)
        deploy.write_connection(home, args.superlink, args.ca)
        argv = deploy.register_command(args.public_key, args.client_id)
        print(f"$ FLWR_HOME={home} " + " ".join(argv), flush=True)
        return subprocess.call(argv, env=dict(os.environ, FLWR_HOME=str(home)))
    if cmd == "supernode":
        return deploy.run_supernode(args.superlink, args.ca, args.client_id, runtime_port=args.runtime_port,
                                    data=args.data, state_dir=args.state_dir, key=args.key, warm=not args.no_worker,
                                    allow_remote_code=args.allow_remote_code, model_dirs=args.model_dir,
                                    data_dir=args.data_dir, cache_dir=args.cache_dir,
                                    max_world_size=args.max_world_size)
    if cmd == "submit":
        from fedtune.config import load_config

        cfg = load_config(args.config, args.overrides)
        run_id = deploy.submit(cfg, args.superlink, args.ca, resume=args.resume, stream=args.stream,
                               home=args.flwr_home)
        if run_id:
            print(f"submitted: Flower run {run_id}; follow it with: FLWR_HOME={deploy.flwr_home(args.flwr_home)} "
                  f"flwr log {run_id} {deploy.CONNECTION}")
        return 0
    if cmd == "worker":
        from fedtune.flower.node import serve_worker

        if args.parent_pid:
            deploy.watch_parent(args.parent_pid)
        serve_worker(args.socket, ready_file=args.ready_file)
    return 0


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
    from fedtune.preflight import check_output_location
    from fedtune.utils import safe_name

    out = Path(args.out) if args.out else Path("runs") / f"describe-{safe_name(label)}"
    check_output_location(out, "--out")  # before the work, not after it
    fed = build_federated_data(cfg.data, cfg.seed)
    tokenizer = None
    if not args.no_tokens:
        from fedtune.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    desc = describe_federated_data(fed, tokenizer, out)
    print(format_description(desc))
    atomic_write_json(out / "description.json", json.loads(json.dumps(desc, default=str)))
    print(f"\nwritten: {out}/description.json and the label heatmap in {out}")


def main(argv: list[str] | None = None) -> int:
    from fedtune.hardware import bound_kernel_caches

    bound_kernel_caches()  # before this process's first matmul (fedtune.hardware)
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    sub = getattr(args, "intermixed", None)
    if sub is not None:
        # Overrides and task options may come before, between or after flags (`run cfg.yaml --resume
        # DIR fl.rounds=5`, `run cfg.yaml -q train.lr=1e-3`): argparse's nargs='*' positional stops
        # at the first flag, so these subcommands are parsed again, intermixed. Subparsers cannot
        # be parsed intermixed themselves; the top level and `data`/`deploy` take no options, so
        # the subcommand's own arguments start right after its 1 or 2 command words.
        words = 2 if args.command in ("data", "deploy") else 1
        vars(args).update(vars(sub.parse_intermixed_args(argv[words:])))
    elif extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    if args.command == "deploy":  # Flower's processes keep their own logging
        logging.basicConfig(level=os.environ.get("FEDTUNE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    else:  # library warnings to the run's log file, not the terminal (fedtune.logs)
        from fedtune.logs import setup_logging

        setup_logging(verbose=getattr(args, "verbose", False))
    try:
        if args.command == "run":
            from fedtune.config import load_config
            from fedtune.run import run
            from fedtune.rundir_lock import sigterm_as_interrupt

            cfg = load_config(args.config, args.overrides)
            with sigterm_as_interrupt():  # SIGTERM unwinds like Ctrl-C: set-up taken back, lock released
                run(cfg, resume=args.resume, verbose=not args.quiet)
        elif args.command == "data" and args.data_command == "describe":
            _describe(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "hpo":
            _hpo(args)
        elif args.command == "deploy":
            return _deploy(args)
        elif args.command in ("chat", "export", "compare"):
            import importlib

            return importlib.import_module(f"fedtune.{args.command}").main(args)
        elif args.command == "offsite":
            from fedtune.offsite.cli import main as offsite_main

            offsite_main(args)
    except FedtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from fedtune.rundir_lock import Terminated

        hint = {"run": "; resume with --resume RUN_DIR",
                "hpo": "; run the same `fedtune hpo` command again to resume the study"}.get(args.command, "")
        print(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}{hint}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if args.command != "deploy":  # leave the process's logging as it was (main may be called again)
            from fedtune.logs import teardown_logging

            teardown_logging()
    return 0


if __name__ == "__main__":
    sys.exit(main())
