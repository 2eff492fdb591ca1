"""Text-to-image search of `current` through a model's index, when the index reflects `current` as it is
now; otherwise `IndexUnavailable` says why, and the caller scans every embedding instead
(`pipelines.tables.search_embeddings`, which is also the `--exact` and `--run-id` path)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..tables import current_uri, open_table
from . import ann
from .store import IndexUnavailable, Model, load_index, read_manifest, read_mapping

OVERFETCH = 2  # candidates per hit asked of the graph, so that its float16 ranking has room to settle


def usable_manifest(output: str, model: Model) -> dict:
    """The model's manifest when it reflects the current version of `current`; else IndexUnavailable."""
    table = open_table(current_uri(output))
    if table is None:
        raise storage.StorageError(f"no current table in {output}: nothing retagged yet")
    manifest = read_manifest(output, model)
    if manifest is None:
        raise IndexUnavailable(f"no search index for {model[0]}/{model[1]} yet")
    if manifest["current_version"] != table.version():
        raise IndexUnavailable(
            f"the search index of {model[0]}/{model[1]} is stale (built for current version "
            f"{manifest['current_version']}, current is at version {table.version()})"
        )
    return manifest


def search_index(output: str, query: np.ndarray, k: int, model: Model) -> tuple[dict, list[dict]]:
    """Like `search_embeddings` over `current`: (what was searched, hits best first), from the index."""
    manifest = usable_manifest(output, model)
    q = np.asarray(query, dtype=np.float32).ravel()
    if q.shape[0] != int(manifest["dim"]):
        raise storage.StorageError(
            f"the embeddings of current are {manifest['dim']}-d, not {q.shape[0]}-d like the model's: "
            "search with the model that made them"
        )
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    keys, sims = ann.knn(load_index(output, manifest), q, max(k * OVERFETCH, k + 10))
    keys, sims = keys[0][np.isfinite(sims[0])], sims[0][np.isfinite(sims[0])]
    rows = read_mapping(output, manifest, keys=keys, columns=["key", "image_id", "uri", "labels"])
    where = pc.index_in(rows.column("key"), value_set=pa.array(keys, pa.uint64())).to_numpy(zero_copy_only=False)
    order = sorted(range(rows.num_rows), key=lambda i: (-float(sims[where[i]]), rows.column("image_id")[i].as_py()))
    hits = [
        {
            "image_id": rows.column("image_id")[i].as_py(),
            "uri": rows.column("uri")[i].as_py(),
            "score": float(sims[where[i]]),
            "labels": rows.column("labels")[i].as_py() or [],
        }
        for i in order[:k]
    ]
    searched = {
        "source": "current",
        "rows": int(manifest["rows"]),
        "rows_other_model": int(manifest.get("rows_other_model", 0)),
        "index": manifest["generation"],
    }
    return searched, hits
