"""`mumic retag`: the nightly job — tag a catalog with a model into the `tags` / `runs` Delta tables."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.errors import UserError
from jobs.options import json_field, model_field, output_field

if TYPE_CHECKING:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.retag import RetagOptions

NAME = "retag"
HELP = "tag a catalog with a model into Delta tables (Ray Data; incremental; one commit per run)"
DESCRIPTION = (
    "Stream a catalog (Parquet/CSV with image_id, uri; or a folder / s3:// prefix) through fetch, decode "
    "and an inference actor pool into <output>/tags (history), <output>/current (every image's labels now) "
    "and <output>/runs. Each run is one atomic commit; rerunning a crashed run with the same --run-id "
    "finishes it; images already tagged ok by the same model version are skipped unless --full; a run with "
    "more than --max-error-rate of its rows in error commits nothing."
)


@dataclass(frozen=True)
class RetagArgs:
    """What to tag with what, and where; how a run goes is `RetagOptions`."""

    catalog: str = Field(description="Parquet/CSV catalog (image_id, uri), or a folder / s3:// prefix")
    model: str = model_field()
    output: str = output_field()
    json: bool = json_field("the summary")


def options() -> tuple[type, ...]:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.retag.options import RetagOptions

    return (RetagArgs, RetagOptions)


def run(args: RetagArgs, opts: RetagOptions) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.retag import RetagError, format_summary, run_retag

    try:
        summary = run_retag(args.catalog, args.model, args.output, opts)
    except RetagError as e:
        raise UserError(str(e), e.code) from None
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0
