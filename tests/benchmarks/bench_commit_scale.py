"""A simulated 100 M-row retag, metadata only: K staged part records (100 M / rows_per_part), their listing
(`RunStaging.parts`, concurrent reads), the O(parts) exactly-once check, ONE `commit_run` with K add actions
into a `tags` table that already has a history, whether delta-rs wrote log checkpoints, and the time to
open the table afterwards. Prints numbers; asserts nothing; not collected by pytest.

    .venv/bin/python tests/benchmarks/bench_commit_scale.py [--parts 1000 5000] [--history 50] [--rows 100000000]

Data files are not written (the commit and the checks read none); each record names one as a real run would.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipelines import storage  # noqa: E402
from pipelines.retag import ids as ids_mod  # noqa: E402
from pipelines.retag import run as retag_run  # noqa: E402
from pipelines.retag.commit import commit_run  # noqa: E402
from pipelines.retag.staging import RunStaging, StagedPart  # noqa: E402
from pipelines.tables import open_table  # noqa: E402

STATS = json.dumps({"numRecords": 100_000, "minValues": {"image_id": "a"}, "maxValues": {"image_id": "z"}, "nullCount": {}})


def fake_part(run_id: str, seq: int, rows: int) -> StagedPart:
    fp = f"{ids_mod.HASH}:{random.getrandbits(64):016x}"
    return StagedPart(seq, f"run_date=2026-01-02/part-{run_id}-{seq:06d}.parquet", 40 << 20, int(time.time() * 1000),
                      STATS, rows, 0, None, 0, ids_count=rows, ids_fingerprint=fp)


def history(tags: str, commits: int) -> float:
    t0 = time.perf_counter()
    for k in range(commits):
        part = fake_part(f"old{k}", 1, 1000)
        commit_run(tags, f"old{k}", "2026-01-01", [part], {"run_id": f"old{k}"})
    return time.perf_counter() - t0


def one(parts_n: int, rows: int, commits: int, base: Path) -> dict:
    out = base / f"k{parts_n}"
    tags = str(out / "tags")
    history_s = history(tags, commits)
    staging = RunStaging(str(out), "big")
    per = rows // parts_n
    t0 = time.perf_counter()
    parts = [fake_part("big", k + 1, per) for k in range(parts_n)]
    for p in parts:
        storage.write_bytes(staging.path("parts", f"part-{p.seq:06d}.json"), json.dumps(asdict(p)).encode())
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    listed = staging.parts()
    list_s = time.perf_counter() - t0
    manifest = {"catalog_rows": per * parts_n, "catalog_fingerprint": ids_mod.combine(p.ids_fingerprint for p in parts)}
    run = SimpleNamespace(run_id="big", staging=staging, output=str(out))
    t0 = time.perf_counter()
    retag_run._check_exactly_once(run, manifest, listed, sum(p.rows for p in listed))
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    version = commit_run(tags, "big", "2026-01-02", listed, {"run_id": "big"})
    commit_s = time.perf_counter() - t0
    log = sorted(p.name for p in (Path(tags) / "_delta_log").iterdir())
    checkpoints = [n for n in log if "checkpoint" in n and n.endswith(".parquet")]
    t0 = time.perf_counter()
    table = open_table(tags)
    files = len(table.file_uris())
    open_s = time.perf_counter() - t0
    return {"parts": parts_n, "history_commits": commits, "history_s": history_s, "records_write_s": write_s,
            "list_s": list_s, "verify_s": verify_s, "commit_s": commit_s, "version": version,
            "commit_json_mb": (Path(tags) / "_delta_log" / f"{version:020d}.json").stat().st_size / 1e6,
            "checkpoints": checkpoints, "open_s": open_s, "files": files}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--history", type=int, default=50)
    ap.add_argument("--rows", type=int, default=100_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-commit-") as tmp:
        for k in args.parts:
            r = one(k, args.rows, args.history, Path(tmp))
            print(f"{r['parts']} parts ({args.rows // r['parts']} rows each) after {r['history_commits']} commits "
                  f"({r['history_s']:.1f}s): write records {r['records_write_s']:.2f}s, list {r['list_s']:.2f}s, "
                  f"verify {r['verify_s'] * 1000:.1f}ms, ONE commit {r['commit_s']:.2f}s (v{r['version']}, "
                  f"{r['commit_json_mb']:.1f} MB log entry), open after {r['open_s']:.2f}s ({r['files']} files); "
                  f"checkpoints: {r['checkpoints'] or 'none'}", flush=True)


if __name__ == "__main__":
    main()
