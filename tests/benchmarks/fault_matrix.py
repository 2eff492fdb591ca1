"""The fault matrix at a somewhat larger size: each fault once, one table row each. Prints; asserts nothing;
not collected by pytest (the assertions are tests/retag/test_faults.py and tests/train/test_train_failures.py).

    .venv/bin/python tests/benchmarks/fault_matrix.py [--images 300] [--only 1,2,3a,3b,3c,6] [--out FILE]

Everything is real and local: a moto S3 server on loopback in this process, the fault-injecting proxy
(tests/faults.py) in front of it, and every retag / train as its own process with its own local Ray
cluster (the nightly job's setup), whose every process reads AWS_ENDPOINT_URL = the proxy. Scenarios:

  1   the Predictor actor's process SIGKILLed once the first part is staged (Ray Data restarts it)
  2   the driver (`mumic retag`) SIGKILLed once the first part is staged, then rerun with the same --run-id
  3a  10 % of the image GETs faulted (a third each: 503 SlowDown, connection reset, 0.2 s delay), seeded
  3b  30 % of the image GETs faulted, likewise
  3c  10 % of every request faulted (lease, catalog, staging, Delta log, images); failed attempts rerun
  6   a Ray Train worker killed with max_failures=0: TrainError, MLflow run FAILED, registry unchanged

For each retag: rows in the catalog, rows committed (the run's `tags` rows + rows_skipped), rows lost,
rows twice, retries (failed GETs retried, actor restarts) or rows resumed, wall time and exit statuses.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIMEOUT_S = 600
IMAGE_KEYS = "catalog/imgs/"
FAILING = ("SlowDown", "reset")

# The driver of scenario 1: it starts (and keeps) its own local Ray, kills its own Predictor actor at the
# first staged part, and prints the run summary and the actor's record after the run as JSON.
ACTOR_KILL_DRIVER = r"""
import datetime as dt, json, os, signal, sys
cfg = json.loads(sys.argv[1])
import ray
from pipelines.cluster import ensure_ray
from pipelines.retag import run_retag
ensure_ray()  # started here, so it outlives run_retag and the actor's record can be read afterwards
killed = {}
def on_event(name, info):
    if name != "staged" or killed:
        return
    (actor,) = [a for a in ray._private.state.actors().values()
                if "Predictor" in a["ActorClassName"] and a["State"] == "ALIVE"]
    killed.update(actor_id=actor["ActorID"], pid=actor["Pid"], at=dt.datetime.now(dt.UTC).isoformat())
    os.kill(actor["Pid"], signal.SIGKILL)
summary = run_retag(cfg["catalog"], cfg["model"], cfg["output"], on_event=on_event, **cfg["options"])
after = ray._private.state.actors(killed["actor_id"])
print(json.dumps({"summary": summary, "killed": killed, "restarts": after["NumRestarts"], "new_pid": after["Pid"]},
                 default=str))
ray.shutdown()
"""

# The driver of scenario 6: a registry with version 1 (aliases champion and candidate), then a training
# run whose rank 1 dies with max_failures=0; prints what raised and the registry and MLflow run after.
TRAIN_DRIVER = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
from pipelines.registry import log_model_version, tracking
from pipelines.train import TrainConfig, TrainError, train
uri, name = cfg["train"]["tracking_uri"], cfg["train"]["register"]
client = tracking.client(uri)
exp = tracking.ensure_experiment(client, "earlier", tracking.default_artifact_location(uri))
run_id, _ = tracking.start_run(client, exp, "earlier")
v1 = log_model_version(cfg["model"], name, run_id, tracking_uri=uri, alias="champion")
client.set_registered_model_alias(name, "candidate", v1)
def registry():
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    return {"versions": versions, "aliases": {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}}
before = registry()
t0 = time.monotonic()
try:
    train(TrainConfig(**cfg["train"]))
    raised = {"raised": None}
except TrainError as e:
    raised = {"raised": "TrainError", "message": str(e)}
seconds = time.monotonic() - t0
exp_id = client.get_experiment_by_name(cfg["train"]["experiment"]).experiment_id
(run,) = client.search_runs([exp_id], filter_string=f"tags.`mlflow.runName` = '{cfg['train']['run_name']}'")
print(json.dumps({**raised, "train_seconds": seconds, "status": run.info.status, "before": before, "after": registry()}))
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    """A process of its own with its own local Ray: no RAY_ADDRESS."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "retag", *args, "--json", "--no-progress"]


