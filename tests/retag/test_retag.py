"""`run_retag` end to end on a local Ray cluster: the output tables' guarantees and bad inputs."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mumic_core import synthetic
from pipelines import tables
from pipelines.retag import RetagError, run_retag
from pipelines.retag import run as retag_run
from pipelines.retag.catalog import CatalogError

N_IMAGES = 24

# ---- helpers --------------------------------------------------------------------------------------------


def write_catalog(folder: Path, rows: list[dict], name: str = "catalog.parquet") -> Path:
    path = folder / name
    pq.write_table(
        pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}), path
    )
    return path


def retag(catalog: Path | str, model: Path | str, output: Path | str, **kw) -> dict:
    return run_retag(str(catalog), str(model), str(output), progress=False, **kw)


def tags_of(output: Path, run_id: str | None = None) -> pa.Table:
    table = tables.open_table(str(output / "tags"))
    if table is None:
        return tables.TAGS_SCHEMA.empty_table()
    data = table.to_pyarrow_table()
    return data if run_id is None else data.filter(pc.equal(data.column("run_id"), run_id))


def runs_of(output: Path) -> list[dict]:
    table = tables.open_table(str(output / "runs"))
    return [] if table is None else table.to_pyarrow_table().to_pylist()


def copy_output(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class Crash(RuntimeError):
    pass


def crash_at(event_name: str):
    def on_event(name: str, info: dict) -> None:
        if name == event_name:
            raise Crash(f"simulated crash at {name}")

    return on_event


@pytest.fixture(scope="module")
def image_catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("catalog")
    rows = synthetic.write_dataset(folder, N_IMAGES, seed=21)
    write_catalog(folder, rows)
    return folder, rows


@pytest.fixture(scope="module")
def first_run(image_catalog, tiny_model_dir, ray_cluster, tmp_path_factory) -> tuple[dict, Path]:
    folder, _ = image_catalog
    output = tmp_path_factory.mktemp("first") / "out"
    summary = retag(folder / "catalog.parquet", tiny_model_dir, output, run_id="first", top_k=3)
    return summary, output


# ---- the happy path -------------------------------------------------------------------------------------


def test_retag_writes_one_row_per_catalog_image_with_the_contract_schema(
    first_run, image_catalog, tiny_model_untrained
):
    summary, output = first_run
    _, rows = image_catalog
    assert summary["status"] == "committed"
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_skipped"]) == (N_IMAGES, 0, 0)
    tags = tags_of(output)
    expected = [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("content_sha256", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("labels", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))),
        ("scores", pa.list_(pa.float32())),
        ("embedding", pa.list_(pa.float32())),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("taxonomy_sha256", pa.string()),
        ("run_id", pa.string()),
        ("run_date", pa.string()),
        ("processed_at", pa.timestamp("us", tz="UTC")),
    ]
    assert [(f.name, f.type) for f in tags.schema] == expected  # list item names aside, types are exact
    assert sorted(tags.column("image_id").to_pylist()) == sorted(r["image_id"] for r in rows)
    model = tiny_model_untrained
    for row in tags.to_pylist():
        assert row["status"] == "ok" and row["error"] is None and row["run_id"] == "first"
        assert len(row["content_sha256"]) == 64 and row["run_date"] == summary["run_date"]
        assert len(row["scores"]) == len(model.taxonomy)
        assert len(row["embedding"]) == model.embed_dim and abs(np.linalg.norm(row["embedding"]) - 1) < 1e-4
        chosen = [lb["score"] for lb in row["labels"]]
        assert len(chosen) >= 3 and chosen == sorted(chosen, reverse=True)  # top-3 at least, best first
        assert (
            row["taxonomy_sha256"] == model.taxonomy.sha256
            and row["model_version"] == summary["model_version"]
        )
    assert not (output / "_staging" / "first").exists()


# Distinct per-class thresholds: the label rule must index each class's own threshold, not a shared one.
CUSTOM_THRESHOLDS = (0.55, 0.3, 0.85, 0.2, 0.7, 0.45, 0.6, 0.25)


@pytest.fixture(scope="module")
def thresholded_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from mumic_core import checkpoint

    model = checkpoint.load(tiny_model_dir, map_location="cpu")
    assert len(CUSTOM_THRESHOLDS) == len(model.taxonomy)
    model.set_thresholds(CUSTOM_THRESHOLDS)
    folder = tmp_path_factory.mktemp("models") / "tiny-thresholded"
    checkpoint.save(model, folder)
    return Path(folder)


def expected_labels(scores: np.ndarray, thresholds: np.ndarray, names: list[str], top_k: int) -> list:
    """The contract's rule written out: every label at/above its threshold plus the top-k, best first
    (ties in label order)."""
    ranked = sorted(range(len(names)), key=lambda c: (-scores[c], c))
    keep = [c for rank, c in enumerate(ranked) if rank < top_k or scores[c] >= thresholds[c]]
    return [(names[c], float(scores[c])) for c in keep]


def test_retag_stores_the_models_own_scores_embeddings_and_the_label_rule(
    image_catalog, thresholded_model_dir, ray_cluster, tmp_path
):
    from mumic_core.scoring import Scorer

    folder, rows = image_catalog
    top_k = 2
    output = tmp_path / "out"
    summary = retag(
        folder / "catalog.parquet", thresholded_model_dir, output, run_id="values", top_k=top_k, batch_size=8
    )
    assert summary["status"] == "committed" and summary["rows_ok"] == N_IMAGES
    stored = {r["image_id"]: r for r in tags_of(output, "values").to_pylist()}
    assert set(stored) == {r["image_id"] for r in rows}

    scorer = Scorer.load(thresholded_model_dir, device="cpu")
    names, thresholds = scorer.names, scorer.thresholds
    np.testing.assert_allclose(thresholds, CUSTOM_THRESHOLDS, atol=1e-7)  # the model folder kept them
    pixels = np.stack([scorer.pixels((folder / r["uri"]).read_bytes()) for r in rows])
    own = scorer.predict(pixels)
    assert own.names == names

    n_above = []
    for i, r in enumerate(rows):
        row = stored[r["image_id"]]
        assert row["status"] == "ok", row["error"]
        scores = np.asarray(row["scores"], dtype=np.float32)
        np.testing.assert_allclose(scores, own.scores[i], atol=1e-5, err_msg=r["image_id"])
        np.testing.assert_allclose(row["embedding"], own.embeddings[i], atol=1e-5, err_msg=r["image_id"])
        # the rule, applied to the stored scores (equal to the model's to 1e-5, checked above)
        got = [(lb["label"], lb["score"]) for lb in row["labels"]]
        want = expected_labels(scores, thresholds, names, top_k)
        assert [n for n, _ in got] == [n for n, _ in want], r["image_id"]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-7)
        # and to the model's own scores, wherever no score sits within 1e-5 of its threshold
        if np.abs(own.scores[i] - thresholds).min() > 1e-5:
            assert [n for n, _ in got] == [n for n, _ in expected_labels(own.scores[i], thresholds, names, top_k)]
        n_above.append(int((scores >= thresholds).sum()))
    # the catalog exercises both halves of the rule: rows kept only by top-k, rows with more than top-k
    assert min(n_above) < top_k and max(n_above) > top_k, n_above


def test_retag_records_the_committed_run_in_the_runs_table(first_run, tiny_model_untrained):
    summary, output = first_run
    (row,) = runs_of(output)
    assert row["run_id"] == "first" and row["run_date"] == summary["run_date"]
    assert (row["rows_ok"], row["rows_error"], row["rows_skipped"]) == (N_IMAGES, 0, 0)
    assert json.loads(row["taxonomy"]) == tiny_model_untrained.taxonomy.names
    assert row["finished_at"] >= row["started_at"] and row["model_name"] == summary["model_name"]


# ---- incremental, full, exactly once --------------------------------------------------------------------


def test_retag_skips_images_already_tagged_by_same_model_version(
    first_run, image_catalog, tiny_model_dir, tmp_path
):
    _, first_out = first_run
    folder, rows = image_catalog
    output = copy_output(first_out, tmp_path / "out")
    new_rows = synthetic.write_dataset(tmp_path / "new", 4, seed=99)
    for r in new_rows:
        r["uri"] = str(tmp_path / "new" / r["uri"])
    catalog = write_catalog(tmp_path, rows_abs(folder, rows) + new_rows)

    summary = retag(catalog, tiny_model_dir, output, run_id="second", allow_root=[str(folder)])
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_skipped"]) == (4, 0, N_IMAGES)
    assert sorted(tags_of(output, "second").column("image_id").to_pylist()) == sorted(
        r["image_id"] for r in new_rows
    )
    assert tags_of(output, "first").num_rows == N_IMAGES  # the earlier run's rows are untouched
    assert {r["run_id"]: r["rows_skipped"] for r in runs_of(output)} == {"first": 0, "second": N_IMAGES}


def rows_abs(folder: Path, rows: list[dict]) -> list[dict]:
    return [{**r, "uri": str(folder / r["uri"])} for r in rows]


def test_retag_full_retags_every_image_even_when_already_tagged(
    first_run, image_catalog, tiny_model_dir, tmp_path
):
    _, first_out = first_run
    folder, _ = image_catalog
    output = copy_output(first_out, tmp_path / "out")
    summary = retag(folder / "catalog.parquet", tiny_model_dir, output, run_id="full", full=True)
    assert (summary["rows_ok"], summary["rows_skipped"]) == (N_IMAGES, 0)
    assert tags_of(output, "full").num_rows == N_IMAGES and tags_of(output).num_rows == 2 * N_IMAGES


def test_retag_of_an_already_committed_run_id_is_a_no_op_that_says_so(
    first_run, image_catalog, tiny_model_dir, tmp_path
):
    _, first_out = first_run
    folder, _ = image_catalog
    output = copy_output(first_out, tmp_path / "out")
    version = tables.open_table(str(output / "tags")).version()
    summary = retag(folder / "catalog.parquet", tiny_model_dir, output, run_id="first", full=True)
    assert summary["status"] == "already_committed" and summary["rows_ok"] == N_IMAGES
    assert tables.open_table(str(output / "tags")).version() == version
    assert tags_of(output).num_rows == N_IMAGES and len(runs_of(output)) == 1


# ---- crashes and resume ---------------------------------------------------------------------------------


def test_retag_crash_before_commit_leaves_nothing_visible_and_rerun_with_same_run_id_completes(
    first_run, image_catalog, tiny_model_dir, tmp_path
):
    _, first_out = first_run
    folder, rows = image_catalog
    output = copy_output(first_out, tmp_path / "out")
    version = tables.open_table(str(output / "tags")).version()
    with pytest.raises(Crash):
        retag(
            folder / "catalog.parquet",
            tiny_model_dir,
            output,
            run_id="crashy",
            full=True,
            on_event=crash_at("before_commit"),
        )
    assert tables.open_table(str(output / "tags")).version() == version  # no commit at all
    assert tags_of(output, "crashy").num_rows == 0 and tags_of(output).num_rows == N_IMAGES
    assert [r["run_id"] for r in runs_of(output)] == ["first"]
    with pytest.raises(RetagError, match="was started with full=True"):  # a resume must not change the run
        retag(folder / "catalog.parquet", tiny_model_dir, output, run_id="crashy")

    summary = retag(folder / "catalog.parquet", tiny_model_dir, output, run_id="crashy", full=True)
    assert summary["status"] == "committed"
    assert summary["rows_resumed"] == N_IMAGES and summary["rows_processed"] == 0  # staged work is not redone
    ids = tags_of(output, "crashy").column("image_id").to_pylist()
    assert sorted(ids) == sorted(r["image_id"] for r in rows)  # each catalog row exactly once
    assert tables.open_table(str(output / "tags")).version() == version + 1
    assert sorted(r["run_id"] for r in runs_of(output)) == ["crashy", "first"]


def test_retag_resumes_a_run_that_crashed_mid_stream_without_redoing_staged_parts(
    image_catalog, tiny_model_dir, tmp_path
):
    folder, rows = image_catalog
    output = tmp_path / "out"
    kw = {"run_id": "midway", "rows_per_part": 10, "batch_size": 8, "concurrency": 1}
    with pytest.raises(Crash):
        retag(folder / "catalog.parquet", tiny_model_dir, output, on_event=crash_at("staged"), **kw)
    assert tables.open_table(str(output / "tags")) is None  # staged files exist; no table shows them

    summary = retag(folder / "catalog.parquet", tiny_model_dir, output, **kw)
    # whole parts were resumed (the workers may have staged all of them before the driver's crash)
    assert summary["rows_resumed"] > 0 and summary["rows_resumed"] % 10 in (0, N_IMAGES % 10)
    assert summary["rows_resumed"] + summary["rows_processed"] == N_IMAGES
    ids = tags_of(output, "midway").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES and set(ids) == {r["image_id"] for r in rows}


def test_retag_repairs_a_missing_runs_row_when_a_run_crashed_right_after_its_commit(
    image_catalog, tiny_model_dir, tmp_path, monkeypatch
):
    folder, _ = image_catalog
    output = tmp_path / "out"

    def crash(*a, **k):
        raise Crash("simulated crash between the tags commit and the runs row")

    with monkeypatch.context() as m:
        m.setattr(retag_run, "ensure_run_row", crash)
        with pytest.raises(Crash):
            retag(folder / "catalog.parquet", tiny_model_dir, output, run_id="half")
    assert tags_of(output, "half").num_rows == N_IMAGES and runs_of(output) == []

    summary = retag(folder / "catalog.parquet", tiny_model_dir, output, run_id="half")
    assert summary["status"] == "already_committed" and summary["runs_row_repaired"] is True
    (row,) = runs_of(output)
    assert (row["run_id"], row["rows_ok"]) == ("half", N_IMAGES)
    assert tags_of(output).num_rows == N_IMAGES


# ---- bad inputs -----------------------------------------------------------------------------------------


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header for width x height pixels with zero scanlines streamed through zlib (1-bit gray
    keeps making it fast; the pixel count is what a decoder must refuse)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(comp.compress(row * 1000) for _ in range(height // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_retag_turns_bad_inputs_into_error_rows_and_accounts_for_every_catalog_row(tiny_model_dir, tmp_path):
    folder = tmp_path / "cat"
    good = synthetic.write_dataset(folder, 4, seed=5)
    red, blue = Image.new("RGB", (80, 80), (255, 0, 0)), Image.new("RGB", (80, 80), (0, 0, 255))
    jpeg = (folder / good[0]["uri"]).read_bytes()
    files = {
        "empty.jpg": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb.png": png_bomb(),
        "dir with space/ünïcødé café.jpg": jpeg,
        "cmyk.jpg": image_bytes(Image.open(folder / good[1]["uri"]).convert("CMYK"), "JPEG"),
        "animated.gif": image_bytes(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0),
        "red.png": image_bytes(red, "PNG"),
        "blue.png": image_bytes(blue, "PNG"),
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    rows = (
        good
        + [{"image_id": rel, "uri": rel} for rel in files]
        + [{"image_id": "missing", "uri": "nope/missing.jpg"}]
    )
    catalog = write_catalog(folder, rows)

    summary = retag(catalog, tiny_model_dir, tmp_path / "out", run_id="bad")
    tags = {r["image_id"]: r for r in tags_of(tmp_path / "out", "bad").to_pylist()}
    assert set(tags) == {r["image_id"] for r in rows}  # every catalog row is a row of the run
    reasons = {i: (r["error"] or "").split(":")[0] for i, r in tags.items() if r["status"] == "error"}
    assert reasons == {
        "empty.jpg": "empty",
        "text.jpg": "not_an_image",
        "truncated.jpg": "truncated",
        "bomb.png": "too_large",
        "missing": "not_found",
    }
    for ok_id in ["dir with space/ünïcødé café.jpg", "cmyk.jpg", "animated.gif"] + [
        r["image_id"] for r in good
    ]:
        assert tags[ok_id]["status"] == "ok" and tags[ok_id]["error"] is None, ok_id
    assert tags["missing"]["content_sha256"] is None and tags["missing"]["scores"] is None
    assert tags["empty.jpg"]["content_sha256"] is not None  # bytes were read: their hash is known
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_skipped"]) == (len(rows) - 5, 5, 0)
    # the animated GIF is tagged from its first (red) frame
    gif, red_e, blue_e = (np.array(tags[i]["embedding"]) for i in ("animated.gif", "red.png", "blue.png"))
    assert np.allclose(gif, red_e, atol=1e-4) and not np.allclose(gif, blue_e, atol=1e-2)


def test_retag_refuses_a_catalog_with_duplicate_image_ids_before_any_work(
    image_catalog, tiny_model_dir, tmp_path
):
    folder, rows = image_catalog
    catalog = write_catalog(tmp_path, rows_abs(folder, rows + rows[:2]))
    with pytest.raises(CatalogError, match=r"2 image_id value\(s\) appear more than once"):
        retag(catalog, tiny_model_dir, tmp_path / "out", run_id="dups")
    assert tables.open_table(str(tmp_path / "out" / "tags")) is None
    assert not (tmp_path / "out" / "_staging" / "dups").exists()


def test_retag_refuses_a_catalog_without_a_uri_column_naming_it(tiny_model_dir, tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "url": ["a.jpg"]}), tmp_path / "c.parquet")
    with pytest.raises(CatalogError, match=r"no column\(s\) uri"):
        retag(tmp_path / "c.parquet", tiny_model_dir, tmp_path / "out")


def test_retag_cli_reports_a_bad_catalog_in_one_line_and_exits_non_zero(
    image_catalog, tiny_model_dir, tmp_path, capsys
):
    from jobs.cli import main

    folder, rows = image_catalog
    catalog = write_catalog(tmp_path, rows_abs(folder, rows + rows[:1]))
    code = main(
        ["retag", "--catalog", str(catalog), "--model", str(tiny_model_dir), "--output", str(tmp_path / "o")]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mumic: error:")]
    assert code == 1 and len(errors) == 1 and "appear more than once" in errors[0]
    assert (
        main(
            [
                "retag",
                "--catalog",
                str(catalog),
                "--model",
                str(tiny_model_dir),
                "--output",
                str(tmp_path / "o"),
                "--run-id",
                "bad/id",
            ]
        )
        == 2
    )
