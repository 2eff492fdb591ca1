"""Building and updating a model's index from `current`: after every retag run, by `mumic index`, and before
`mumic duplicates`.

An index holds the rows of `current` embedded by one model (name, version): embeddings of different models
do not compare. An update reads the id columns of `current` (image_id, uri, content_sha256, tags_version),
compares them with the index's key mapping, removes the keys of rows that changed or left and adds the
changed and new rows, reading embeddings for those rows only. It rebuilds from scratch when there is no
index yet, or when removals since the last build pass REBUILD_SHARE of the rows (removed nodes stay in
the graph as tombstones, which cost memory and recall). Everything is read from one snapshot of `current`,
whose version the manifest records: `mumic search` trusts an index only for that version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from usearch.index import Index

from .. import storage
from ..progress import Progress
from ..tables import arrow_dataset, current_uri, open_table
from . import ann
from .store import (
    MAPPING_SCHEMA,
    IndexUnavailable,
    Model,
    indexed_models,
    load_index,
    publish,
    read_manifest,
    read_mapping,
)

REBUILD_SHARE = 0.2
ID_COLUMNS = ["image_id", "uri", "content_sha256", "tags_version"]


@dataclass
class Refreshed:
    """An index that reflects `current` as of `manifest['current_version']`, and what the refresh did."""

    output: str
    manifest: dict
    loaded: Index | None = None  # in memory when this refresh built or changed it
    added: int = 0
    removed: int = 0
    rebuilt: bool = False
    up_to_date: bool = False  # it already reflected this version: nothing was written
    seconds: float = 0.0

    @property
    def index(self) -> Index:
        if self.loaded is None:
            self.loaded = load_index(self.output, self.manifest)
        return self.loaded

    def line(self) -> str:
        m = self.manifest
        what = "up to date" if self.up_to_date else ("rebuilt" if self.rebuilt else f"+{self.added} -{self.removed}")
        return (
            f"index {m['model_name']}/{m['model_version']}: {what}, {m['rows']} images "
            f"(current version {m['current_version']}) in {self.seconds:.1f}s"
        )


def _mine(model: Model) -> pds.Expression:
    return (pds.field("model_name") == model[0]) & (pds.field("model_version") == model[1])


def refresh(output: str, model: Model, say: Progress | None = None, full: bool = False) -> Refreshed | None:
    """Bring the model's index up to date with `current` (rebuild it with `full`); None when `current`
    holds no image of this model and it has no index yet."""
    started = time.perf_counter()
    table = open_table(current_uri(output))
    if table is None:
        raise IndexUnavailable(f"no current table in {storage.redact(output)}: nothing retagged yet")
    version, ds = table.version(), arrow_dataset(table)
    manifest = read_manifest(output, model)
    if manifest is not None and manifest["current_version"] == version and not full:
        return Refreshed(output, manifest, up_to_date=True)
    ids = ds.to_table(columns=ID_COLUMNS, filter=_mine(model))
    if ids.num_rows == 0 and manifest is None:
        return None
    facts = {
        "current_version": version,
        "rows_other_model": ds.count_rows(filter=pds.field("model_name").is_valid() & ~_mine(model)),
        **ann.PARAMS.as_dict(),
    }
    try:
        done = None if full or manifest is None else _update(output, model, ds, ids, manifest, facts)
    except IndexUnavailable:  # the files it names are gone or unreadable: build a new one
        done = None
    if done is None:
        done = _rebuild(output, model, ds, ids.num_rows, facts, say, dim=(manifest or {}).get("dim"))
    done.seconds = time.perf_counter() - started
    return done


def _rebuild(output: str, model: Model, ds, expected: int, facts: dict, say, dim: int | None) -> Refreshed:
    index, parts, key = None, [], 0
    columns = [*ID_COLUMNS, "labels", "embedding"]
    for batch in ds.to_batches(columns=columns, filter=_mine(model) & pds.field("embedding").is_valid()):
        if not batch.num_rows:
            continue
        vectors = _matrix(batch, dim)
        dim = vectors.shape[1]
        index = index if index is not None else ann.new_index(dim)
        keys = np.arange(key, key + batch.num_rows, dtype=np.uint64)
        ann.add(index, keys, vectors)
        parts.append(_mapping_rows(batch, keys))
        key += batch.num_rows
        if say is not None:
            say.every(10, f"index {model[0]}/{model[1]}: {key}/{expected} images added", key="index")
    if index is None:  # every image of the model left `current`: an empty index says so
        if dim is None:
            raise IndexUnavailable(f"no image of current was embedded by {model[0]}/{model[1]}")
        index = ann.new_index(dim)
    mapping = pa.concat_tables(parts) if parts else MAPPING_SCHEMA.empty_table()
    facts = {**facts, "dim": dim, "rows": key, "next_key": key, "removed_since_build": 0, "rebuilt": True}
    return Refreshed(output, publish(output, model, index, mapping, facts), index, added=key, rebuilt=True)


def _update(output: str, model: Model, ds, ids: pa.Table, manifest: dict, facts: dict) -> Refreshed | None:
    """Remove what changed or left, add what changed or is new; None when a rebuild is due instead."""
    old = read_mapping(output, manifest)
    pos = pc.index_in(ids.column("image_id"), value_set=old.column("image_id"))
    taken = old.take(pc.fill_null(pos, 0))
    same = pc.and_(pc.is_valid(pos), pc.and_(_same(ids, taken, "content_sha256"), _same(ids, taken, "tags_version")))
    same = same.to_numpy(zero_copy_only=False)
    kept = np.zeros(old.num_rows, bool)
    kept[pc.filter(pos, pa.array(same)).to_numpy(zero_copy_only=False).astype(np.int64)] = True
    removed_keys = old.column("key").to_numpy()[~kept]
    removed_total = int(manifest.get("removed_since_build", 0)) + len(removed_keys)
    if removed_total > REBUILD_SHARE * max(ids.num_rows, 1):
        return None
    changed = ids.column("image_id").filter(pa.array(~same)).combine_chunks()
    fresh = _embedded_rows(ds, model, changed)
    dim, next_key = int(manifest["dim"]), int(manifest["next_key"])
    new_keys = np.arange(next_key, next_key + fresh.num_rows, dtype=np.uint64)
    index = None
    if len(removed_keys) or fresh.num_rows:
        index = load_index(output, manifest, view=False)
        ann.remove(index, removed_keys)
        ann.add(index, new_keys, _matrix(fresh, dim))
    kept_rows = taken.filter(pa.array(same)).select(["key", "image_id", "labels"])
    for name in ID_COLUMNS[1:]:  # uri as listed now; the rest is what `same` compared
        kept_rows = kept_rows.append_column(name, ids.column(name).filter(pa.array(same)))
    mapping = pa.concat_tables([kept_rows.select(MAPPING_SCHEMA.names), _mapping_rows(fresh, new_keys)])
    if index is None and pc.all(_same(ids, taken, "uri")).as_py():
        mapping = None  # nothing of this model changed (another model's run): a new manifest only
    rows = old.num_rows if mapping is None else mapping.num_rows
    facts = {**facts, "dim": dim, "rows": rows, "next_key": next_key + fresh.num_rows}
    facts["removed_since_build"] = removed_total
    manifest = publish(output, model, index, mapping, facts, base=manifest)
    return Refreshed(output, manifest, index, added=fresh.num_rows, removed=len(removed_keys))


def _embedded_rows(ds, model: Model, image_ids: pa.Array) -> pa.Table:
    """The mapping columns and embeddings of these rows (none read when there are none)."""
    columns = [*ID_COLUMNS, "labels", "embedding"]
    if not len(image_ids):
        return ds.schema.empty_table().select(columns)
    wanted = _mine(model) & pds.field("embedding").is_valid() & pds.field("image_id").isin(image_ids)
    return ds.to_table(columns=columns, filter=wanted)


def _same(a: pa.Table, b: pa.Table, name: str) -> pa.Array:
    x, y = a.column(name), b.column(name)
    both_null = pc.and_(pc.is_null(x), pc.is_null(y))
    return pc.or_(pc.fill_null(pc.equal(x, y), False), both_null)


def _matrix(rows: pa.Table | pa.RecordBatch, dim: int | None) -> np.ndarray:
    """The `embedding` column as float32 [N, D]; a StorageError when lengths differ from `dim`."""
    col = rows.column("embedding")
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    want = dim if dim is not None else (int(lengths[0]) if len(lengths) else 0)
    if len(lengths) and (lengths != want).any():
        raise storage.StorageError(f"embeddings of different lengths in current ({sorted(set(lengths.tolist()))[:5]})")
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, want)


def _mapping_rows(rows: pa.Table | pa.RecordBatch, keys: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(keys, pa.uint64()),
            **{name: rows.column(name) for name in ID_COLUMNS},
            "labels": _label_names(rows.column("labels")),
        },
        schema=MAPPING_SCHEMA,
    )


def _label_names(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """list<struct<label, score>> → list<string> of the labels, in order."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = pc.subtract(col.offsets, col.offsets[0])
    names = pc.struct_field(col.flatten(), "label")
    return pa.ListArray.from_arrays(offsets, names, mask=col.is_null())


def refresh_after_run(output: str, model: Model, say: Progress) -> None:
    """After a run updated `current`: the run's model's index, and every other index under `output` (a run
    may have relabelled their images). Never raises: the run is committed whatever happens here."""
    for one in sorted({tuple(model), *indexed_models(output)}):
        try:
            done = refresh(output, one, say)
        except Exception as e:  # any failure: the run stands, and search scans exactly until a rebuild
            line = storage.redact(str(e)).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            warning = (
                f"warning: the search index of {one[0]}/{one[1]} was not updated ({line}); `mumic search` "
                f"scans every embedding until `mumic index --output {storage.redact(output)}` rebuilds it"
            )
            if say.enabled:
                say(warning)
            else:  # a run without progress lines (a library call) still shows it
                logging.getLogger("mumic").warning(warning)
            continue
        if done is not None:
            say(done.line())
