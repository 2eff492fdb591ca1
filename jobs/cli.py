"""The `mumic` command line. Each command is a `jobs/cmd_*.py` module exposing `NAME`, `HELP`, optional
`DESCRIPTION` and `GROUPS`, `options()` (its pydantic dataclasses, imported when the command is used) and
`run(*instances) -> int`, called with one instance of each of those dataclasses.

Options can also come from a YAML job config (`--config FILE`, keys = option names with underscores);
flags given on the command line override it, and both are validated the same way (`jobs.options`).
Errors a user can cause exit non-zero with one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

# Ray's own autoscaler lines ("No available node types can fulfill ...", about any job on a shared cluster)
# go to the driver's stdout, where `--json` summaries are; the commands say in one line what they wait for.
# Read when ray is imported (lazily, after this), so set here.
os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")

from jobs import (
    cmd_ablate,
    cmd_drift,
    cmd_duplicates,
    cmd_evaluate,
    cmd_index,
    cmd_promote,
    cmd_quickstart,
    cmd_retag,
    cmd_review,
    cmd_runs,
    cmd_search,
    cmd_tag,
    cmd_train,
    cmd_vacuum,
    options,
)
from jobs.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UserError
from jobs.options import Option, load_job_config

COMMANDS = (
    cmd_quickstart, cmd_train, cmd_evaluate, cmd_promote, cmd_retag, cmd_tag, cmd_search, cmd_runs, cmd_vacuum,
    cmd_drift, cmd_review, cmd_ablate, cmd_index, cmd_duplicates,
)
_BY_NAME = {mod.NAME: mod for mod in COMMANDS}

__all__ = [
    "COMMANDS",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Invocation",
    "UserError",
    "build_parser",
    "command_fields",
    "load_job_config",
    "main",
    "parse",
]


def command_fields(name: str) -> dict[str, Option]:
    """The options of command `name` by field name (= job-config key): flag, required, default, help."""
    return options.fields(_BY_NAME[name].options())


class _CommandParser(argparse.ArgumentParser):
    """A command's parser. Its options are added when it is first used, so that `mumic --help` (or one
    command) does not import every pipeline."""

    def __init__(self, *args: Any, command: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mumic_command, self.mumic_loaded = command, command is None

    def _load(self) -> None:
        if not self.mumic_loaded:
            self.mumic_loaded = True
            mod = self.mumic_command
            options.add_options(self, command_fields(mod.NAME), getattr(mod, "GROUPS", {}))

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._load()
        return super().format_usage()

    def format_help(self) -> str:
        self._load()
        return super().format_help()


def build_parser(allow_abbrev: bool = True) -> argparse.ArgumentParser:
    """`allow_abbrev=False`: a flag must be spelled out (what a job definition should be checked with)."""
    parser = argparse.ArgumentParser(
        prog="mumic",
        description="Tag large image catalogs with many labels per image, and compute their embeddings.",
        allow_abbrev=allow_abbrev,
    )
    parser.add_argument("--log-level", default=os.environ.get("MUMIC_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    for mod in COMMANDS:
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            allow_abbrev=allow_abbrev,
            command=mod,
        )
        p.add_argument("--config", help="YAML job config; command-line flags override its values")
    return parser


@dataclasses.dataclass(frozen=True)
class Invocation:
    """A parsed, validated command line: the command and one instance of each of its dataclasses."""

    command: str
    options: tuple
    log_level: str = "WARNING"

    @property
    def values(self) -> dict[str, Any]:
        """Every option's value by field name."""
        return {k: v for o in self.options for k, v in dataclasses.asdict(o).items()}


def parse(argv: Sequence[str] | None = None, allow_abbrev: bool = True) -> Invocation:
    """The command line (and its --config file) as typed options; `UserError` (exit 2) when invalid."""
    parser = build_parser(allow_abbrev)
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(EXIT_USAGE)
    known = command_fields(ns.command)
    given = {k: v for k, v in vars(ns).items() if k in known}
    config = load_job_config(ns.config) if ns.config else {}
    instances = options.build(_BY_NAME[ns.command].options(), given, config, ns.config)
    return Invocation(ns.command, instances, ns.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        inv = parse(argv)
        logging.basicConfig(level=getattr(logging, str(inv.log_level).upper(), logging.WARNING),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return int(_BY_NAME[inv.command].run(*inv.options) or EXIT_OK)
    except UserError as e:
        print(f"mumic: error: {_redacted(str(e))}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("mumic: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-fixable errors from the library are typed ValueErrors with one line
        # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
        from mumic_core.images import ImageError
        from mumic_core.model_config import ModelError
        from mumic_core.taxonomy import TaxonomyError
        from pipelines.storage import StorageError, redact

        mlflow_errors = getattr(sys.modules.get("mlflow.exceptions"), "MlflowException", ())  # if MLflow ran
        user_caused = (ModelError, TaxonomyError, StorageError, ImageError, FileNotFoundError, PermissionError)
        if isinstance(e, user_caused) or (mlflow_errors and isinstance(e, mlflow_errors)):
            print(f"mumic: error: {redact(str(e)).splitlines()[0]}", file=sys.stderr)
            return EXIT_FAILED
        raise


def _redacted(message: str) -> str:
    if "pipelines.storage" not in sys.modules:  # nothing ran that could have put a credential in it
        return message
    return sys.modules["pipelines.storage"].redact(message)


if __name__ == "__main__":
    sys.exit(main())
