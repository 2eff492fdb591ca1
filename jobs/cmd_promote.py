"""`mumic promote`: move a registry alias (default champion) to a version, only if it is at least as good."""

from __future__ import annotations

import argparse

from jobs.cli import EXIT_FAILED

NAME = "promote"
HELP = "point an alias (default champion) at a model version if it is at least as good on a metric"
DESCRIPTION = (
    "Compare the version's recorded metric (set at registration from its held-out evaluation) with the "
    "alias's current holder; move the alias only if the version is at least as good (higher is better). "
    "A refusal prints both numbers and exits 1; --force moves the alias anyway."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--version", required=True, help="version number to promote")
    p.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    p.add_argument("--metric", default="gap_at_10", help="metric to compare (default: gap_at_10)")
    p.add_argument("--force", action="store_true", help="move the alias whatever the metric says")
    p.add_argument("--workdir", help="folder of the default mlflow.db (default: cwd)")


def run(args: argparse.Namespace) -> int:
    from pipelines.registry.tracking import quiet_mlflow

    quiet_mlflow()
    import sys

    from pipelines import registry
    from pipelines.registry import tracking

    result = registry.promote(
        args.name,
        args.version,
        alias=args.alias,
        metric=args.metric,
        force=args.force,
        tracking_uri=tracking.tracking_uri(args.workdir),
    )
    if not result.promoted:
        print(f"mumic: {result.message}", file=sys.stderr)
        return EXIT_FAILED
    print(result.message)
    return 0
