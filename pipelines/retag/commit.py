"""Committing a run: ONE Delta transaction adds every staged data file to `tags` (app transaction
`mumic-retag:<run_id>`, the run summary in its commit metadata); then the `runs` row, idempotent by run id."""

from __future__ import annotations

import datetime as dt
import json
import time

import pyarrow as pa
from deltalake import CommitProperties, Transaction, write_deltalake
from deltalake.transaction import AddAction

from .. import storage
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
    now_ms, before = int(time.time() * 1000), table.version()
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
    return commit_version(tags_uri, run_id, since=before + 1)


def _commit_record(tags_uri: str, run_id: str, since: int = 0) -> tuple[int, dict] | None:
    """(version, commitInfo) of the `tags` commit that added this run, read from the log newest first.
    Not `DeltaTable.history()`: on S3 it holds the GIL through its requests."""
    table = open_table(tags_uri)
    if table is None:
        return None
    for version in range(table.version(), max(since, 0) - 1, -1):
        text = storage.read_text(storage.join(tags_uri, "_delta_log", f"{version:020d}.json"))
        for line in (text or "").splitlines():
            if '"commitInfo"' in line:
                info = json.loads(line)["commitInfo"]
                if info.get("mumic.run_id") == run_id:
                    return version, info
    return None


def commit_version(tags_uri: str, run_id: str, since: int = 0) -> int | None:
    """The `tags` version whose commit added this run (other writers may have committed since)."""
    record = _commit_record(tags_uri, run_id, since)
    return None if record is None else record[0]


def run_row_from_history(tags_uri: str, run_id: str) -> dict | None:
    """The run summary recorded in the commit that added the run's rows (to repair a missing runs row)."""
    record = _commit_record(tags_uri, run_id)
    return json.loads(record[1]["mumic.run"]) if record and record[1].get("mumic.run") else None


def ensure_run_row(runs_uri: str, run_row: dict) -> bool:
    """Append the run's row to `runs` unless it is there already; True when written now."""
    table = open_or_create(runs_uri, RUNS_SCHEMA)
    app_id = runs_app_id(run_row["run_id"])
    if table.transaction_version(app_id) is not None:
        return False
    row = dict(run_row)
    for key in ("started_at", "finished_at"):
        row[key] = dt.datetime.fromisoformat(row[key])
    # .get: a row repaired from an older commit's record lacks the fields added since (null)
    data = pa.Table.from_pylist([{k: row.get(k) for k in RUN_FIELDS}], schema=RUNS_SCHEMA)
    missing = not set(RUN_FIELDS).issubset(table.schema().to_arrow().names)  # a table written before
    write_deltalake(
        table,
        data,
        mode="append",
        schema_mode="merge" if missing else None,
        commit_properties=CommitProperties(
            app_transactions=[Transaction(app_id, 1, int(time.time() * 1000))]
        ),
    )
    return True
