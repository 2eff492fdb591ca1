"""`mumic vacuum`: remove data files no commit references and the staging of abandoned runs."""

from __future__ import annotations

import json

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.options import json_field, output_field

NAME = "vacuum"
HELP = "remove data files no commit references and abandoned runs' staging, older than --grace-hours"
DESCRIPTION = (
    "Delete, under a retag output location, the data files of its tables that no commit references (parts "
    "left by abandoned runs, files removed by earlier commits) and the staging folders of abandoned runs "
    "(no live lease, nothing written within the grace period). A run being written (live lease) is never "
    "touched. Prints what it removed."
)


@dataclass(frozen=True)
class VacuumArgs:
    output: str = output_field()
    grace_hours: int = Field(
        168,
        ge=0,
        description="only files older than this many hours; 0 removes every unreferenced file, only safe "
        "when nothing else writes to the output",
    )
    dry_run: bool = Field(False, description="print what would be removed; remove nothing")
    json: bool = json_field("the report")


def options() -> tuple[type, ...]:
    return (VacuumArgs,)


def run(args: VacuumArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.retag.vacuum import format_report, vacuum_output

    report = vacuum_output(args.output, grace_hours=args.grace_hours, dry_run=args.dry_run)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0
