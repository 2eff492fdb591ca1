"""`mumic duplicates`: groups of near-duplicate images in `current`, as the `duplicates` table and a sheet."""

from __future__ import annotations

import json

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.options import MODEL_HELP, json_field, output_field

NAME = "duplicates"
HELP = "group images of `current` whose embeddings are closer than --threshold; a Delta table and an HTML sheet"
DESCRIPTION = (
    "Find groups of near-duplicate images among the images of `current` embedded by one model: every pair "
    "whose cosine similarity is at least --threshold, through the model's search index (brought up to date "
    "first), and every pair with the same bytes (content_sha256), joined into groups (connected "
    "components). Writes the Delta table OUTPUT/duplicates (replaced each time: group_id, image_id, "
    "similarity to the group's first image, exact_duplicate, ...) and an HTML sheet of the largest groups."
)


@dataclass(frozen=True)
class DuplicatesArgs:
    output: str = output_field()
    threshold: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="cosine similarity of two images' embeddings (1 = the same) at or above which they are "
        "near-duplicates; re-encoded or resized copies score ~0.97-1 with CLIP-like models",
    )
    model: str | None = Field(None, description=f"whose embeddings: {MODEL_HELP}; default: the latest run's model")
    neighbours: int = Field(16, ge=1, le=1000, description="nearest images looked at per image")
    sheet: str | None = Field(None, description="where to write the HTML sheet (default: OUTPUT/reports/duplicates.html)")
    sheet_groups: int = Field(50, ge=0, description="how many of the largest groups the sheet shows")
    json: bool = json_field("the summary")


def options() -> tuple[type, ...]:
    return (DuplicatesArgs,)


def run(args: DuplicatesArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from jobs.cmd_index import chosen_model
    from jobs.errors import UserError
    from pipelines import index, storage
    from pipelines.progress import Progress

    say = Progress("duplicates")
    model = chosen_model(args.output, args.model)
    try:
        found = index.find_duplicates(args.output, model, args.threshold, args.neighbours, say)
    except index.IndexUnavailable as e:
        raise UserError(str(e)) from None
    sheet = args.sheet or storage.join(args.output, "reports", "duplicates.html")
    title = f"Near-duplicates in {storage.redact(args.output)} ({model[0]}/{model[1]}, similarity >= {args.threshold:g})"
    say(f"writing the sheet of the {min(found.groups, args.sheet_groups)} largest groups")
    index.write_sheet(found.table, sheet, title, max_groups=args.sheet_groups)
    exact = int(sum(found.table.column("exact_duplicate").to_pylist()))
    summary = {
        "groups": found.groups,
        "images_in_groups": found.table.num_rows,
        "exact_duplicates": exact,
        "images_searched": found.images,
        "table": found.uri,
        "sheet": sheet,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"{found.groups} groups of near-duplicates: {found.table.num_rows} of {found.images} images "
        f"({exact} share their bytes with another)\ntable  {found.uri}\nsheet  {sheet}"
    )
    return 0
