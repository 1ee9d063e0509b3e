"""`neoformer <command>`: thin argument parsing; each command lives with the code it drives.

A command module exposes ``add_parser(subparsers)`` which registers its sub-parser and sets
``func`` (called with the parsed args, returns an exit code). Errors a user can fix
(ConfigError, ValueError, FileNotFoundError) are printed as one line, never a stack trace.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that defines add_parser(); these modules import torch only when a command runs,
# so `neoformer --help` stays fast (tests/test_cli_ux.py checks torch stays unimported)
COMMANDS = {
    "info": "neoformer.cli.info",
    "train": "neoformer.cli.train",
    "eval": "neoformer.cli.eval",
    "generate": "neoformer.cli.generate",
    "tokenizer": "neoformer.cli.tokenizer",
    "checkpoint": "neoformer.cli.checkpoint",
    "export": "neoformer.cli.export",
    "serve": "neoformer.cli.serve",
    "embed": "neoformer.cli.embed",
    "fill-mask": "neoformer.cli.fill_mask",
    "import": "neoformer.cli.import_",
    "finetune": "neoformer.cli.finetune",
    "quantize": "neoformer.cli.quantize",
    "ablate": "neoformer.cli.ablate",
    "compress": "neoformer.cli.compress",
}


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        # a command whose module fails to import is a bug: raise, never drop it from --help
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the reader went away
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
