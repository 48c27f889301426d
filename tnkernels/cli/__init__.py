"""The `tnk` command line. Built-in: `tnk inspect`. Other packages add sub-commands through the entry-point group
`tnk.commands` (each entry is a `register(subparsers)` function), so tnkernels never imports them by name."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from .._version import __version__
from . import inspect_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tnk",
        description=(
            "tnkernels: tensorize neural networks (MPO for Linear/Conv1D, Tucker-2 for Conv2d) and compress them "
            "with slice-wise feature distillation. Run `tnk COMMAND --help` for each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tnkernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect_cmd.register(sub)
    for ep in sorted(entry_points(group="tnk.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional plugin whose dependencies are missing
            print(f"tnk: commands from {ep.value} are unavailable: {exc}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tnk {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tnk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
