"""`mumic index`: build or update a model's nearest-neighbour index over the embeddings of `current`."""

from __future__ import annotations

import json

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.options import MODEL_HELP, json_field, output_field

NAME = "index"
HELP = "build or update the search index of a model's embeddings in `current` (retag does it after each run)"
DESCRIPTION = (
    "Bring the nearest-neighbour index of one model's embeddings in `current` up to date: rows that changed "
    "or left are removed, new and changed rows added (a full rebuild when there is no index yet, or too "
    "much changed). The index lives in OUTPUT/_index/<model>/<version>/; `mumic search` uses it while it "
    "reflects `current` as it is, and `mumic duplicates` finds near-duplicates with it. A retag run "
    "updates it after its commit, so this command is for a first build, a repair, or --full."
)


@dataclass(frozen=True)
class IndexArgs:
    output: str = output_field()
    model: str | None = Field(None, description=f"whose embeddings: {MODEL_HELP}; default: the latest run's model")
    full: bool = Field(False, description="rebuild from scratch instead of updating")
    json: bool = json_field("what was done")


def options() -> tuple[type, ...]:
    return (IndexArgs,)


def chosen_model(output: str, ref: str | None) -> tuple[str, str]:
    """(name, version): `--model` resolved, or the model of the latest committed run."""
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from jobs.errors import UserError
    from pipelines import storage, tables

    if ref:
        from pipelines.registry import resolve_model  # lazily: it loads torch, which only --model needs

        mref = resolve_model(ref)
        return mref.name, mref.version
    run = tables.latest_run(output)
    if run is None:
        raise UserError(f"no committed run in {storage.redact(output)}: retag first, or name the model with --model")
    return run["model_name"], run["model_version"]


def run(args: IndexArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from jobs.errors import UserError
    from pipelines import index
    from pipelines.progress import Progress

    model = chosen_model(args.output, args.model)
    try:
        done = index.refresh(args.output, model, Progress("index"), full=args.full)
    except index.IndexUnavailable as e:
        raise UserError(str(e)) from None
    if done is None:
        raise UserError(f"no image of current in {args.output} was embedded by {model[0]}/{model[1]}")
    folder = index.index_dir(args.output, model)
    if args.json:
        report = {k: getattr(done, k) for k in ("added", "removed", "rebuilt", "up_to_date")}
        print(json.dumps({**report, "seconds": round(done.seconds, 3), "folder": folder, "manifest": done.manifest}))
    else:
        print(f"{done.line()}\n{folder}")
    return 0