def _json_out(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def _error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    mine = [ln for ln in lines if ln.startswith("mumic: error:")]
    if mine:
        return mine[-1]
    return _uncaught(lines)


def _uncaught(lines: list[str]) -> str:
    """The exception line of a traceback and, for a delta-rs / object_store error, the request it names."""
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", ln).replace("↳", "").strip() for ln in lines]
    raised = [ln for ln in plain if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    text = "uncaught " + (raised[-1] if raised else plain[-1] if plain else "(no output)")[:300]
    for i, ln in enumerate(plain):
        if request := re.search(r"Error performing (\w+) \S+?//[^/]+/[^/]+/(\S+)", ln):
            causes = [plain[j] for j in range(i + 1, len(plain)) if "↳" in lines[j]]  # the chain under it
            text += f" ({request.group(1)} {request.group(2)}: {causes[-1] if causes else '?'})"
    return text


def fault_rules(share: float, method: str | None = "GET", key: str | None = IMAGE_KEYS):
    """`share` of the matching requests faulted: a third each SlowDown, reset and a 0.2 s delay."""
    from faults import Rule

    each, left, rules = share / 3, 1.0, []
    for fault in ("SlowDown", "reset", "delay"):
        rules.append(Rule(fault, method=method, key=key, fraction=each / left, delay_s=0.2 if fault == "delay" else 0))
        left -= each
    return rules


def check(output: str, run_id: str, ids: list[str]) -> dict:
    """Rows committed / lost / twice, from the committed tags, runs and current tables."""
    import pyarrow.compute as pc

    from pipelines import tables

    tags = tables.open_table(f"{output}/tags").to_pyarrow_table(columns=["image_id", "run_id", "error"])
    tags = tags.filter(pc.equal(tags.column("run_id"), run_id))
    got = tags.column("image_id").to_pylist()
    (run,) = [r for r in tables.open_table(f"{output}/runs").to_pyarrow_table().to_pylist() if r["run_id"] == run_id]
    current = tables.open_table(f"{output}/current").to_pyarrow_table(columns=["image_id"]).column(0).to_pylist()
    errors = Counter(str(e).split(":", 1)[0] for e in tags.column("error").to_pylist() if e is not None)
    return {
        "committed": len(got) + run["rows_skipped"],
        "lost": len(set(ids) - set(got)) - run["rows_skipped"],
        "duplicates": len(got) - len(set(got)),
        "current_ok": sorted(current) == sorted(ids),
        "errors": dict(errors),
    }


class Matrix:
    def __init__(self, n: int, work: Path):
        self.n, self.work, self.rows = n, work, []

    def setup(self) -> None:
        import boto3
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        from faults import FaultProxy
        from moto.server import ThreadedMotoServer

        from mumic_core import checkpoint, synthetic
        from mumic_core.model import MuMIC

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
        port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.moto.start()
        self.moto_endpoint = f"http://127.0.0.1:{port}"
        self.proxy = FaultProxy(self.moto_endpoint).start()
        os.environ.update({
            "AWS_ENDPOINT_URL": self.proxy.endpoint,  # every process started from here on goes through it
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        })
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        torch.manual_seed(0)
        self.model = self.work / "tiny"
        checkpoint.save(MuMIC.create(synthetic.taxonomy(), backbone="mumic-tiny"), self.model)
        local = self.work / "catalog"
        rows = synthetic.write_dataset(local, self.n, seed=81, size=64)
        self.ids = [r["image_id"] for r in rows]
        self.catalog = local / "catalog.parquet"
        pq.write_table(pa.Table.from_pylist([{"image_id": r["image_id"], "uri": r["uri"]} for r in rows]), self.catalog)
        client = boto3.client("s3", endpoint_url=self.moto_endpoint)  # straight to moto, no faults
        self.bucket = f"matrix-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=self.bucket)
        for r in rows:
            client.upload_file(str(local / r["uri"]), self.bucket, f"{IMAGE_KEYS}{r['image_id']}.jpg")
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{"image_id": i, "uri": f"imgs/{i}.jpg"} for i in self.ids]), buf)
        client.put_object(Bucket=self.bucket, Key="catalog/catalog.parquet", Body=buf.getvalue())
        self.s3_catalog = f"s3://{self.bucket}/catalog/catalog.parquet"

    def close(self) -> None:
        self.proxy.stop()
        self.moto.stop()

    def add(self, fault: str, committed: dict | None, retries: str, wall: float, status: str, rows: int | None = None):
        c = committed or {}
        self.rows.append({
            "fault": fault,
            "catalog": self.n if rows is None else rows,
            "committed": c.get("committed", "-"),
            "lost": c.get("lost", "-"),
            "duplicates": c.get("duplicates", "-"),
            "retries": retries,
            "wall": f"{wall:.1f} s",
            "status": status,
        })
        print(" | ".join(str(v) for v in self.rows[-1].values()), flush=True)

    # ---- the scenarios ----------------------------------------------------------------------------------

    def actor_kill(self) -> None:
        output, run_id = str(self.work / "out-1"), "m-actor"
        cfg = {"catalog": str(self.catalog), "model": str(self.model), "output": output,
               "options": {"run_id": run_id, "progress": False, "concurrency": 1, "batch_size": 8, "rows_per_part": 16}}
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-c", ACTOR_KILL_DRIVER, json.dumps(cfg)], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        wall = time.monotonic() - t0
        if done.returncode:
            self.add("1 inference actor SIGKILLed mid-run", None, "-", wall, f"{done.returncode}: {_error_line(done.stderr)}")
            return
        out = _json_out(done.stdout)
        c = check(output, run_id, self.ids)
        from pipelines import tables

        at = dt.datetime.fromisoformat(out["killed"]["at"])
        ts = tables.open_table(f"{output}/tags").to_pyarrow_table(columns=["processed_at"]).column(0)
        late = sum(1 for t in ts.to_pylist() if t > at)
        self.add("1 inference actor SIGKILLed mid-run", c,
                 f"actor restarted {out['restarts']}x; {late} rows inferred after the kill; resumed {out['summary']['rows_resumed']}",
                 wall, "0 (one attempt)")

    def driver_kill(self) -> None:
        from pipelines.retag.staging import RunStaging

        output, run_id = str(self.work / "out-2"), "m-driver"
        args = _cli("--catalog", str(self.catalog), "--model", str(self.model), "--output", output, "--run-id", run_id,
                    "--batch-size", "8", "--rows-per-part", "16", "--concurrency", "1")
        parts = Path(RunStaging(output, run_id).path("parts"))
        t0 = time.monotonic()
        driver = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT_S
        while not (parts.exists() and any(parts.glob("*.json"))) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
        driver.communicate(timeout=60)
        first = driver.returncode
        rerun = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        wall = time.monotonic() - t0
        if rerun.returncode:
            self.add("2 driver SIGKILLed mid-run, rerun", None, "-", wall, f"{first}, then {rerun.returncode}: {_error_line(rerun.stderr)}")
            return
        s = _json_out(rerun.stdout)
        reaped = [ln for ln in rerun.stderr.splitlines() if "orphaned Ray agent" in ln]
        self.add("2 driver SIGKILLed mid-run, rerun same --run-id", check(output, run_id, self.ids),
                 f"resumed {s['rows_resumed']} rows, processed {s['rows_processed']}"
                 + (f"; rerun reaped {reaped[0].split('reaped ')[1].split(' orphaned')[0]} orphaned Ray agents" if reaped else ""),
                 wall, f"{first} (SIGKILL), then {rerun.returncode}")

    def flaky(self, label: str, share: float, everything: bool, seed: int) -> None:
        output, run_id = f"s3://{self.bucket}/out-{label}", f"m-flaky-{label}"
        args = _cli("--catalog", self.s3_catalog, "--model", str(self.model), "--output", output, "--run-id", run_id,
                    "--batch-size", "16")
        self.proxy.clear()
        rules = fault_rules(share, None, None) if everything else fault_rules(share)
        statuses, errors = [], []
        t0 = time.monotonic()
        for attempt in range(5):
            self.proxy.set_rules(rules, seed=seed + attempt)
            done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
            statuses.append(str(done.returncode))
            if done.returncode == 0 or not everything:
                break
            errors.append(_error_line(done.stderr))
        wall = time.monotonic() - t0
        faults = Counter(f for m, k, f in self.proxy.faults if everything or (m == "GET" and k.startswith(IMAGE_KEYS)))
        image_failed = sum(1 for m, k, f in self.proxy.faults if m == "GET" and k.startswith(IMAGE_KEYS) and f in FAILING)
        self.proxy.set_rules([])
        what = (f"{share:.0%} of every request" if everything else f"{share:.0%} of image GETs") + " 503/reset/slow"
        if done.returncode:
            self.add(f"3 {what}", None, f"faults {dict(faults)}", wall, ", ".join(statuses) + f": {_error_line(done.stderr)}")
            return
        c = check(output, run_id, self.ids)
        s = _json_out(done.stdout)
        retries = f"{image_failed} failed image GETs retried; faults {dict(faults)}; error rows {s['rows_error']} {c['errors'] or ''}"
        if errors:
            retries += "; failed attempts: " + " / ".join(errors)
        self.add(f"3 {what}", c, retries, wall, ", ".join(statuses))

    def train_kill(self) -> None:
        import pandas as pd

        from mumic_core import synthetic

        data = self.work / "train"
        n_train, n_val, n_test = 240, 40, 40
        rows = synthetic.write_dataset(data, n_train + n_val + n_test, seed=82, size=64)
        for i, row in enumerate(rows):
            row["split"] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        pd.DataFrame(rows).to_parquet(data / "annotations.parquet")
        (data / "taxonomy.json").write_text(json.dumps(synthetic.taxonomy().to_dict()))
        cfg = {"model": str(self.model), "train": {
            "annotations": str(data / "annotations.parquet"), "taxonomy": str(data / "taxonomy.json"),
            "backbone": "mumic-tiny", "train_mode": "image", "workers": 2, "max_failures": 0, "epochs": 3,
            "batch_size": 8, "workdir": str(self.work / "train-work"), "tracking_uri": f"sqlite:///{self.work}/mlflow.db",
            "storage_path": str(self.work / "ray_results"), "experiment": "fault-matrix", "run_name": "killed-rank",
            "register": "matrix-model", "fault": {"rank": 1, "epoch": 1, "marker": str(self.work / "fault.marker")},
        }}
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-c", TRAIN_DRIVER, json.dumps(cfg)], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        wall = time.monotonic() - t0
        if done.returncode:
            self.add("6 train worker killed, max_failures=0", None, "-", wall, f"{done.returncode}: {_error_line(done.stderr)}",
                     rows=len(rows))
            return
        out = _json_out(done.stdout)
        same = out["before"] == out["after"]
        self.add("6 train worker killed, max_failures=0", None,
                 f"{out['raised']} ({len(out.get('message', '').splitlines())} line): {out.get('message', '')[:160]}; "
                 f"MLflow run {out['status']}; registry {'unchanged' if same else 'CHANGED'} "
                 f"(versions {out['after']['versions']}, aliases {out['after']['aliases']})",
                 wall, "TrainError raised", rows=len(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--only", default="1,2,3a,3b,3c,6")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="mumic-fault-matrix-") as tmp:
        m = Matrix(args.images, Path(tmp))
        m.setup()
        started = time.monotonic()
        load0 = os.getloadavg()[0]
        try:
            if "1" in only:
                m.actor_kill()
            if "2" in only:
                m.driver_kill()
            if "3a" in only:
                m.flaky("10", 0.10, everything=False, seed=7)
            if "3b" in only:
                m.flaky("30", 0.30, everything=False, seed=8)
            if "3c" in only:
                m.flaky("all10", 0.10, everything=True, seed=11)
            if "6" in only:
                m.train_kill()
        finally:
            m.close()
        head = ("fault", "rows in catalog", "rows committed", "lost", "duplicates", "retries / resumed rows",
                "wall time", "exit status")
        lines = [
            f"`tests/benchmarks/fault_matrix.py --images {args.images}` on {platform.machine()}, {os.cpu_count()} cores, "
            f"no GPU; moto S3 on loopback behind tests/faults.py; load average {load0:.1f} → {os.getloadavg()[0]:.1f}; "
            f"{time.monotonic() - started:.0f} s in all.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *("| " + " | ".join(str(v) for v in row.values()) + " |" for row in m.rows),
        ]
        print("\n" + "\n".join(lines))
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
