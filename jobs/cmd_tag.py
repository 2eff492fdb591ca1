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
    import torch

    from jobs.cli import UserError
    from mumic_core import images
    from pipelines import models, storage

    labels = None
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise UserError("--labels needs at least one non-empty label", 2)
    model, mref = models.load(args.model)
    cfg = model.config
    max_pixels = args.max_pixels or images.DEFAULT_MAX_PIXELS
    failed = 0
    for ref in args.images:
        try:
            data = storage.read_bytes(storage.resolve(ref))
            x = images.load_for_model(
                data, cfg.image_size, max_pixels=max_pixels, resize_mode=cfg.resize_mode
            )
        except images.ImageError as e:
            failed += 1
            print(f"{ref}: error: {e}", file=sys.stderr)
            continue
        except (FileNotFoundError, IsADirectoryError):
            failed += 1
            print(f"{ref}: error: not_found", file=sys.stderr)
            continue
        except PermissionError:
            failed += 1
            print(f"{ref}: error: access_denied", file=sys.stderr)
            continue
        with torch.no_grad():
            if labels:
                scores = model.score_labels(x[None], labels)[0].tolist()
                names, thresholds = labels, [0.5] * len(labels)
            else:
                scores = model.score(x[None])[0].tolist()
                names, thresholds = model.taxonomy.names, model.thresholds.tolist()
        ranked = sorted(zip(names, scores, thresholds, strict=True), key=lambda t: -t[1])
        chosen = [(n, s) for i, (n, s, t) in enumerate(ranked) if s >= t or i < args.top_k]
        if args.json:
            print(
                json.dumps(
                    {
                        "image": ref,
                        "model": f"{mref.name}/{mref.version}",
                        "labels": [{"label": n, "score": round(s, 4)} for n, s in chosen],
                        "scores": dict(zip(names, [round(s, 4) for s in scores], strict=True)),
                    }
                )
            )
        else:
            shown = ", ".join(
                f"{n} {s:.2f}" + ("" if s >= t else "?") for n, s, t in ranked if (n, s) in chosen
            )
            print(f"{ref}: {shown}")
    if failed:
        print(f"mumic: {failed} of {len(args.images)} images could not be tagged", file=sys.stderr)
        return 1
    return 0
