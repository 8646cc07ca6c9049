"""``fedtune offsite ...``: the offsite-tuning commands (``export``)."""

from __future__ import annotations


def add_parser(sub) -> None:
    o = sub.add_parser("offsite", help="offsite tuning (FedOT/LocalOT): export the plug-in model (docs/offsite.md)")
    osub = o.add_subparsers(dest="offsite_command", required=True)
    ex = osub.add_parser("export", help="the full model with the trained adapter plugged in, as a Hugging Face "
                         "directory (loads with AutoModelForCausalLM.from_pretrained, no fedtune needed)")
    ex.add_argument("target", help="a run directory or an offsite adapter directory")
    ex.add_argument("--out", required=True, help="directory to write (must not exist, unless --overwrite)")
    ex.add_argument("--client", default=None, help="local scenario: which client's adapter")
    ex.add_argument("--base", default=None, help="the full model (default: the one the run recorded)")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def main(args) -> None:
    if args.offsite_command == "export":
        from fedtune.offsite.export import export_plugin

        out = export_plugin(args.target, args.out, client=args.client, base=args.base, overwrite=args.overwrite)
        print(f"plug-in model written: {out} (AutoModelForCausalLM.from_pretrained('{out}'))")
