"""`mumic vacuum`: remove what no commit references, older than a grace period, under an output location.

Three kinds of leftovers:

- data files of the tables (`tags`, `runs`, `current`, `drift`, `duplicates`) that the latest version
  does not reference: files an earlier commit removed (tombstones older than the grace period) and files
  no commit ever added (untracked, last modified before the grace period): the parts of abandoned runs.
  The list is delta-rs's own (`DeltaTable.vacuum(dry_run=True, full=True)`: `full` is what includes
  untracked files); the files are deleted here, so that those of a run still being written are kept.
- the staging folders (`_staging/<run_id>/`) of abandoned runs: no live lease, newest file older than the
  grace period.
- search-index generations (`_index/<model>/<version>/`) that the folder's manifest no longer names, by the
  index store's own rule (`index.store.superseded`), older than the grace period and its hour, and only once
  the manifest itself is an hour old: a reader of the manifest it replaced may still use their files.

A run with a live lease is never touched: neither its staging nor its staged data files, and no untracked
file written since it acquired its lease. A run that is not committed and whose staging is recent
(resumable) keeps its data files. Before removing an uncommitted run's files, vacuum takes that run's
lease itself (kind `vacuum`), so a rerun cannot resume it at the same moment.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import storage
from ..index import store as index_store
from ..storage import files
from ..tables import open_table, retag_app_id
from .lease import LeaseHeld, LeaseInfo, RunLease, holder_is_gone, read_lease
from .staging import LEASE_FILE, RunStaging, staging_root

TABLES = ("tags", "runs", "current", "drift", "duplicates")
DEFAULT_GRACE_HOURS = 168  # delta's own default retention: a week
_PART = re.compile(r"(?:^|/)part-(?P<run_id>[A-Za-z0-9][A-Za-z0-9._-]*)-\d{6,}\.parquet$")


@dataclass
class StagedRun:
    run_id: str
    files: list[tuple[str, int, float]]  # (uri, size, mtime) of everything under its staging folder
    lease: LeaseInfo | None

    @property
    def newest(self) -> float:
        """When it was last written to (its lease aside: a lease is judged by its expiry)."""
        return max((m for uri, _, m in self.files if not uri.endswith("/" + LEASE_FILE)), default=0.0)

    @property
    def live(self) -> bool:
        return self.lease is not None and not self.lease.expired() and not holder_is_gone(self.lease)


@dataclass
class VacuumReport:
    output: str
    grace_hours: float
    dry_run: bool
    data_files: int = 0
    data_bytes: int = 0
    staging_runs: list[str] = field(default_factory=list)
    staging_files: int = 0
    staging_bytes: int = 0
    index_files: int = 0
    index_bytes: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # run id → why its files were kept

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _staged_runs(output: str) -> dict[str, StagedRun]:
    runs = {}
    for folder in files.list_dirs(staging_root(output)):
        run_id = folder.rstrip("/").rsplit("/", 1)[-1]
        staging = RunStaging(output, run_id)
        runs[run_id] = StagedRun(run_id, files.list_tree(staging.dir), read_lease(staging.lease_uri))
    return runs


def _unreferenced(table_uri: str, grace_hours: float) -> list[tuple[str, int, float]]:
    """(uri, size, mtime) of the table's files the latest version does not reference, past the grace."""
    table = open_table(table_uri)
    if table is None:  # no commit yet: every data file there is untracked (parts of abandoned runs)
        cutoff = time.time() - grace_hours * 3600
        return [f for f in files.list_tree(table_uri) if "/_delta_log/" not in f[0] and f[2] < cutoff]
    listed = table.vacuum(
        retention_hours=int(grace_hours), dry_run=True, enforce_retention_duration=False, full=True
    )
    sizes = {uri: (size, mtime) for uri, size, mtime in files.list_tree(table_uri)}
    out = []
    for rel in listed:
        uri = rel if "://" in rel or rel.startswith("/") else storage.join(table_uri, rel)
        size, mtime = sizes.get(storage.normalize(uri), (0, 0.0))
        out.append((storage.normalize(uri), size, mtime))
    return out


class _Remover:
    """Deletes (or, in a dry run, counts) files into the report."""

    def __init__(self, report: VacuumReport):
        self.report = report

    def data(self, found: list[tuple[str, int, float]]) -> None:
        for uri, size, _ in found:
            if not self.report.dry_run:
                files.delete_file(uri)
            self.report.data_files += 1
            self.report.data_bytes += size

    def index(self, found: list[tuple[str, int, float]]) -> None:
        for uri, size, _ in found:
            if not self.report.dry_run:
                files.delete_file(uri)
            self.report.index_files += 1
            self.report.index_bytes += size

    def staging(self, run: StagedRun) -> None:
        for uri, size, _ in run.files:
            if uri.rsplit("/", 1)[-1] == LEASE_FILE:
                continue  # the lease goes last, when it is released
            if not self.report.dry_run:
                files.delete_file(uri)
            self.report.staging_files += 1
            self.report.staging_bytes += size
        self.report.staging_runs.append(run.run_id)


def _is_committed(run_id: str, tags) -> bool:
    return tags is not None and tags.transaction_version(retag_app_id(run_id)) is not None


