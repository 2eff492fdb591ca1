"""`mumic drift`: how the labels moved between two committed runs, per label and in the embeddings."""

from __future__ import annotations

import json
import sys
from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.options import WORKDIR_HELP, json_field, output_field

NAME = "drift"
HELP = "per label, how the share of images above threshold moved between two runs; flags unlikely changes"
DESCRIPTION = (
    "Compare two committed runs of a retag output: per label, the share of images at or above the label's "
    "threshold and the mean score in each run, the change, and a flag where a two-proportion z-test "
    "(Benjamini-Hochberg across labels) finds the change unlikely and it is at least --min-change; plus the "
    "cosine distance between the runs' mean embeddings. Appends the comparison to the `drift` table under "
    "--output (replacing an earlier one of the same runs and scope), writes an HTML report and prints the "
    "biggest movers. --from and --to are short for --from-run and --to-run."
)
GROUPS = {"the test": ("alpha", "min_change"), "thresholds": ("model", "fallback_threshold", "tracking_uri", "workdir")}


@dataclass(frozen=True)
class DriftArgs:
    output: str = output_field()
    from_run: str | None = Field(
        None,
        description="the earlier run (default: the committed run before --to-run)",
        json_schema_extra={"cli": {"aliases": ["--from"]}},
    )
    to_run: str | None = Field(
        None,
        description="the later run (default: the latest committed run)",
        json_schema_extra={"cli": {"aliases": ["--to"]}},
    )
    scope: Literal["current", "tags"] = Field(
        "current",
        description="current: the catalog as each run left it (the `current` table at that run's commit); "
        "tags: only the rows each run tagged (an incremental run tags only new or changed images)",
    )
    alpha: float = Field(0.01, gt=0, lt=1, description="flag where the Benjamini-Hochberg adjusted p is below this")
    min_change: float = Field(0.02, ge=0, le=1, description="flag only where the rate moved by at least this much")
    model: list[str] = Field(
        default_factory=list,
        description="model references whose thresholds to use for the rows they made; for other rows the "
        "registry is asked for their model version",
    )
    fallback_threshold: float = Field(
        0.5, gt=0, lt=1, description="the cut-off for rows whose model version's thresholds are not found (warned)"
    )
    tracking_uri: str | None = Field(None, description="MLflow tracking URI of the registry (default: MLFLOW_TRACKING_URI, else the workdir's mlflow.db)")
    workdir: str | None = Field(None, description=WORKDIR_HELP)
    report: str | None = Field(None, description="where to write the HTML report (default: OUTPUT/reports/drift-FROM-TO.html)")
    show: int = Field(15, ge=1, description="labels printed, biggest movers first (the table and the report hold all)")
    json: bool = json_field("the comparison and every label")


def options() -> tuple[type, ...]:
    return (DriftArgs,)


def run(args: DriftArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from jobs.errors import UserError
    from pipelines.drift import DriftError, format_text, run_drift

    try:
        drift = run_drift(
            args.output,
            from_run=args.from_run,
            to_run=args.to_run,
            scope=args.scope,
            models=args.model,
            tracking_uri=args.tracking_uri,
            workdir=args.workdir,
            fallback_threshold=args.fallback_threshold,
            alpha=args.alpha,
            min_change=args.min_change,
            report=args.report,
        )
    except DriftError as e:
        raise UserError(str(e)) from None
    for warning in drift.warnings:
        print(f"mumic: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({**drift.summary, "table": drift.table, "report": drift.report, "labels": drift.labels}))
        return 0
    print(format_text(drift.summary, drift.labels, args.show))
    print(f"table: {drift.table}\nreport: {drift.report}")
    return 0
