"""End to end with real retag runs (Ray): each run's commit is followed by an update of the search index,
`mumic search` then uses it, a failed index update warns without failing the committed run, and
`mumic duplicates` marks the same bytes listed under two ids."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import index
from pipelines.tables import current_uri, open_table


def write_catalog(folder, name, rows):
    pq.write_table(pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}), folder / name)
    return str(folder / name)


@pytest.fixture(scope="module")
def world(ray_cluster, tiny_ref, tmp_path_factory):
    from mumic_core import synthetic
    from pipelines.retag import run_retag

    folder, model = tiny_ref
    root = tmp_path_factory.mktemp("index-retag")
    rows = synthetic.write_dataset(root, 12, seed=21)
    shutil.copy(root / rows[0]["uri"], root / "images" / "copy-of-first.jpg")  # the same bytes, another id
    rows.append({"image_id": "copy-of-first", "uri": "images/copy-of-first.jpg"})
    out = root / "out"
    first = run_retag(write_catalog(root, "a.parquet", rows), folder, str(out), run_id="run-a", progress=False)
    return {"root": root, "rows": rows, "out": out, "model": model, "folder": folder, "first": first}


def _current_version(out) -> int:
    return open_table(current_uri(str(out))).version()


def test_a_retag_run_leaves_an_index_of_current_as_committed(world):
    manifest = index.read_manifest(str(world["out"]), world["model"])
    assert world["first"]["rows_ok"] == 13
    assert manifest is not None and manifest["rows"] == 13
    assert manifest["current_version"] == _current_version(world["out"])
    assert index.usable_manifest(str(world["out"]), world["model"]) == manifest


def test_mumic_search_uses_the_runs_index(world, capsys):
    from jobs import cli

    args = ["search", "--output", str(world["out"]), "--model", world["folder"], "--text", "red", "--k", "13", "--json"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "scanning" not in out.err
    hits = [json.loads(line) for line in out.out.splitlines()]
    assert cli.main([*args, "--exact"]) == 0
    exact = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {h["image_id"] for h in hits} == {h["image_id"] for h in exact} and len(hits) == 13
    assert sorted(h["score"] for h in hits) == pytest.approx(sorted(h["score"] for h in exact), abs=3e-3)


def test_duplicates_marks_the_same_bytes_under_two_ids(world):
    found = index.find_duplicates(str(world["out"]), world["model"], threshold=0.95)
    rows = {r["image_id"]: r for r in found.table.to_pylist()}
    first = world["rows"][0]["image_id"]
    assert rows[first]["group_id"] == rows["copy-of-first"]["group_id"]
    assert {i for i, r in rows.items() if r["exact_duplicate"]} == {first, "copy-of-first"}
    assert rows["copy-of-first"]["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_a_failed_index_update_warns_and_the_run_still_commits(world, monkeypatch, capsys):
    from mumic_core import synthetic
    from pipelines.index import build
    from pipelines.retag import run_retag

    root, rows = world["root"], world["rows"]
    new = synthetic.write_dataset(root, 2, seed=22)
    catalog = write_catalog(root, "b.parquet", rows + new)

    def broken_publish(*args, **kwargs):
        raise OSError("the bucket said no")

    monkeypatch.setattr(build, "publish", broken_publish)
    second = run_retag(catalog, world["folder"], str(world["out"]), run_id="run-b", progress=True)
    monkeypatch.undo()

    assert second["status"] == "committed" and second["rows_ok"] == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: the search index" in line]
    assert len(warnings) == 1 and "the bucket said no" in warnings[0] and "mumic index --output" in warnings[0]
    with pytest.raises(index.IndexUnavailable, match="stale"):
        index.usable_manifest(str(world["out"]), world["model"])

    done = index.refresh(str(world["out"]), world["model"])  # what `mumic index` does: an update, not a rebuild
    assert (done.added, done.removed, done.rebuilt) == (2, 0, False)
    assert done.manifest["rows"] == 15 and done.manifest["current_version"] == _current_version(world["out"])
