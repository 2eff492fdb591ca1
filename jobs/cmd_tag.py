"""`mumic tag`: tag a few images now (local paths or URIs); `--labels` scores any labels zero-shot."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "tag"
HELP = "tag a few images now; --labels scores any labels, seen in training or not (zero-shot)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_URI", help="image files or s3:// / file:// URIs")
    p.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, a folder or s3://"
    )
    p.add_argument("--labels", help="comma-separated labels to score zero-shot instead of the taxonomy")
    p.add_argument("--top-k", type=int, default=5, help="also show the k best labels (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (decompression bombs)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from jobs.cli import UserError
    from mumic_core import images
    from pipelines import storage
    from pipelines.registry import load_scorer

    labels = None
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise UserError("--labels needs at least one non-empty label", 2)
    scorer, mref = load_scorer(args.model)
    max_pixels = args.max_pixels or images.DEFAULT_MAX_PIXELS
    refs, pixels = [], []
    reads = storage.read_many([storage.resolve(ref) for ref in args.images], threads=8)
    for ref, (data, failure) in zip(args.images, reads, strict=True):
        try:
            if failure is not None:
                raise failure
            pixels.append(scorer.pixels(data, max_pixels))
            refs.append(ref)
        except (storage.ReadFailed, images.ImageError) as e:
            print(f"{ref}: error: {e}", file=sys.stderr)
    if pixels:
        result = scorer.predict(np.stack(pixels), labels)
        for ref, scores, chosen in zip(refs, result.scores, result.chosen(args.top_k), strict=True):
            if args.json:
                record = {
                    "image": ref,
                    "model": f"{mref.name}/{mref.version}",
                    "labels": [{"label": c.label, "score": round(c.score, 4)} for c in chosen],
                    "scores": dict(zip(result.names, [round(float(s), 4) for s in scores], strict=True)),
                }
                print(json.dumps(record))
            else:
                shown = ", ".join(f"{c.label} {c.score:.2f}" + ("" if c.above_threshold else "?") for c in chosen)
                print(f"{ref}: {shown}")
    failed = len(args.images) - len(refs)
    if failed:
        print(f"mumic: {failed} of {len(args.images)} images could not be tagged", file=sys.stderr)
        return 1
    return 0
