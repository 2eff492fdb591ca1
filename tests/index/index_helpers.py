"""Helpers of the index tests: real image files, real `current` Delta tables written with the real schema,
and embeddings that tell images apart.

The tiny test models embed every generated image almost alike (cosine > 0.999 between unrelated images),
so these tests embed pictures with a fixed random projection of their (mean-centred) pixels instead: like
a CLIP embedding, it puts a re-encoded or resized copy at ~0.99 and unrelated pictures below ~0.6. The
vectors are 64-d, the tiny model's width, so `mumic search --model <tiny>` can query them.
"""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

DIM = 64
_PROJECTION = np.random.default_rng(123).standard_normal((24 * 24 * 3, DIM)).astype(np.float32)


def pixel_embedding(data: bytes) -> np.ndarray:
    from mumic_core.images import decode

    img = decode(data).resize((24, 24), Image.BILINEAR)
    x = np.asarray(img, np.float32).reshape(-1, 3) / 255.0
    v = (x - x.mean(axis=0)).ravel() @ _PROJECTION
    return (v / np.linalg.norm(v)).astype(np.float32)


def picture(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A smooth random colour field: two of them are as unrelated as two photos."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """L2-normalised vectors around 20 centres (neighbours mean something, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def current_table(rows: list[dict], model: tuple[str, str]) -> pa.Table:
    """`current` rows with the real schema: each row gives image_id, uri, content_sha256, embedding, and
    optionally labels (names), tags_version, model (name, version)."""
    from pipelines.tables import CURRENT_SCHEMA

    now = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    out = []
    for r in rows:
        name, version = r.get("model", model)
        out.append(
            {
                "image_id": r["image_id"],
                "uri": r["uri"],
                "content_sha256": r["content_sha256"],
                "status": "ok",
                "labels": [{"label": label, "score": 0.9 - 0.1 * i} for i, label in enumerate(r.get("labels", ["red"]))],
                "scores": [0.5],
                "embedding": [float(v) for v in r["embedding"]],
                "model_name": name,
                "model_version": version,
                "taxonomy_sha256": "tax",
                "run_id": "run-1",
                "run_date": "2026-01-02",
                "processed_at": now,
                "tags_version": r.get("tags_version", 0),
                "last_seen_run_id": "run-1",
                "last_seen_at": now,
            }
        )
    return pa.Table.from_pylist(out, schema=CURRENT_SCHEMA)


def write_current(output: Path | str, rows: list[dict], model: tuple[str, str]) -> int:
    """Replace `current` under `output` with these rows (one Delta commit); its new version."""
    from deltalake import DeltaTable, write_deltalake

    from pipelines import storage

    uri = storage.join(str(output), "current")
    opts = storage.delta_storage_options(uri)
    write_deltalake(uri, current_table(rows, model), mode="overwrite", storage_options=opts)
    return DeltaTable(uri, storage_options=opts).version()


def vector_rows(vectors: np.ndarray, prefix: str = "v") -> list[dict]:
    return [
        {"image_id": f"{prefix}-{i:05d}", "uri": f"/data/{prefix}-{i:05d}.jpg", "content_sha256": f"{i:064x}", "embedding": v}
        for i, v in enumerate(vectors)
    ]


def mumic(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=timeout)
