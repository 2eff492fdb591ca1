"""The two sides of a comparison: which committed runs (`runs`), and the rows each stands for, either the
catalog as the run left it (`current` at the run's own commit, by Delta time travel) or the rows the run
itself tagged (`tags` where run_id = the run, status ok)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pds
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from .. import storage
from ..progress import Progress
from ..tables import arrow_dataset, current_app_id, current_uri, list_runs, open_table, tags_uri

SCOPES = ("current", "tags")
COLUMNS = ["run_id", "model_name", "model_version", "scores", "embedding"]


class DriftError(ValueError):
    """A comparison that cannot be made as asked (unknown run, one run only, history gone): one line."""


@dataclass(frozen=True)
class Side:
    run: dict  # the run's `runs` row
    scope: str
    current_version: int | None = None  # scope `current`: the version the run's update committed

    @property
    def run_id(self) -> str:
        return self.run["run_id"]

    def describe(self) -> str:
        where = f"current v{self.current_version}" if self.scope == "current" else "its tags rows"
        return f"run {self.run_id} ({self.run['run_date']}, {where})"


def pick_runs(output: str, from_run: str | None, to_run: str | None) -> tuple[dict, dict, dict[str, dict]]:
    """(from, to, every committed run by id): `to` defaults to the latest run, `from` to the one before `to`."""
    runs = list_runs(output).to_pylist()
    where = storage.redact(output)
    if not runs:
        raise DriftError(f"no committed runs in {where}: nothing to compare")
    by_id = {r["run_id"]: r for r in runs}
    for flag, given in (("--from-run", from_run), ("--to-run", to_run)):
        if given is not None and given not in by_id:
            raise DriftError(f"{flag}: no committed run {given!r} in {where} (`mumic runs --output {where}` lists them)")
    to = by_id[to_run] if to_run else runs[-1]
    if from_run:
        frm = by_id[from_run]
    else:
        position = [r["run_id"] for r in runs].index(to["run_id"])
        if position == 0:
            only = "the only committed run" if len(runs) == 1 else "the first committed run"
            raise DriftError(f"run {to['run_id']} is {only} in {where}: nothing before it to compare with")
        frm = runs[position - 1]
    if frm["run_id"] == to["run_id"]:
        raise DriftError(f"--from-run and --to-run both name run {to['run_id']}: compare two different runs")
    return frm, to, by_id


def current_versions(output: str, run_ids: list[str], say: Progress) -> dict[str, int]:
    """The `current` version each run's update committed (its app transaction `mumic-current:<run_id>`),
    read from the table's log newest first; DriftError naming what to do when one has none."""
    uri = current_uri(output)
    table = open_table(uri)
    if table is None:
        raise DriftError(f"no current table in {storage.redact(output)}: --scope tags compares the rows each run tagged")
    wanted = {current_app_id(r): r for r in run_ids}
    found: dict[str, int] = {}
    newest = table.version()
    say.every(10, f"finding the runs' commits in current's log ({newest + 1} versions, newest first)", key="log")
    for version in range(newest, -1, -1):
        # Not DeltaTable.history(): commitInfo does not hold the app transaction, and on S3 it holds the GIL.
        text = storage.read_text(storage.join(uri, "_delta_log", f"{version:020d}.json"))
        if text is None:  # older log entries were cleaned up: nothing further back to find
            break
        for line in text.splitlines():
            if '"txn"' in line:
                app = json.loads(line).get("txn", {}).get("appId")
                if app in wanted:
                    found.setdefault(wanted[app], version)
        if len(found) == len(wanted):
            break
        say.every(10, f"current's log: at version {version} of {newest}", key="log")
    for run_id in run_ids:
        if run_id not in found:
            raise DriftError(
                f"current has no commit of run {run_id} (its update is missing, or its log entry was cleaned up): "
                f"`mumic retag --run-id {run_id}` repairs a missing update; --scope tags compares the rows each run tagged"
            )
    return found


def batches(output: str, side: Side) -> Iterator[pa.RecordBatch]:
    """The side's rows with scores (COLUMNS), in batches."""
    if side.scope == "current":
        uri = current_uri(output)
        try:
            table = DeltaTable(uri, version=side.current_version, storage_options=storage.delta_storage_options(uri))
        except DeltaError as e:
            raise DriftError(f"cannot open current as run {side.run_id} left it (v{side.current_version}): {_line(e)}") from None
        condition = pds.field("scores").is_valid()
    else:
        table = open_table(tags_uri(output))
        if table is None:
            raise DriftError(f"no tags table in {storage.redact(output)}")
        condition = (pds.field("run_date") == side.run["run_date"]) & (pds.field("run_id") == side.run_id)
        condition &= pds.field("status") == "ok"
    try:
        for batch in arrow_dataset(table).to_batches(columns=COLUMNS, filter=condition):
            if batch.num_rows:
                yield batch
    except OSError as e:  # a data file of an old version removed by `mumic vacuum` (past its grace period)
        raise DriftError(
            f"the rows of {side.describe()} are no longer readable ({_line(e)}): vacuumed history; "
            f"--scope tags compares the rows each run tagged"
        ) from None


def _line(e: Exception) -> str:
    return storage.redact(str(e)).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
