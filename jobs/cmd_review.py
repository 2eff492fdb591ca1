"""`mumic review`: a review queue for annotators, the images whose labels a model is least sure of."""

from __future__ import annotations

import json

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.errors import EXIT_USAGE, UserError
from jobs.options import json_field, model_field, output_field

NAME = "review"
HELP = "write the k images whose labels the model is least sure of, as annotations to correct"
DESCRIPTION = (
    "Pick, among the images of <output>/current tagged by --model, the --k whose scores are nearest a "
    "label's threshold (in logit space), taking the labels in turn so the queue spreads over them. Writes "
    "an annotations-format CSV (image_id, uri, labels = the model's guess, plus review_label, score, "
    "threshold, rank) that `mumic train --annotations` accepts once corrected, and an HTML contact sheet "
    "beside it."
)


@dataclass(frozen=True)
class ReviewArgs:
    output: str = output_field()
    model: str = model_field()
    k: int = Field(100, ge=1, description="how many images to queue")
    labels: str | None = Field(None, description="comma-separated labels to spread over (default: all of the model's)")
    out: str | None = Field(None, description="the CSV to write, local or s3:// (default: <output>/review/queue-<UTC time>.csv)")
    sheet: bool = Field(True, description="also write the HTML contact sheet beside the CSV")
    json: bool = json_field("the summary")


def options() -> tuple[type, ...]:
    return (ReviewArgs,)


def run(args: ReviewArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines.review import ReviewError, format_summary, run_review

    labels = None
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise UserError("--labels needs at least one non-empty label", EXIT_USAGE)
    if args.out is not None and not args.out.lower().endswith(".csv"):
        raise UserError(f"--out must name a .csv file (got {args.out})", EXIT_USAGE)
    try:
        summary = run_review(args.output, args.model, args.k, labels, out=args.out, sheet=args.sheet)
    except ReviewError as e:
        raise UserError(str(e)) from None
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
