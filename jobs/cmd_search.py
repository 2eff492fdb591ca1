"""`mumic search`: text-to-image search over the embeddings of `current` (through the model's index while it
is up to date, else a scan of every embedding) or of one committed run's rows."""

from __future__ import annotations

import json

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.options import json_field, model_field, output_field

NAME = "search"
HELP = "rank the images of `current` (or of one run) by similarity to a text, through the search index"


@dataclass(frozen=True)
class SearchArgs:
    output: str = output_field()
    model: str = model_field()
    text: str = Field(description="what to look for, e.g. 'red'")
    k: int = Field(20, ge=1, description="how many images")
    run_id: str | None = Field(None, description="search this committed run's rows (history) instead of `current`")
    exact: bool = Field(False, description="scan every embedding (brute force) instead of using the search index")
    json: bool = json_field("one object per hit")


def options() -> tuple[type, ...]:
    return (SearchArgs,)


def run(args: SearchArgs) -> int:
    import sys

    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from jobs.errors import UserError
    from pipelines import tables
    from pipelines.registry import load_scorer

    scorer, mref = load_scorer(args.model)
    query, model = scorer.embed_text(args.text), (mref.name, mref.version)
    searched = hits = None
    if not (args.exact or args.run_id):
        from pipelines import index  # lazily, like the rest: only a search of `current` needs it

        try:
            searched, hits = index.search_index(args.output, query, args.k, model)
        except index.IndexUnavailable as e:
            print(f"mumic search: {e}; scanning every embedding instead (`mumic index` builds it)", file=sys.stderr)
    if searched is None:
        searched, hits = tables.search_embeddings(args.output, query, k=args.k, run_id=args.run_id, model=model)
    if searched["rows_other_model"]:
        print(
            f"mumic: warning: {searched['rows_other_model']} images of {searched['source']} were embedded by "
            f"another model than {mref.name}/{mref.version} and are not searched (retag them with it)",
            file=sys.stderr,
        )
    if not searched["rows"]:
        raise UserError(f"no images of {searched['source']} in {args.output} were embedded by {mref.name}/{mref.version}")
    if args.json:
        for rank, h in enumerate(hits, 1):
            print(json.dumps({"rank": rank, **h}))
        return 0
    print(f"{searched['source']} ({searched['rows']} images), top {len(hits)} for {args.text!r}:")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:3d}  {h['score']:.3f}  {h['image_id']}  {h['uri']}  [{', '.join(h['labels'][:5])}]")
    return 0
