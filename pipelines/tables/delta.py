"""Opening the output Delta tables (local or s3://, with the storage layer's AWS options)."""

from __future__ import annotations

import pyarrow as pa
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
