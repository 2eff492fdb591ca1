"""Which ways of reading the output tables let a process exit cleanly. Prints counts; asserts nothing; not
collected by pytest.

    .venv/bin/python tests/benchmarks/probe_exit_codes.py [--output OUT --model DIR] [--runs 10] [--only S ...] [--skip S ...] [--s3]

Each read path runs as its own `python -c` process `--runs` times (2 at a time) against a real output (two
retag runs of generated images, made here unless `--output` names one), and its exit codes are counted:
with pyarrow 25.0.1 + deltalake 1.6.6 some reads print the right answer, then abort at interpreter exit
(exit 134, "terminate called without an active exception"). Also runs `mumic runs` and `mumic search`.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

# Each snippet reads OUT (the output folder) and prints one number that the probe checks across runs.
_RUNS = 'from deltalake import DeltaTable\nruns = DeltaTable(f"{OUT}/runs")\n'
_TAGS = 'from deltalake import DeltaTable\ntags = DeltaTable(f"{OUT}/tags")\n'
_NATIVE = (
    "import pyarrow.fs as pa_fs\n"
    "def native(uri):  # a pyarrow filesystem rooted at the table: no Python callbacks from Arrow's threads\n"
    "    fs, path = pa_fs.FileSystem.from_uri(uri)\n"
    "    return pa_fs.SubTreeFileSystem(path, fs)\n"
)
PATHS = {
    "control: DeltaTable(runs).version()": _RUNS + "print(runs.version())",
    "DeltaTable(runs).to_pyarrow_table()": _RUNS + "print(runs.to_pyarrow_table().num_rows)",
    "DeltaTable(tags).to_pyarrow_table()": _TAGS + "print(tags.to_pyarrow_table().num_rows)",
    "DeltaTable(runs).to_pyarrow_dataset().to_table()": _RUNS
    + "print(runs.to_pyarrow_dataset().to_table().num_rows)",
    "DeltaTable(runs).to_pandas()": _RUNS + "print(len(runs.to_pandas()))",
    "to_pyarrow_table(), then del + gc.collect()": _RUNS
    + "import gc\nt = runs.to_pyarrow_table()\nprint(t.num_rows)\ndel t, runs\ngc.collect()",
    "to_pyarrow_dataset(filesystem=native).to_table()": _RUNS
    + _NATIVE
    + 'print(runs.to_pyarrow_dataset(filesystem=native(f"{OUT}/runs")).to_table().num_rows)',
    "pyarrow.dataset(file_uris()).to_table()": _TAGS
    + "import pyarrow.dataset as ds\n"
    + 'print(ds.dataset(tags.file_uris(), format="parquet", partitioning="hive").to_table().num_rows)',
    "QueryBuilder().register(tags).execute(sql)": _TAGS
    + "from deltalake import QueryBuilder\n"
    + 'r = QueryBuilder().register("tags", tags).execute("SELECT count(*) AS n FROM tags").read_all()\n'
    + 'print(r["n"][0].as_py())',
    "QueryBuilder -> pyarrow.table(...)": _RUNS
    + "import pyarrow as pa\nfrom deltalake import QueryBuilder\n"
    + 'print(pa.table(QueryBuilder().register("runs", runs).execute("SELECT * FROM runs")).num_rows)',
    "polars.read_delta(runs)": 'import polars as pl\nprint(pl.read_delta(f"{OUT}/runs").height)',
    "polars.scan_delta(tags).filter().collect()": "import polars as pl\n"
    + 'print(pl.scan_delta(f"{OUT}/tags").filter(pl.col("status") == "ok").select(pl.len()).collect().item())',
    "duckdb over to_pyarrow_dataset()": _TAGS
    + "import duckdb\nds = tags.to_pyarrow_dataset()\n"
    + 'print(duckdb.sql("SELECT count(*) FROM ds").fetchall()[0][0])',
    "duckdb over to_pyarrow_dataset(filesystem=native)": _TAGS
    + _NATIVE
    + 'import duckdb\nds = tags.to_pyarrow_dataset(filesystem=native(f"{OUT}/tags"))\n'
    + 'print(duckdb.sql("SELECT count(*) FROM ds").fetchall()[0][0])',
    "duckdb over polars.scan_delta()": "import duckdb, polars as pl\n"
    + 'tags = pl.scan_delta(f"{OUT}/tags")\n'
    + "print(duckdb.sql(\"SELECT count(*) FROM tags WHERE status = 'ok'\").fetchall()[0][0])",
    "search's read: to_pyarrow_dataset().to_batches(filter)": _TAGS
    + "import pyarrow.dataset as pds\n"
    + 'print(sum(b.num_rows for b in tags.to_pyarrow_dataset().to_batches(columns=["embedding"], '
    + 'filter=pds.field("status") == "ok")))',
    "duckdb read_parquet(file_uris())": _TAGS
    + "import duckdb\n"
    + 'print(duckdb.read_parquet(tags.file_uris(), hive_partitioning=True).aggregate("count(*)").fetchall()[0][0])',
}


def cli_paths(output: str, model: str) -> dict[str, list[str]]:
    mumic = str(Path(sys.executable).with_name("mumic"))
    return {
        "mumic runs --output OUT": [mumic, "runs", "--output", output],
        "mumic search --output OUT ...": [
            mumic,
            "search",
            "--output",
            output,
            "--model",
            model,
            "--text",
            "red",
            "--json",
        ],
    }


def make_output(root: Path) -> tuple[str, str]:
    """Two retag runs, like tests/tables/test_docs_queries.py's: 16 images, then 6 of them + 5 new + a missing one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from mumic_core import checkpoint, synthetic
    from mumic_core.model import MuMIC
    from pipelines.retag import run_retag

    def catalog(name: str, rows: list[dict]) -> str:
        pq.write_table(pa.table({k: [r[k] for r in rows] for k in ("image_id", "uri")}), root / name)
        return str(root / name)

    torch.manual_seed(0)
    checkpoint.save(MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny"), root / "model")
    first, new = synthetic.write_dataset(root, 16, seed=11), synthetic.write_dataset(root, 5, seed=12)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        out = str(root / "out")
        run_retag(catalog("a.parquet", first), str(root / "model"), out, run_id="run-a", progress=False)
        missing = {"image_id": "missing-1", "uri": "images/missing-1.jpg"}
        run_retag(
            catalog("b.parquet", first[:6] + new + [missing]),
            str(root / "model"),
            out,
            run_id="run-b",
            progress=False,
        )
    finally:
        ray.shutdown()
    return out, str(root / "model")


def serve_on_s3(output: str) -> tuple[str, object]:
    """A copy of `output` on a local S3 server (moto); AWS_* env points this process and its children at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ALLOW_HTTP="true",
    )
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="mumic-tags")
    for path in Path(output).rglob("*"):
        key = path.relative_to(output).as_posix()
        if path.is_file() and not key.startswith("_staging"):
            s3.upload_file(str(path), "mumic-tags", key)
    return "s3://mumic-tags", server


def run_once(argv: list[str]) -> tuple[int, str, str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return p.returncode, p.stdout.strip(), p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""


def probe(name: str, argv: list[str], runs: int, pool: ThreadPoolExecutor) -> str:
    t0 = time.perf_counter()
    results = list(pool.map(run_once, [argv] * runs))
    codes = collections.Counter(rc for rc, _, _ in results)
    answers = {out for rc, out, _ in results if rc in (0, 134)} if not name.startswith("mumic") else set()
    aborted = [err for rc, _, err in results if rc != 0]
    line = f"| {name} | {codes.get(0, 0)}/{runs} | {', '.join(f'{rc}: {n}' for rc, n in sorted(codes.items()) if rc)} |"
    line += f" {' '.join(sorted(answers))[:30]} | {(time.perf_counter() - t0) / runs:.1f} s |"
    if aborted:
        line += f" {aborted[0][:70]}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", help="an output folder (default: made here by two retag runs)")
    ap.add_argument("--model", help="the model folder that tagged --output (for `mumic search`)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--only", nargs="*", help="substrings of the read paths to run")
    ap.add_argument("--skip", nargs="*", default=[], help="substrings of the read paths not to run")
    ap.add_argument("--s3", action="store_true", help="read a copy of the output from a local S3 server")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="probe-exit-")
    output, model = (args.output, args.model) if args.output else make_output(Path(tmp.name))
    model = model or str(Path(output).parent / "model")
    if args.s3:
        output, _server = serve_on_s3(output)
    import deltalake
    import pyarrow

    print(
        f"pyarrow {pyarrow.__version__}, deltalake {deltalake.__version__}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, {args.runs} runs each, 2 at a time, reading {output}"
    )
    print("| read path | exit 0 | other exits | answers | s/run | last stderr line of a failure |")
    print("|---|---|---|---|---|---|")
    todo = {n: [sys.executable, "-c", f"OUT = {output!r}\n{code}"] for n, code in PATHS.items()}
    todo |= cli_paths(output, model)
    with ThreadPoolExecutor(2) as pool:
        for name, argv in todo.items():
            if (not args.only or any(s in name for s in args.only)) and not any(s in name for s in args.skip):
                print(probe(name, argv, args.runs, pool), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
