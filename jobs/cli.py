"""The `mumic` command line. Each command lives in its own `jobs/cmd_*.py` module exposing
`NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.

Options can also come from a YAML job config (`--config FILE`, keys = option names with underscores);
flags given on the command line override it. Errors a user can cause exit non-zero with one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

COMMANDS = ("quickstart", "train", "evaluate", "promote", "retag", "tag", "search", "runs")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 1 (or `.code`)."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def _load_module(name: str):
    return importlib.import_module(f"jobs.cmd_{name}")


def load_job_config(path: str) -> dict[str, Any]:
    import yaml

    from pipelines import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path).decode("utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}", EXIT_USAGE) from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}", EXIT_USAGE) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value", EXIT_USAGE)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mumic",
        description="Tag large image catalogs with many labels per image, and compute their embeddings.",
    )
    parser.add_argument("--log-level", default=os.environ.get("MUMIC_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = _load_module(name)
        except ModuleNotFoundError as e:
            if e.name == f"jobs.cmd_{name}":
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        p.add_argument("--config", help="YAML job config; command-line flags override its values")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # Required options may come from the --config file, which is only known after a first parse: that
    # parse requires nothing; the second one requires what neither the flags nor the file gave.
    required = [
        action
        for group in parser._actions
        if isinstance(group, argparse._SubParsersAction)
        for sub in group.choices.values()
        for action in sub._actions
        if action.required
    ]
    for action in required:
        action.required = False
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        raise SystemExit(EXIT_USAGE)
    cfg: dict[str, Any] = {}
    if getattr(args, "config", None):
        sub: argparse.ArgumentParser = args._parser
        cfg = load_job_config(args.config)
        known = {a.dest for a in sub._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UserError(f"config file {args.config}: unknown options {unknown}", EXIT_USAGE)
        sub.set_defaults(**cfg)  # the file's values as defaults: flags still override them
    for action in required:
        action.required = action.dest not in cfg
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"mumic: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("mumic: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-fixable errors from the library are typed ValueErrors with one line
        from mumic_core.images import ImageError
        from mumic_core.model import ModelError
        from mumic_core.taxonomy import TaxonomyError
        from pipelines.storage import StorageError, redact

        if isinstance(e, (ModelError, TaxonomyError, StorageError, ImageError, FileNotFoundError, PermissionError)):
            print(f"mumic: error: {redact(str(e)).splitlines()[0]}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
