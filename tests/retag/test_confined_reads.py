"""Reads stay where the job was pointed: a catalog row, a `mumic tag` argument or a pyfunc request can
name any path, but only regular files inside the allowed folders are read (`forbidden` otherwise, with no
byte read and no hash stored), and every read is bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mumic_core import synthetic
from pipelines import storage, tables
from pipelines.registry import pyfunc
from pipelines.retag import run_retag


def write_catalog(folder: Path, rows: list[tuple[str, str]]) -> str:
    pq.write_table(pa.table({"image_id": [i for i, _ in rows], "uri": [u for _, u in rows]}), folder / "c.parquet")
    return str(folder / "c.parquet")


def test_read_object_refuses_paths_outside_the_roots_and_anything_but_a_regular_file(tmp_path):
    inside = tmp_path / "in"
    inside.mkdir()
    (inside / "a.jpg").write_bytes(b"abc")
    (inside / "link.jpg").symlink_to("/etc/hostname")
    os.mkfifo(inside / "fifo.jpg")
    roots = storage.confine([str(inside)])
    assert storage.read_object(str(inside / "a.jpg"), roots=roots) == b"abc"
    for path, why in (
        ("/etc/passwd", "outside"),
        (str(inside / "link.jpg"), "outside"),  # a link inside that points out
        (str(inside / ".." / "in" / ".." / "x.jpg"), "outside"),
        (str(inside / "fifo.jpg"), "not a regular file"),  # would block forever if opened for reading
    ):
        with pytest.raises(storage.ReadFailed, match=why) as e:
            storage.read_object(path, roots=roots)
        assert e.value.reason == "forbidden"
    with pytest.raises(storage.ReadFailed, match="not a regular file"):
        storage.read_object("/dev/zero", roots=storage.confine(["/dev"]))  # never read without limit


def test_a_catalog_cannot_read_files_outside_its_folder_and_dev_zero_cannot_take_the_night_down(
    tiny_model_dir, ray_cluster, tmp_path
):
    rows = synthetic.write_dataset(tmp_path, 3, seed=41)
    catalog = write_catalog(
        tmp_path,
        [(r["image_id"], r["uri"]) for r in rows]
        + [("passwd", "/etc/passwd"), ("zero", "file:///dev/zero"), ("up", "../../etc/hostname")],
    )
    t0 = time.perf_counter()
    s = run_retag(catalog, str(tiny_model_dir), str(tmp_path / "out"), run_id="r", progress=False)
    assert time.perf_counter() - t0 < 120  # finishes: nothing was read without bound
    assert (s["rows_ok"], s["rows_error"]) == (3, 3)
    data = tables.open_table(str(tmp_path / "out" / "tags")).to_pyarrow_table().to_pylist()
    bad = {r["image_id"]: r for r in data if r["status"] == "error"}
    assert set(bad) == {"passwd", "zero", "up"}
    for row in bad.values():
        assert row["error"].startswith("forbidden: ") and row["content_sha256"] is None
        assert "root:" not in row["error"]  # no byte of the file in the error


def test_allow_root_lets_a_catalog_read_a_second_folder(tiny_model_dir, ray_cluster, tmp_path):
    images, cat = tmp_path / "images-elsewhere", tmp_path / "catalog"
    cat.mkdir()
    rows = synthetic.write_dataset(images, 2, seed=42)
    catalog = write_catalog(cat, [(r["image_id"], str(images / r["uri"])) for r in rows])
    refused = run_retag(catalog, str(tiny_model_dir), str(tmp_path / "o1"), progress=False, max_error_rate=1.0)
    assert refused["rows_error"] == 2
    allowed = run_retag(catalog, str(tiny_model_dir), str(tmp_path / "o2"), progress=False, allow_root=[str(images)])
    assert allowed["rows_ok"] == 2


def test_mumic_tag_refuses_dev_zero_in_one_line_and_fast(tiny_model_dir):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "tag", "/dev/zero", "--model", str(tiny_model_dir)],
                       capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert r.returncode == 1 and "/dev/zero: error: forbidden: " in r.stderr and "Traceback" not in r.stderr


def test_the_pyfunc_reads_local_paths_only_inside_the_allowed_roots(tiny_model_dir, tmp_path, monkeypatch):
    rows = synthetic.write_dataset(tmp_path, 1, seed=43)
    image = str(tmp_path / rows[0]["uri"])
    model = pyfunc.MumicPyfunc()
    model.load_context(type("Context", (), {"artifacts": {pyfunc.MODEL_DIR_KEY: str(tiny_model_dir)}})())
    monkeypatch.delenv(pyfunc.ROOTS_ENV, raising=False)
    frame = model.predict(None, pd.DataFrame({"uri": [image, "/etc/passwd"]}))
    assert all(e.startswith("forbidden: ") for e in frame["error"])
    monkeypatch.setenv(pyfunc.ROOTS_ENV, str(tmp_path))
    frame = model.predict(None, pd.DataFrame({"uri": [image, "/etc/passwd"]}))
    assert pd.isna(frame["error"][0]) and frame["error"][1].startswith("forbidden: ")
