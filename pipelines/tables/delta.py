"""Opening the output Delta tables (local or s3://, with the storage layer's AWS options) and reading them
through Arrow's own filesystem, so a reading process exits cleanly."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from .. import storage


def open_table(uri: str) -> DeltaTable | None:
    # Not DeltaTable.is_deltatable: it keeps the GIL during its S3 requests, which stalls every other Python
    # thread of the process (a threaded S3 server in the same process never answers it).
    try:
        return DeltaTable(uri, storage_options=storage.delta_storage_options(uri))
    except TableNotFoundError:
        return None


def open_or_create(uri: str, schema: pa.Schema, partition_by: list[str] | None = None) -> DeltaTable:
    table = open_table(uri)
    if table is not None:
        return table
    return DeltaTable.create(
        uri,
        schema,
        partition_by=partition_by,
        mode="ignore",
        storage_options=storage.delta_storage_options(uri),
    )


def arrow_dataset(table: DeltaTable) -> pds.Dataset:
    """`table` (at the version it was loaded at) as an Arrow dataset read through pyarrow's own filesystem
    (`storage.filesystem`'s). The one deltalake uses by default is written in Python: the bytes it hands
    Arrow are Python objects, and when an Arrow I/O thread frees the last of them after the interpreter
    began to exit, the process aborts (exit 134) after its work is done (docs/output-tables.md, *Reads that
    exit cleanly*). Every read of a Delta table in the project goes through here."""
    fs, root = storage.filesystem(table.table_uri.rstrip("/"))
    return table.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, fs))
