"""The `current` table: every image's labels now, after every night — skips, copies, errors, prune,
crash repair — and the error ceiling that keeps an outage from being committed as a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mumic_core import synthetic
from pipelines import tables
from pipelines.retag import TooManyErrors, run_retag

N = 12


def write_catalog(folder: Path, name: str, rows: list[dict]) -> str:
    pq.write_table(
        pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}), folder / name
    )
    return str(folder / name)


def retag(catalog: str, model: Path, output: Path, **kw) -> dict:
    return run_retag(catalog, str(model), str(output), progress=False, **kw)


def current_of(output: Path) -> dict[str, dict]:
    table = tables.open_table(str(output / "current"))
    return {r["image_id"]: r for r in table.to_pyarrow_table().to_pylist()}


def tags_row(output: Path, run_id: str, image_id: str) -> dict:
    rows = tables.open_table(str(output / "tags")).to_pyarrow_table().to_pylist()
    (row,) = [r for r in rows if r["run_id"] == run_id and r["image_id"] == image_id]
    return row


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("current-catalog")
    return folder, synthetic.write_dataset(folder, N, seed=31)


@pytest.fixture(scope="module")
def two_nights(images, tiny_model_dir, ray_cluster, tmp_path_factory):
    """Night 1 tags N images. Night 2 lists the first 10 again (unchanged: skipped), a renamed copy of
    image 0 under a new id, and a file that is gone; images 10 and 11 are not listed."""
    folder, rows = images
    out = tmp_path_factory.mktemp("current") / "out"
    one = retag(write_catalog(folder, "n1.parquet", rows), tiny_model_dir, out, run_id="n1")
    night2 = rows[:10] + [
        {"image_id": "copy-of-0", "uri": rows[0]["uri"]},
        {"image_id": "gone", "uri": "images/no-such-file.jpg"},
    ]
    two = retag(write_catalog(folder, "n2.parquet", night2), tiny_model_dir, out, run_id="n2")
    return out, rows, one, two


def test_first_night_puts_every_image_in_current_with_its_tags_row(two_nights):
    out, rows, one, _ = two_nights
    assert one["rows_ok"] == N
    first = tables.open_table(str(out / "current")).history()
    assert any(c.get("operation") for c in first)
    row = tags_row(out, "n1", rows[3]["image_id"])
    now = current_of(out)[rows[3]["image_id"]]
    for column in ("uri", "content_sha256", "labels", "scores", "embedding", "model_name", "model_version"):
        assert now[column] == row[column], column
    assert now["run_id"] == "n1"


def test_the_second_night_still_answers_for_images_it_skipped(two_nights):
    out, rows, _, two = two_nights
    assert (two["rows_ok"], two["rows_skipped"], two["rows_error"]) == (0, 11, 1)
    now = current_of(out)
    for r in rows[:10]:
        row = now[r["image_id"]]
        assert (row["status"], row["run_id"], row["last_seen_run_id"]) == ("ok", "n1", "n2")
        assert row["labels"] == tags_row(out, "n1", r["image_id"])["labels"]


def test_a_new_id_for_bytes_tagged_before_gets_its_row_with_the_labels_of_those_bytes(two_nights):
    out, rows, _, _ = two_nights
    copy, original = current_of(out)["copy-of-0"], tags_row(out, "n1", rows[0]["image_id"])
    assert copy["status"] == "ok" and copy["content_sha256"] == original["content_sha256"]
    assert (copy["labels"], copy["embedding"], copy["run_id"]) == (original["labels"], original["embedding"], "n1")
    assert copy["last_seen_run_id"] == "n2"


def test_an_image_that_fails_says_so_and_ids_not_listed_stay_without_prune(two_nights):
    out, rows, _, _ = two_nights
    now = current_of(out)
    assert now["gone"]["status"] == "error" and now["gone"]["error"].startswith("not_found")
    assert now["gone"]["labels"] is None and now["gone"]["run_id"] is None
    for r in rows[10:]:  # not listed on night 2, no --prune: still there, last seen on night 1
        assert now[r["image_id"]]["last_seen_run_id"] == "n1"
    assert len(now) == N + 2


def test_mumic_search_answers_from_current_after_a_night_with_nothing_new(two_nights, tiny_model_dir):
    out, _, _, _ = two_nights
    r = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "search", "--output", str(out), "--model", str(tiny_model_dir),
         "--text", "red", "--k", "5", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(hits) == 5 and len({h["image_id"] for h in hits}) == 5


def test_an_error_keeps_the_last_good_labels_and_a_changed_image_is_relabelled(
    images, tiny_model_dir, ray_cluster, tmp_path
):
    folder, rows = images
    out = tmp_path / "out"
    retag(write_catalog(folder, "a.parquet", rows[:3]), tiny_model_dir, out, run_id="a")
    before = current_of(out)
    moved = [dict(rows[0], uri="images/moved-away.jpg"), dict(rows[1], uri=rows[5]["uri"]), rows[2]]
    b = retag(write_catalog(folder, "b.parquet", moved), tiny_model_dir, out, run_id="b")
    assert (b["rows_ok"], b["rows_error"], b["rows_skipped"]) == (1, 1, 1)
    now = current_of(out)
    gone = now[rows[0]["image_id"]]
    assert gone["status"] == "error" and gone["labels"] == before[rows[0]["image_id"]]["labels"]
    assert gone["run_id"] == "a" and gone["last_seen_run_id"] == "b"
    # image 1 now has image 5's bytes, never tagged here: tagged again, its row relabelled by run b
    changed = now[rows[1]["image_id"]]
    assert changed["content_sha256"] != before[rows[1]["image_id"]]["content_sha256"]
    assert (changed["status"], changed["run_id"]) == ("ok", "b")
    assert changed["labels"] == tags_row(out, "b", rows[1]["image_id"])["labels"]
    assert changed["tags_version"] > before[rows[1]["image_id"]]["tags_version"]


def test_prune_removes_the_ids_a_complete_catalog_no_longer_lists(images, tiny_model_dir, ray_cluster, tmp_path):
    folder, rows = images
    out = tmp_path / "out"
    retag(write_catalog(folder, "a.parquet", rows[:6]), tiny_model_dir, out, run_id="a")
    retag(write_catalog(folder, "b.parquet", rows[:4]), tiny_model_dir, out, run_id="b", prune=True)
    assert set(current_of(out)) == {r["image_id"] for r in rows[:4]}


def test_a_crash_before_the_current_update_is_repaired_by_the_rerun_and_applied_once(
    images, tiny_model_dir, ray_cluster, tmp_path
):
    folder, rows = images
    out = tmp_path / "out"
    catalog = write_catalog(folder, "a.parquet", rows[:4])

    def crash(name, info):
        if name == "before_current":
            raise RuntimeError("simulated crash between the tags commit and the current update")

    with pytest.raises(RuntimeError, match="simulated crash"):
        retag(catalog, tiny_model_dir, out, run_id="a", on_event=crash)
    assert tables.open_table(str(out / "current")) is None or not current_of(out)
    again = retag(catalog, tiny_model_dir, out, run_id="a")
    assert again["status"] == "already_committed" and again["current_repaired"] is True
    assert set(current_of(out)) == {r["image_id"] for r in rows[:4]}
    version = tables.open_table(str(out / "current")).version()
    third = retag(catalog, tiny_model_dir, out, run_id="a")
    assert third["current_repaired"] is False and tables.open_table(str(out / "current")).version() == version


def test_an_outage_above_the_error_ceiling_commits_nothing_and_the_rerun_completes(
    images, tiny_model_dir, ray_cluster, tmp_path
):
    folder, rows = images
    out = tmp_path / "out"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    moved = [dict(r, uri=str(hidden / Path(r["uri"]).name)) for r in rows[:6]]  # not there yet: an outage
    catalog = write_catalog(tmp_path, "c.parquet", moved)
    with pytest.raises(TooManyErrors, match=r"6 of 6 rows are errors .*not_found 6.*nothing committed"):
        retag(catalog, tiny_model_dir, out, run_id="night")
    assert tables.open_table(str(out / "tags")) is None or tables.open_table(str(out / "tags")).to_pyarrow_table().num_rows == 0
    assert not (out / "_staging" / "night").exists()
    for r in rows[:6]:  # the storage is back
        (hidden / Path(r["uri"]).name).write_bytes((folder / r["uri"]).read_bytes())
    again = retag(catalog, tiny_model_dir, out, run_id="night")
    assert (again["status"], again["rows_ok"], again["rows_error"]) == ("committed", 6, 0)


def test_the_cli_exits_non_zero_with_the_counts_by_reason_above_the_ceiling(images, tiny_model_dir, ray_cluster, tmp_path):
    _, rows = images
    catalog = write_catalog(tmp_path, "c.parquet", [dict(r, uri=str(tmp_path / "nope.jpg")) for r in rows[:3]])
    # on the session's cluster (starting a local one per process costs ~10 s each)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    r = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "retag", "--catalog", catalog, "--model", str(tiny_model_dir),
         "--output", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mumic: error:")]
    assert r.returncode == 1 and len(errors) == 1 and "not_found 3" in errors[0], r.stderr[-2000:]
    from jobs.cli import main

    # the ceiling lifted: the same command exits 0 (run in this process: one interpreter start less)
    ok = main(["retag", "--catalog", catalog, "--model", str(tiny_model_dir), "--output", str(tmp_path / "out2"),
               "--no-progress", "--max-error-rate", "1"])
    assert ok == 0


def test_a_run_whose_staging_is_not_exactly_once_commits_nothing_and_says_what_to_do(
    images, tiny_model_dir, ray_cluster, tmp_path
):
    from pipelines.retag import StagingMismatch

    folder, rows = images
    out = tmp_path / "out"
    catalog = write_catalog(folder, "a.parquet", rows[:4])

    def crash(name, info):
        if name == "before_commit":
            raise RuntimeError("simulated crash before the commit")

    with pytest.raises(RuntimeError, match="simulated crash"):
        retag(catalog, tiny_model_dir, out, run_id="twice", on_event=crash)
    parts = out / "_staging" / "twice" / "parts"
    record = json.loads(next(parts.glob("*.json")).read_text())
    (parts / "part-000099.json").write_text(json.dumps({**record, "seq": 99}))  # a part recorded twice
    with pytest.raises(StagingMismatch, match=r"8 rows \(4 distinct ids\) are staged for 4 catalog rows.*rerun with --run-id twice"):
        retag(catalog, tiny_model_dir, out, run_id="twice")
    assert tables.open_table(str(out / "tags")) is None or not tables.open_table(str(out / "tags")).to_pyarrow_table().num_rows