def _vacuum_run(
    output: str, run_id: str, data: list, staged: StagedRun | None, remove: _Remover, cutoff: float
) -> None:
    """An uncommitted run's files (and its abandoned staging), under its lease: no rerun resumes it
    meanwhile, and what changed since the listing is looked at again."""
    if remove.report.dry_run:
        remove.data(data)
        if staged is not None:
            remove.staging(staged)
        return
    staging = RunStaging(output, run_id)
    lease = RunLease(staging.lease_uri, run_id, kind="vacuum")
    try:
        lease.acquire(renew=False)
    except LeaseHeld as e:
        remove.report.kept[run_id] = f"live lease: {e.info.describe()}"
        return
    try:
        now = [f for f in files.list_tree(staging.dir) if not f[0].endswith("/" + LEASE_FILE)]
        tags = open_table(storage.join(output, "tags"))
        committed = _is_committed(run_id, tags)
        if not committed and now and max(m for _, _, m in now) >= cutoff:
            remove.report.kept[run_id] = "staged within the grace period (resumable)"  # a rerun came by
            return
        if committed:  # perhaps since the listing: keep what it references
            referenced = {storage.normalize(u) for u in tags.file_uris()}
            data = [d for d in data if d[0] not in referenced]
        remove.data(data)
        if staged is not None:
            remove.staging(StagedRun(run_id, now, None))
    finally:
        lease.release()
        files.remove_empty_dir(staging.dir)


def _unreferenced_by_run(output: str, grace_hours: float) -> tuple[dict[str, list], list]:
    """The tables' unreferenced files: those of `tags` named after a run (`part-<run_id>-<seq>`) by run
    id, and the others."""
    by_run: dict[str, list] = defaultdict(list)
    others: list[tuple[str, int, float]] = []
    for name in TABLES:
        for item in _unreferenced(storage.join(output, name), grace_hours):
            m = _PART.search(item[0]) if name == "tags" else None
            (by_run[m["run_id"]] if m else others).append(item)
    return by_run, others


def _superseded_index_files(output: str, grace_hours: float) -> list[tuple[str, int, float]]:
    """(uri, size, mtime) of the index generations no manifest names any more, past the grace period."""
    older_than = max(grace_hours * 3600, index_store.KEEP_SECONDS)
    settled = time.time() - index_store.KEEP_SECONDS
    found = []
    for model in index_store.indexed_models(output):
        folder, manifest = index_store.index_dir(output, model), index_store.read_manifest(output, model)
        published = [m for uri, _, m in files.list_tree(folder) if uri.endswith("/" + index_store.MANIFEST)]
        if manifest is None or not published or published[0] >= settled:
            continue  # just published: a reader of the manifest it replaced may still read the old files
        found += index_store.superseded(folder, manifest, older_than_s=older_than)
    return found


def vacuum_output(
    output: str,
    grace_hours: float = DEFAULT_GRACE_HOURS,
    dry_run: bool = False,
    say: Callable[[str], None] | None = None,
) -> VacuumReport:
    """Remove (or with `dry_run`, list) the unreferenced data files and abandoned staging under `output`."""
    output = storage.normalize(output)
    report = VacuumReport(output, grace_hours, dry_run)
    cutoff = time.time() - grace_hours * 3600
    staged = _staged_runs(output)
    by_run, others = _unreferenced_by_run(output, grace_hours)
    live_since = min(
        (dt.datetime.fromisoformat(r.lease.acquired_at).timestamp() for r in staged.values() if r.live),
        default=float("inf"),
    )
    remove = _Remover(report)
    remove.data([o for o in others if o[2] < live_since])  # none that a live run may have written
    remove.index(_superseded_index_files(output, grace_hours))
    tags = open_table(storage.join(output, "tags"))
    for run_id in sorted(set(by_run) | set(staged)):
        run, data = staged.get(run_id), by_run.get(run_id, [])
        if run is not None and run.live:
            report.kept[run_id] = f"live lease: {run.lease.describe()}"  # type: ignore[union-attr]
            continue
        committed, recent = _is_committed(run_id, tags), run is not None and run.newest >= cutoff
        if recent and not committed:
            report.kept[run_id] = "staged within the grace period (resumable)"
        elif committed and run is None:
            remove.data(data)  # files an earlier commit removed: a committed run id is never written again
        elif data or not recent:
            _vacuum_run(output, run_id, data, None if recent else run, remove, cutoff)
    if say is not None:
        say(format_report(report))
    return report


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def format_report(report: VacuumReport) -> str:
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"{verb} {report.data_files} data file(s) ({_mb(report.data_bytes)}) that no commit references, "
        f"older than {report.grace_hours:g} h",
        f"{verb} the staging of {len(report.staging_runs)} abandoned run(s) ({report.staging_files} file(s), "
        f"{_mb(report.staging_bytes)})" + (f": {', '.join(report.staging_runs)}" if report.staging_runs else ""),
        f"{verb} {report.index_files} file(s) of search-index generations no manifest names "
        f"({_mb(report.index_bytes)})",
    ]
    lines += [f"kept run {run_id}: {why}" for run_id, why in sorted(report.kept.items())]
    return "\n".join(lines)
