"""``hf-vitask`` command line. Subcommands are added as the pipeline grows; each reads the same
config dataclasses the Python API uses."""

from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    import torch

    from hf_vitask import __version__
    from hf_vitask.models.families import FAMILIES

    print(f"hf_vitask {__version__}")
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    print("supported VLM families:")
    for fam in FAMILIES.values():
        print(f"  {fam.name:<10} model_type in {list(fam.model_types)}, image token {fam.image_token!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hf_vitask import __version__

    parser = argparse.ArgumentParser(prog="hf-vitask", description="Turn a vision-language model into a task specialist.")
    parser.add_argument("--version", action="version", version=f"hf_vitask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="Print the version, the device and the supported VLM families.").set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
