"""A newcomer's path, end to end, as the README gives it: `mumic quickstart` (no services, no network),
then `mumic search` for a generated label, then the documented DuckDB query on the output tables.

The newcomer's shell holds cloud credentials (fake ones here): none of them may appear in what the
quickstart prints, its report or any file of its workdir (the MLflow store and artifacts included).
tests/registry/test_no_secrets.py checks the other commands against a password-carrying tracking URI."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

CREDENTIALS = {  # what a newcomer's shell may hold: fake values, none of which may leave
    "AWS_ACCESS_KEY_ID": "AKIAQUICKSTARTFAKE01",
    "AWS_SECRET_ACCESS_KEY": "quickstart-fake-secret-never-logged",
    "AWS_SESSION_TOKEN": "QUICKSTART-FAKE-SESSION-TOKEN",
    "MLFLOW_TRACKING_TOKEN": "QUICKSTART-FAKE-MLFLOW-TOKEN",
}


def _leaks(data: bytes) -> list[str]:
    return [k for k, v in CREDENTIALS.items() if v.encode() in data]


def mumic_exe() -> str:
    exe = Path(sys.executable).parent / "mumic"
    return str(exe) if exe.exists() else shutil.which("mumic")


@pytest.mark.slow
def test_newcomer_path_quickstart_then_search_then_duckdb(tmp_path):
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(CREDENTIALS)
    r = subprocess.run(
        [mumic_exe(), "quickstart", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (workdir / "report.html").stat().st_size > 10_000
    assert "report" in r.stdout and "Try next" in r.stdout
    html = (workdir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2  # charts and the contact sheet are embedded
    assert _leaks((r.stdout + r.stderr).encode()) == []
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "MLmodel" for p in files)
    assert [p for p in files if _leaks(p.read_bytes()) or _leaks(str(p).encode())] == []

    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    ann = pq.read_table(workdir / "data" / "annotations.parquet").to_pylist()
    labels_of = {row["image_id"]: set(row["labels"]) for row in ann}
    searches = {  # both at once (as two users might): each is mostly one thread, and there are 2 cores
        label: subprocess.Popen(
            [mumic_exe(), "search", "--output", str(workdir / "output"), "--model",
             "models:/mumic-quickstart@champion", "--text", label, "--k", "20", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for label in ("red", "striped object")
    }
    for label, proc in searches.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        hits = [json.loads(line) for line in stdout.splitlines()]
        assert len(hits) == 20
        precision = sum(label in labels_of[h["image_id"]] for h in hits) / len(hits)
        print(f"search {label!r}: precision@20 = {precision:.2f}")
        assert precision >= 0.7

    # the DuckDB query the quickstart prints, run as printed, returns the run's row count
    lines = [ln.strip() for ln in r.stdout.splitlines()]
    start = lines.index("python - <<'EOF'")
    snippet = "\n".join(lines[start + 1 : lines.index("EOF", start)])
    q = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120, env=env)
    assert q.returncode == 0, q.stderr
    [(run_id, rows)] = ast.literal_eval(q.stdout.strip())  # the snippet prints [(run_id, rows)]
    assert rows == len(ann)
    print(f"DuckDB: run {run_id} has {rows} rows")
