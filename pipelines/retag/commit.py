"""Committing a run: ONE Delta transaction adds every staged data file to `tags` (app transaction
`mumic-retag:<run_id>`, the run summary in its commit metadata); then the `runs` row, idempotent by run id."""

from __future__ import annotations

import datetime as dt
import json
import time

import pyarrow as pa
from deltalake import CommitProperties, Transaction, write_deltalake
from deltalake.transaction import AddAction

from ..tables import (
    PARTITION,
    RUN_FIELDS,
    RUNS_SCHEMA,
    TAGS_SCHEMA,
    open_or_create,
    open_table,
    retag_app_id,
    runs_app_id,
)
from .staging import StagedPart


def is_committed(tags_uri: str, run_id: str) -> bool:
    table = open_table(tags_uri)
    return table is not None and table.transaction_version(retag_app_id(run_id)) is not None


def commit_run(
    tags_uri: str, run_id: str, run_date: str, parts: list[StagedPart], run_row: dict
) -> int | None:
    """Add every staged data file to `tags` in ONE transaction; None when the run id is already committed."""
    table = open_or_create(tags_uri, TAGS_SCHEMA, [PARTITION])
    if table.transaction_version(retag_app_id(run_id)) is not None:
        return None
    actions = [
        AddAction(p.data_file, p.data_size, {PARTITION: run_date}, p.modification_time, True, p.stats)
        for p in parts
        if p.data_file
    ]
    now_ms = int(time.time() * 1000)
    table.create_write_transaction(
        actions,
        mode="append",
        schema=table.schema(),
        partition_by=[PARTITION],
        commit_properties=CommitProperties(
            custom_metadata={"mumic.run_id": run_id, "mumic.run": json.dumps(run_row)},
            app_transactions=[Transaction(retag_app_id(run_id), 1, now_ms)],
        ),
    )
    return open_table(tags_uri).version()


def run_row_from_history(tags_uri: str, run_id: str) -> dict | None:
    """The run summary recorded in the commit that added the run's rows (to repair a missing runs row)."""
    table = open_table(tags_uri)
    if table is None:
        return None
    for commit in table.history():
        if commit.get("mumic.run_id") == run_id and commit.get("mumic.run"):
            return json.loads(commit["mumic.run"])
    return None


def ensure_run_row(runs_uri: str, run_row: dict) -> bool:
    """Append the run's row to `runs` unless it is there already; True when written now."""
    table = open_or_create(runs_uri, RUNS_SCHEMA)
    app_id = runs_app_id(run_row["run_id"])
    if table.transaction_version(app_id) is not None:
        return False
    row = dict(run_row)
    for key in ("started_at", "finished_at"):
        row[key] = dt.datetime.fromisoformat(row[key])
    data = pa.Table.from_pylist([{k: row[k] for k in RUN_FIELDS}], schema=RUNS_SCHEMA)
    write_deltalake(
        table,
        data,
        mode="append",
        commit_properties=CommitProperties(
            app_transactions=[Transaction(app_id, 1, int(time.time() * 1000))]
        ),
    )
    return True
