"""Where an index lives beside the tables, and how a new one is published so readers see all or nothing.

    <output>/_index/<model_name>/<model_version>/
        manifest.json             what the index reflects (the `current` version, its rows, parameters)
        index-<generation>.usearch    the graph and vectors (`ann`)
        keys-<generation>.parquet     key → image_id, uri, content_sha256, tags_version, label names

A build writes its generation's two files first and the manifest last (one atomic write), and readers
only trust the manifest: a reader sees the old generation or the new one, never half of one. Files of
generations older than the previous one are removed once they are an hour old (a reader still holding
the previous manifest keeps its files).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from collections.abc import Sequence
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from usearch.index import Index

from .. import storage
from ..storage import files
from . import ann

FORMAT = 1
MANIFEST = "manifest.json"
KEEP_SECONDS = 3600  # files of superseded generations younger than this stay (readers may hold them)
ROW_GROUP = 16_384  # keys are sorted, so a lookup of a few keys reads a few row groups

MAPPING_SCHEMA = pa.schema(
    [
        ("key", pa.uint64()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("content_sha256", pa.string()),
        ("tags_version", pa.int64()),
        ("labels", pa.list_(pa.string())),  # label names, best first (what a search hit shows)
    ]
)

Model = tuple[str, str]  # (model_name, model_version)


class IndexUnavailable(Exception):
    """No index a reader can trust for this model and `current` version; the message says why (one line)."""


def _component(text: str) -> str:
    safe = quote(str(text), safe="")
    return "%2E" + safe[1:] if safe.startswith(".") else safe


def index_root(output: str) -> str:
    return storage.join(output, "_index")


def index_dir(output: str, model: Model) -> str:
    return storage.join(index_root(output), _component(model[0]), _component(model[1]))


def read_manifest(output: str, model: Model) -> dict | None:
    """The published manifest of this model's index, or None when there is none (or it is unreadable)."""
    text = files.read_text(storage.join(index_dir(output, model), MANIFEST))
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except ValueError:
        return None
    ok = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    return manifest if ok and (manifest.get("model_name"), manifest.get("model_version")) == tuple(model) else None


def indexed_models(output: str) -> list[Model]:
    """The models that have a published index under `output`."""
    found = []
    for name_dir in files.list_dirs(index_root(output)):
        for version_dir in files.list_dirs(name_dir):
            text = files.read_text(storage.join(version_dir, MANIFEST))
            try:
                manifest = json.loads(text) if text else None
            except ValueError:
                manifest = None
            if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
                found.append((str(manifest["model_name"]), str(manifest["model_version"])))
    return sorted(found)


def publish(
    output: str, model: Model, index: Index | None, mapping: pa.Table | None, facts: dict, base: dict | None = None
) -> dict:
    """Write a new generation (index, keys) and then its manifest; returns the manifest. With `index` or
    `mapping` None, the file of `base` (the manifest the update started from) is kept: nothing changed in it."""
    folder = index_dir(output, model)
    previous = read_manifest(output, model)
    generation = f"{int(facts['current_version']):08d}-{uuid.uuid4().hex[:8]}"
    if index is None or mapping is None:
        assert base is not None, "only an existing generation's files can be kept"
    index_name = base["index_file"] if index is None else f"index-{generation}.usearch"
    keys_name = base["keys_file"] if mapping is None else f"keys-{generation}.parquet"
    if index is not None:
        _write_index(index, storage.join(folder, index_name))
    if mapping is not None:
        storage.write_bytes(storage.join(folder, keys_name), _parquet(mapping.sort_by("key").cast(MAPPING_SCHEMA)))
    now = dt.datetime.now(dt.UTC).isoformat()
    manifest = {
        "format": FORMAT,
        "model_name": model[0],
        "model_version": model[1],
        "generation": generation,
        "index_file": index_name,
        "keys_file": keys_name,
        "built_at": now if facts.get("rebuilt") or previous is None else previous.get("built_at", now),
        "updated_at": now,
        "library": f"usearch {_usearch_version()}",
        **{k: v for k, v in facts.items() if k != "rebuilt"},
    }
    storage.write_bytes(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2).encode())
    _remove_superseded(folder, manifest, [previous, base])
    return manifest


def _write_index(index: Index, uri: str) -> None:
    if storage.is_remote(uri):
        storage.write_bytes(uri, ann.save(index))
    else:  # straight into its file (unique, referenced by no manifest yet): no copy in memory
        path = storage.normalize(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ann.save(index, path)


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP)
    return sink.getvalue().to_pybytes()


def _usearch_version() -> str:
    import usearch  # the package's version, for the manifest

    return str(getattr(usearch, "__version__", "?"))


def superseded(
    folder: str, manifest: dict, earlier: Sequence[dict | None] = (), older_than_s: float | None = None
) -> list[tuple[str, int, float]]:
    """(uri, size, mtime) of the files in an index folder that neither `manifest` nor the `earlier`
    manifests name, older than `older_than_s` (default KEEP_SECONDS): what a publish, and `mumic vacuum`,
    remove."""
    keep = {MANIFEST, manifest["index_file"], manifest["keys_file"]}
    for other in filter(None, earlier):
        keep |= {other.get("index_file"), other.get("keys_file")}
    cutoff = time.time() - (KEEP_SECONDS if older_than_s is None else older_than_s)
    return [f for f in files.list_tree(folder) if f[0].rsplit("/", 1)[-1] not in keep and f[2] < cutoff]


def _remove_superseded(folder: str, manifest: dict, earlier: list[dict | None]) -> None:
    for uri, _, _ in superseded(folder, manifest, earlier):
        storage.delete_file(uri)


def load_index(output: str, manifest: dict, view: bool = True) -> Index:
    """The manifest's index: memory-mapped from a local file when `view`, else read into memory."""
    uri = storage.join(index_dir(output, (manifest["model_name"], manifest["model_version"])), manifest["index_file"])
    params = ann.AnnParams.from_dict(manifest)
    try:
        if storage.is_remote(uri):
            return ann.load(storage.read_bytes(uri), params)
        return ann.load(storage.normalize(uri), params, view=view)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise IndexUnavailable(f"the index file {manifest['index_file']} cannot be read ({str(e)[:120]})") from e


def read_mapping(output: str, manifest: dict, keys: np.ndarray | None = None, columns: list[str] | None = None) -> pa.Table:
    """The manifest's key mapping (only the rows of `keys` when given), sorted by key."""
    uri = storage.join(index_dir(output, (manifest["model_name"], manifest["model_version"])), manifest["keys_file"])
    fs, path = files.filesystem(uri)
    wanted = None if keys is None else pc.field("key").isin(pa.array(np.asarray(keys, np.uint64)))
    try:
        return pq.read_table(path, filesystem=fs, columns=columns, filters=wanted)
    except (FileNotFoundError, pa.ArrowException, OSError) as e:
        raise IndexUnavailable(f"the key file {manifest['keys_file']} cannot be read ({str(e)[:120]})") from e
