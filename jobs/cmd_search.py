"""`mumic search`: text-to-image search over the embeddings of a committed run (the latest by default)."""

from __future__ import annotations

import json

from pydantic import Field
from pydantic.dataclasses import dataclass

NAME = "search"
HELP = "rank the latest run's images by similarity to a text"


@dataclass(frozen=True)
class SearchArgs:
    output: str = Field(description="the retag output location (local path or s3://)")
    model: str = Field(description="the model that produced the run (models:/..., folder or s3://)")
    text: str = Field(description="what to look for, e.g. 'red'")
    k: int = Field(20, ge=1, description="how many images")
    run_id: str | None = Field(None, description="search this committed run instead of the latest")
    json: bool = Field(False, description="one JSON object per hit")


def options() -> tuple[type, ...]:
    return (SearchArgs,)


def run(args: SearchArgs) -> int:
    import sys

    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines import tables
    from pipelines.registry import load_scorer

    scorer, mref = load_scorer(args.model)
    run, hits = tables.search_embeddings(args.output, scorer.embed_text(args.text), k=args.k, run_id=args.run_id)
    if (run["model_name"], run["model_version"]) != (mref.name, mref.version):
        print(
            f"mumic: warning: run {run['run_id']} was tagged by {run['model_name']}/{run['model_version']}, "
            f"searching with {mref.name}/{mref.version}",
            file=sys.stderr,
        )
    if args.json:
        for rank, h in enumerate(hits, 1):
            print(json.dumps({"rank": rank, **h}))
        return 0
    print(f"run {run['run_id']} ({run['run_date']}), top {len(hits)} for {args.text!r}:")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:3d}  {h['score']:.3f}  {h['image_id']}  {h['uri']}  [{', '.join(h['labels'][:5])}]")
    return 0
