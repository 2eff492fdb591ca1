"""`mumic search`: text-to-image search over the embeddings of a committed run (the latest by default)."""

from __future__ import annotations

import argparse
import json

NAME = "search"
HELP = "rank the latest run's images by similarity to a text"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="the retag output location (local path or s3://)")
    p.add_argument(
        "--model", required=True, help="the model that produced the run (models:/..., folder or s3://)"
    )
    p.add_argument("--text", required=True, help="what to look for, e.g. 'red'")
    p.add_argument("--k", type=int, default=20, help="how many images (default 20)")
    p.add_argument("--run-id", help="search this committed run instead of the latest")
    p.add_argument("--json", action="store_true", help="one JSON object per hit")


def run(args: argparse.Namespace) -> int:
    import sys

    from jobs.cli import UserError
    from pipelines import tables
    from pipelines.registry import load_scorer

    if args.k < 1:
        raise UserError("--k must be at least 1", 2)
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
