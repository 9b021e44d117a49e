"""The ``rayps`` command line: ``rayps train`` (the main job), ``rayps tune`` (a Ray Tune sweep) and
``rayps plot updaters``.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
A bad flag value prints one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("rayps.deploy.train_command", "rayps.deploy.plot_command", "rayps.deploy.tune_command")


class UsageError(Exception):
    """A bad flag value found after parsing; reported as one line with exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (``rayps train: error: ...``), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="rayps", description="Parameter server on Ray with the DL4J updaters")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        print(f"rayps {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rayps: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # run as the installed module, so UsageError is the class the subcommands raise
    from rayps.deploy.cli import main as installed_main

    sys.exit(installed_main())
