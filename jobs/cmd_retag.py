"""`mumic retag`: the nightly job — tag a catalog with a model into the `tags` / `runs` Delta tables."""

from __future__ import annotations

import argparse
import json

from jobs.cli import EXIT_USAGE, UserError

NAME = "retag"
HELP = "tag a catalog with a model into Delta tables (Ray Data; incremental; one commit per run)"
DESCRIPTION = (
    "Stream a catalog (Parquet/CSV with image_id, uri; or a folder / s3:// prefix) through fetch, decode and "
    "an inference actor pool into <output>/tags and <output>/runs. Each run is one atomic commit; rerunning "
    "a crashed run with the same --run-id finishes it; images already tagged ok by the same model version "
    "are skipped unless --full."
)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--catalog", required=True, help="Parquet/CSV catalog (image_id, uri), or a folder / s3:// prefix"
    )
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a model folder"
    )
    p.add_argument("--output", required=True, help="folder or s3:// prefix holding the tags and runs tables")
    p.add_argument("--run-id", help="id of this run (default: new); reuse a crashed run's id to finish it")
    p.add_argument("--full", action="store_true", help="re-tag every image, even those already tagged ok")
    p.add_argument(
        "--top-k", type=_non_negative, default=10, help="labels kept per image besides those above threshold"
    )
    p.add_argument("--batch-size", type=_positive, default=256, help="images per model call")
    p.add_argument(
        "--concurrency", type=_positive, help="inference actors (default: one per GPU, or from the CPU count)"
    )
    p.add_argument(
        "--gpus",
        type=_non_negative,
        default=0,
        help="GPU inference actors to request even if no GPU node is up yet (autoscaling clusters); "
        "default: one per GPU present",
    )
    p.add_argument("--max-pixels", type=_positive, help="refuse images larger than this (width*height)")
    p.add_argument("--run-date", help="partition date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--fetch-threads", type=_positive, default=16, help="concurrent reads per fetch task")
    p.add_argument(
        "--fetch-concurrency",
        type=_positive,
        help="fetch tasks at once (default: one per infer actor, min 2)",
    )
    p.add_argument(
        "--rows-per-part", type=_positive, default=100_000, help="rows per staged file (the unit of resume)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from pipelines.retag import RetagError, RetagOptions, format_summary, run_retag

    options = RetagOptions(
        run_id=args.run_id,
        full=args.full,
        top_k=args.top_k,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        run_date=args.run_date,
        fetch_threads=args.fetch_threads,
        fetch_concurrency=args.fetch_concurrency,
        rows_per_part=args.rows_per_part,
        gpus=args.gpus,
        progress=not args.no_progress,
        **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
    )
    try:
        summary = run_retag(args.catalog, args.model, args.output, options)
    except RetagError as e:
        raise UserError(str(e), EXIT_USAGE) from None
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0
