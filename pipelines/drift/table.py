"""The `drift` table under the output: one row per label per comparison; writing a comparison again
replaces its rows in the same commit (a predicate overwrite), so re-running `mumic drift` is idempotent."""

from __future__ import annotations

import pyarrow as pa
from deltalake import write_deltalake

from .. import storage
from ..tables import open_or_create
from ..tables.schema import DRIFT_SCHEMA


def drift_uri(output: str) -> str:
    return storage.join(output, "drift")


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def write_comparison(output: str, rows: list[dict]) -> int:
    """Replace the rows of this comparison (same from_run_id, to_run_id, scope) with `rows`; the new version."""
    first = rows[0]
    if any((r["from_run_id"], r["to_run_id"], r["scope"]) != (first["from_run_id"], first["to_run_id"], first["scope"]) for r in rows):
        raise ValueError("write_comparison takes the rows of one comparison")
    table = open_or_create(drift_uri(output), DRIFT_SCHEMA)
    predicate = " AND ".join(f"{k} = {_quoted(first[k])}" for k in ("from_run_id", "to_run_id", "scope"))
    data = pa.Table.from_pylist([{k: r.get(k) for k in DRIFT_SCHEMA.names} for r in rows], schema=DRIFT_SCHEMA)
    write_deltalake(table, data, mode="overwrite", predicate=predicate)
    table.update_incremental()
    return table.version()
