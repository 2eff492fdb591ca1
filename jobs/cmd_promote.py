"""`mumic promote`: move a registry alias (default champion) to a version, only if it is at least as good."""

from __future__ import annotations

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.errors import EXIT_FAILED
from jobs.options import WORKDIR_HELP

NAME = "promote"
HELP = "point an alias (default champion) at a model version if it is at least as good on a metric"
DESCRIPTION = (
    "Compare the version's recorded metric (set at registration from its held-out evaluation) with the "
    "alias's current holder; move the alias only if the version is at least as good (higher is better). "
    "A refusal prints both numbers and exits 1; --force moves the alias anyway."
)


@dataclass(frozen=True)
class PromoteArgs:
    name: str = Field(description="registered model name")
    version: str = Field(description="version number to promote")
    alias: str = Field("champion", description="alias to move")
    metric: str = Field("gap_at_10", description="metric to compare")
    force: bool = Field(False, description="move the alias whatever the metric says")
    workdir: str | None = Field(None, description=WORKDIR_HELP)


def options() -> tuple[type, ...]:
    return (PromoteArgs,)


def run(args: PromoteArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.registry.tracking import quiet_mlflow

    quiet_mlflow()
    import sys

    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
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
