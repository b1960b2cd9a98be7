"""`mhc-mlx <command> ...`: one entry point, one module per command.

A command module defines `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed arguments; its return value is the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("info", "demo", "train", "bench", "hrm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mhc-mlx", description="Manifold-Constrained Hyper-Connections for MLX"
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"mhc_mlx.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"mhc_mlx.cli.{name}":
                raise
            continue  # a command this build does not ship
        module.register(sub)
    return parser


def describe_error(e: Exception) -> str:
    """One line for the user: OS errors as 'path: reason' rather than '[Errno N] ...'."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        # Bad input (a flag, a file, a shape) or a path the OS refuses: say what it is, no traceback.
        print(f"mhc-mlx {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
