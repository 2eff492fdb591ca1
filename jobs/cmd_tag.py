"""`mumic tag`: tag a few images now (local paths or URIs); `--labels` scores any labels zero-shot."""

from __future__ import annotations

import json
import sys
from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from jobs.errors import EXIT_USAGE, UserError
from jobs.options import json_field, model_field

NAME = "tag"
HELP = "tag a few images now; --labels scores any labels, seen in training or not (zero-shot)"


@dataclass(frozen=True)
class TagArgs:
    images: list[str] = Field(
        min_length=1,
        description="image files or s3:// / file:// URIs",
        json_schema_extra={"cli": {"positional": "IMAGE_OR_URI"}},
    )
    model: str = model_field()
    labels: str | None = Field(
        None, description="comma-separated labels to score zero-shot instead of the taxonomy"
    )
    top_k: int = Field(5, ge=0, description="also show the k best labels")
    json: bool = json_field("one object per image")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="number format of the image tower: fp32, bf16 (autocast) or int8 (dynamic quantisation, "
        "CPU only); the head stays fp32. auto: bf16 on a GPU, fp32 on a CPU",
    )
    max_pixels: int | None = Field(None, ge=1, description="refuse larger images (decompression bombs)")
    allow_root: list[str] = Field(
        default_factory=list,
        description="folders a local image may resolve into besides its own folder (links are followed)",
    )


def options() -> tuple[type, ...]:
    return (TagArgs,)


def run(args: TagArgs) -> int:
    import numpy as np

    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from mumic_core import images
    from pipelines import storage
    from pipelines.registry import load_scorer

    labels = None
    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise UserError("--labels needs at least one non-empty label", EXIT_USAGE)
    scorer, mref = load_scorer(args.model, precision=args.precision)
    max_pixels = args.max_pixels or images.DEFAULT_MAX_PIXELS
    refs, pixels = [], []
    uris = [storage.resolve(ref) for ref in args.images]
    # the same rule as retag's: a local image is a regular file inside its own folder (or --allow-root)
    own = {storage.parent(u) for u in uris if not storage.is_remote(u)}
    reads = storage.read_many(uris, threads=8, roots=storage.confine([*own, *args.allow_root]))
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
