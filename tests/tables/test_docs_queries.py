"""The DuckDB and Polars snippets of docs/output-tables.md, run as written against a real output: two retag
runs (the second incremental, with a missing image), so "the latest run" and "current labels" differ from
"everything" and the documented queries have to get them right."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "output-tables.md"
FENCE = re.compile(r"^```python (duckdb|polars)\n(.*?)^```", re.M | re.S)
OUTPUT_LINE = re.compile(r'^output = "[^"]*"', re.M)


def doc_blocks(engine: str) -> list[str]:
    return [code for tag, code in FENCE.findall(DOC.read_text()) if tag == engine]


def write_catalog(folder: Path, name: str, rows: list[dict]) -> str:
    pq.write_table(
        pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}), folder / name
    )
    return str(folder / name)


@pytest.fixture(scope="module")
def output(ray_cluster, tiny_model_untrained, tmp_path_factory):
    """Run A tags 16 images; run B (later) sees 6 of them again (skipped), 5 new ones and a missing file."""
    from mumic_core import checkpoint, synthetic
    from pipelines.retag import run_retag

    root = tmp_path_factory.mktemp("docs-queries")
    model = root / "model"
    checkpoint.save(tiny_model_untrained, model)
    first = synthetic.write_dataset(root, 16, seed=11)
    new = synthetic.write_dataset(root, 5, seed=12)
    missing = {"image_id": "missing-1", "uri": "images/missing-1.jpg"}
    out = root / "out"
    a = run_retag(
        write_catalog(root, "a.parquet", first), str(model), str(out), run_id="run-a", progress=False
    )
    b = run_retag(
        write_catalog(root, "b.parquet", first[:6] + new + [missing]),
        str(model),
        str(out),
        run_id="run-b",
        progress=False,
    )
    assert (a["rows_ok"], a["rows_error"], a["rows_skipped"]) == (16, 0, 0)
    assert (b["rows_ok"], b["rows_error"], b["rows_skipped"]) == (5, 1, 6)
    return out, b, {r["image_id"] for r in first + new}


def run_blocks(engine: str, output_dir: Path) -> dict:
    blocks = doc_blocks(engine)
    assert blocks, f"docs/output-tables.md has no ```python {engine} blocks"
    assert OUTPUT_LINE.search(blocks[0]), 'the first block should set `output = "..."`'
    namespace: dict = {"__name__": f"docs_{engine}"}
    for i, code in enumerate(blocks):
        code = OUTPUT_LINE.sub(f"output = {str(output_dir)!r}", code)
        exec(compile(code, f"docs/output-tables.md ({engine} block {i + 1})", "exec"), namespace)
    return namespace


def test_duckdb_queries_of_the_docs_answer_for_the_latest_run(output):
    out, latest, all_ok_images = output
    ns = run_blocks("duckdb", out)
    assert ns["run_id"] == latest["run_id"] == "run-b"
    assert ns["latest_rows"] == latest["rows_ok"] + latest["rows_error"] == 6
    assert set(ns["current"]["image_id"]) == all_ok_images and len(ns["current"]) == len(all_ok_images)
    assert set(ns["current"]["status"]) == {"ok"}
    with_label = ns["with_label"]
    assert set(with_label.columns) == {"image_id", "uri", "score"}
    assert (with_label["score"] >= ns["min_score"]).all()
    assert ns["errors"].to_dict("records") == [{"reason": "not_found", "images": 1}]
    assert list(ns["history"]["run_id"]) == ["run-a", "run-b"]


def test_polars_queries_of_the_docs_answer_for_the_latest_run(output):
    out, latest, all_ok_images = output
    ns = run_blocks("polars", out)
    assert ns["latest"]["run_id"] == "run-b"
    assert ns["latest_rows"] == latest["rows_ok"] + latest["rows_error"] == 6
    current = ns["current"]
    assert set(current["image_id"].to_list()) == all_ok_images and current.height == len(all_ok_images)
    # an image tagged in both runs... was skipped in run B: its current row is still run A's
    assert set(current["run_id"].to_list()) == {"run-a", "run-b"}
    assert (ns["with_label"]["score"] >= ns["min_score"]).all()
    assert ns["wide"].height == latest["rows_ok"] and ns["wide"].width == 1 + len(ns["names"])
