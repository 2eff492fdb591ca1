"""Hostile catalog manifests: each is one CatalogError line naming the file (and the data row when known),
from the library and through `mumic retag`; never a pyarrow traceback. Every input is generated here."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.retag import catalog

ROOT = Path(__file__).resolve().parents[2]


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


HEADER = b"image_id,uri\n"

# name → (file name, bytes, message pattern); the file's path is checked separately
HOSTILE = {
    "latin-1 id": (
        "c.csv",
        HEADER + b"ok,a.jpg\ncaf\xe9,b.jpg\n",
        r"data row 2 has an image_id that is not UTF-8 text \(byte 0xe9\); save the catalog as UTF-8",
    ),
    "latin-1 uri": ("c.csv", HEADER + b"a,caf\xe9.jpg\n", r"data row 1 has a uri that is not UTF-8 text"),
    "latin-1 header": (
        "c.csv",
        b"caf\xe9,uri\na,a.jpg\n",
        r"is not a readable CSV file: its header line is not UTF-8 text",
    ),
    "10 MB field": (
        "c.csv",
        HEADER + b"a,a.jpg\nb," + b"x" * (10 << 20) + b"\n",
        r"data row 2 has a uri of 10485760 characters \(at most 8192\)",
    ),
    "20 MB line": (
        "c.csv",
        HEADER + b"a," + b"y" * (20 << 20) + b"\n",
        r"is not a readable CSV file: a line longer than 8 MiB",
    ),
    "csv missing uri": (
        "c.csv",
        b"image_id,path\na,a.jpg\n",
        r"has no column\(s\) uri \(it has: image_id, path\)",
    ),
    "parquet missing uri": (
        "c.parquet",
        parquet_bytes(pa.table({"image_id": ["a"], "path": ["a.jpg"]})),
        r"has no column\(s\) uri \(it has: image_id, path\)",
    ),
    "empty csv": ("c.csv", b"", r"is empty \(0 bytes\); a catalog needs image_id and uri"),
    "empty parquet": ("c.parquet", b"", r"is empty \(0 bytes\)"),
    "empty csv.gz": ("c.csv.gz", gzip.compress(b""), r"is not a readable CSV file: Empty CSV file"),
    "random bytes as csv": (
        "c.csv",
        np.random.default_rng(0).bytes(4096),
        r"is not a readable CSV file: binary data, not CSV text",
    ),
    "png as csv": (
        "c.csv",
        png_bytes(),
        r"is not a readable CSV file: binary data, not CSV text|has no column",
    ),
    "parquet as csv": (
        "c.csv",
        parquet_bytes(pa.table({"image_id": ["a"], "uri": ["a.jpg"]})),
        r"is not a readable CSV file: binary data, not CSV text",
    ),
    "csv as parquet": ("c.parquet", HEADER + b"a,a.jpg\n", r"is not a readable Parquet file: .*magic bytes"),
    "ragged row": (
        "c.csv",
        HEADER + b"a,a.jpg,extra\n",
        r"is not a readable CSV file: CSV parse error: Expected 2",
    ),
    "not gzip": ("c.csv.gz", HEADER + b"a,a.jpg\n", r"is not a readable CSV file: zlib inflate failed"),
    "uri as a list": (
        "c.parquet",
        parquet_bytes(pa.table({"image_id": ["a"], "uri": [["a.jpg", "b.jpg"]]})),
        r"column uri holds list<.*>, not text",
    ),
    "binary non-utf8 parquet": (
        "c.parquet",
        parquet_bytes(pa.table({"image_id": pa.array([b"ok", b"\xff\xfe"], pa.binary()), "uri": ["a", "b"]})),
        r"data row 2 has an image_id that is not UTF-8 text \(byte 0xff\)",
    ),
    "junk header": (
        "c.csv",
        b"\x1b[31m" + b"z" * 5000 + b",\x07bell\n1,2\n",
        r"has no column\(s\) image_id, uri \(it has: \\x1b\[31mz+\.\.\., \\x07bell\)",
    ),
}


def write(tmp_path: Path, name: str) -> Path:
    filename, data, _ = HOSTILE[name]
    path = tmp_path / filename
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_manifest_is_one_catalog_error_line_naming_the_file(tmp_path, name):
    path = write(tmp_path, name)
    with pytest.raises(catalog.CatalogError, match=HOSTILE[name][2]) as info:
        list(catalog.iter_catalog(str(path)))
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and len(message) < 500
    assert info.value.__cause__ is None  # no pyarrow chain behind it (raised `from None`, or fresh)
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_the_data_row_is_counted_across_batches(tmp_path):
    ids = [f"i{k}".encode() for k in range(30)]
    ids[24] = b"caf\xe9"
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.binary()), "uri": ["a.jpg"] * 30}), path)
    with pytest.raises(catalog.CatalogError, match="data row 25 has an image_id that is not UTF-8"):
        list(catalog.iter_catalog(str(path), batch_rows=10))


def test_a_good_csv_with_unicode_and_long_but_sane_fields_still_reads(tmp_path):
    path = tmp_path / "c.csv"
    long_key = "d/" * 2000 + "x.jpg"  # 4005 characters: under the limit
    path.write_text(f"image_id,uri\ncafé,images/ü.jpg\nlong,{long_key}\n", encoding="utf-8")
    out = pa.Table.from_batches(list(catalog.iter_catalog(str(path)))).to_pydict()
    assert out["image_id"] == ["café", "long"]
    assert out["uri"] == [str(tmp_path / "images/ü.jpg"), str(tmp_path / long_key)]


# ---- through the command line ---------------------------------------------------------------------------

CLI_CASES = [
    "latin-1 id",
    "10 MB field",
    "csv missing uri",
    "parquet missing uri",
    "empty csv",
    "random bytes as csv",
]


# as a process (what a user's shell sees: nothing else on stderr, no traceback) for two of them; all of
# them through the command's own entry point in this process (a process costs seconds of imports)
@pytest.mark.parametrize("name", ["latin-1 id", "random bytes as csv"])
def test_mumic_retag_on_a_hostile_catalog_prints_one_error_line_and_exits_non_zero(
    tmp_path, tiny_model_dir, name
):
    path = write(tmp_path, name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "jobs.cli", "retag", "--catalog", str(path), "--model", str(tiny_model_dir)]
    cmd += ["--output", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("mumic: error: catalog ") and str(path) in lines[0]
    assert "Traceback" not in done.stderr and not done.stdout.strip()


@pytest.mark.parametrize("name", CLI_CASES)
def test_the_retag_command_on_a_hostile_catalog_is_one_error_line_and_a_non_zero_code(
    tmp_path, tiny_model_dir, name, capsys
):
    from jobs import cli

    path = write(tmp_path, name)
    code = cli.main(["retag", "--catalog", str(path), "--model", str(tiny_model_dir), "--output",
                     str(tmp_path / "out"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("mumic: error: catalog ") and str(path) in lines[0]
    assert "Traceback" not in err and not out.strip()
