"""Annotations are validated before any training starts; augmentation is plain numpy on uint8 pixels."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from mumic_core import synthetic
from mumic_core.splits import split_of
from mumic_core.taxonomy import Label, Taxonomy
from pipelines import annotations
from pipelines.annotations import AnnotationError, augment


@pytest.fixture
def taxonomy_with_unseen() -> Taxonomy:
    return Taxonomy((Label("cat"), Label("dog"), Label("bird", unseen=True)), ("a photo of a {}.",))


def _write(tmp_path, rows: list[dict], fmt: str = "parquet") -> str:
    frame = pd.DataFrame(rows)
    path = tmp_path / f"annotations.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return str(path)


def _rows(n: int = 6) -> list[dict]:
    splits = ["train", "train", "train", "val", "val", "test"]
    return [
        {
            "image_id": f"i{k}",
            "uri": f"img/i{k}.jpg",
            "labels": ["cat"] if k % 2 else ["dog", "bird"],
            "split": splits[k % len(splits)],
        }
        for k in range(n)
    ]


def test_parquet_annotations_resolve_relative_uris_against_the_file_folder(tmp_path, taxonomy_with_unseen):
    rows = _rows()
    rows[0]["uri"] = "s3://bucket/abs.jpg"
    rows[1]["uri"] = "/abs/path.jpg"
    ann = annotations.load(_write(tmp_path, rows), taxonomy_with_unseen)
    uris = dict(zip(ann.frame["image_id"], ann.frame["uri"], strict=True))
    assert uris["i0"] == "s3://bucket/abs.jpg"
    assert uris["i1"] == "/abs/path.jpg"
    assert uris["i2"] == str(tmp_path / "img" / "i2.jpg")
    assert ann.split_counts == {"train": 3, "val": 2, "test": 1}


def test_csv_labels_are_pipe_separated_and_may_be_empty(tmp_path, taxonomy_with_unseen):
    rows = [{**r, "labels": "|".join(r["labels"])} for r in _rows()]
    rows[2]["labels"] = ""
    ann = annotations.load(_write(tmp_path, rows, "csv"), taxonomy_with_unseen, drop_unseen=False)
    assert ann.frame["labels"].tolist()[:3] == [["dog", "bird"], ["cat"], []]
    assert ann.label_matrix()[0].tolist() == [0, 1, 1]


def test_unknown_labels_fail_with_every_unknown_name_listed(tmp_path, taxonomy_with_unseen):
    rows = _rows()
    rows[0]["labels"] = ["cat", "zebra"]
    rows[3]["labels"] = ["unicorn"]
    rows[4]["labels"] = ["zebra"]
    with pytest.raises(AnnotationError) as err:
        annotations.load(_write(tmp_path, rows), taxonomy_with_unseen)
    message = str(err.value)
    assert "2 label(s) not in the taxonomy" in message
    assert "'zebra'" in message and "'unicorn'" in message
    assert "\n" not in message


def test_duplicate_image_ids_are_refused(tmp_path, taxonomy_with_unseen):
    rows = _rows()
    rows[3]["image_id"] = rows[1]["image_id"]
    with pytest.raises(AnnotationError, match=r"1 duplicate image_id values: 'i1'"):
        annotations.load(_write(tmp_path, rows), taxonomy_with_unseen)


def test_training_needs_non_empty_train_and_val_splits(tmp_path, taxonomy_with_unseen):
    rows = [{**r, "split": "train"} for r in _rows()]
    with pytest.raises(AnnotationError, match=r"split 'val' is empty \(train=6, val=0, test=0\)"):
        annotations.load(_write(tmp_path, rows), taxonomy_with_unseen)


def test_bad_split_values_and_missing_columns_are_named(tmp_path, taxonomy_with_unseen):
    rows = _rows()
    rows[0]["split"] = "dev"
    with pytest.raises(AnnotationError, match="unknown split value.*'dev'"):
        annotations.load(_write(tmp_path, rows), taxonomy_with_unseen)
    with pytest.raises(AnnotationError, match="missing column.*labels"):
        annotations.load(_write(tmp_path, [{"image_id": "a", "uri": "b"}]), taxonomy_with_unseen)


def test_rows_without_split_get_the_deterministic_hash_split(tmp_path, taxonomy_with_unseen):
    rows = [{"image_id": f"img-{k}", "uri": f"{k}.jpg", "labels": ["cat"]} for k in range(200)]
    ann = annotations.load(_write(tmp_path, rows), taxonomy_with_unseen)
    assert ann.frame["split"].tolist() == [split_of(f"img-{k}") for k in range(200)]
    counts = ann.split_counts
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    assert synthetic.split_of is split_of  # one implementation, re-exported for the generator


def test_unseen_labels_are_dropped_and_masked_for_training(tmp_path, taxonomy_with_unseen):
    ann = annotations.load(_write(tmp_path, _rows()), taxonomy_with_unseen)
    assert ann.unseen_dropped
    assert all("bird" not in labels for labels in ann.frame["labels"])
    mask = ann.known_mask()
    assert mask[:, 2].sum() == 0 and mask[:, :2].all()
    full = annotations.load(_write(tmp_path, _rows()), taxonomy_with_unseen, drop_unseen=False)
    assert full.label_matrix()[:, 2].sum() == 3 and full.known_mask().all()


def test_unknown_labels_column_becomes_a_mask(tmp_path, taxonomy_with_unseen):
    rows = _rows()
    for r in rows:
        r["unknown_labels"] = []
    rows[1]["unknown_labels"] = ["dog"]
    ann = annotations.load(_write(tmp_path, rows), taxonomy_with_unseen, drop_unseen=False)
    assert ann.known_mask()[1].tolist() == [1, 0, 1]
    rows[1]["unknown_labels"] = ["cat"]  # also a positive label: contradictory
    with pytest.raises(AnnotationError, match="both in labels and unknown_labels"):
        annotations.load(_write(tmp_path, rows), taxonomy_with_unseen)


def test_mumic_train_with_an_unknown_label_fails_fast_naming_it(tmp_path, capsys):
    from jobs.cli import main

    rows = synthetic.write_dataset(tmp_path / "data", 12, seed=5, size=32)
    rows[3]["labels"] = ["red", "purple"]
    pd.DataFrame(rows).to_parquet(tmp_path / "data" / "annotations.parquet")
    synthetic_taxonomy = tmp_path / "taxonomy.json"
    synthetic_taxonomy.write_text(json.dumps(synthetic.taxonomy().to_dict()))
    t0 = time.perf_counter()
    code = main(
        [
            "train",
            "--annotations",
            str(tmp_path / "data" / "annotations.parquet"),
            "--taxonomy",
            str(synthetic_taxonomy),
            "--backbone",
            "mumic-tiny",
            "--workers",
            "2",
            "--epochs",
            "1",
            "--workdir",
            str(tmp_path),
        ]
    )
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("mumic: error: ") and "'purple'" in err and len(err.splitlines()) == 1
    print(f"failed in {elapsed:.1f}s: {err}")
    # validation happens before Ray, MLflow or any decoding start
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_augmentation_flips_and_crops_uint8_batches_in_place_shape():
    rng = np.random.default_rng(0)
    pixels = np.zeros((8, 3, 16, 16), dtype=np.uint8)
    pixels[:, :, :, :4] = 255  # a bright left edge
    flipped = augment.random_hflip(pixels, rng, p=1.0)
    assert (
        flipped.dtype == np.uint8
        and (flipped[:, :, :, -4:] == 255).all()
        and (flipped[:, :, :, :4] == 0).all()
    )
    cropped = augment.random_resized_crop(pixels, rng, scale=(0.3, 0.5))
    assert cropped.shape == pixels.shape and cropped.dtype == np.uint8
    assert not np.array_equal(cropped, pixels)
    batch = {
        "image": pixels,
        "labels": np.ones((8, 2), np.uint8),
        "mask": np.ones((8, 2), np.uint8),
        "error": np.array([""] * 7 + ["not_found: x"], dtype=object),
    }
    out = augment.train_batch(batch, augment.Augment.parse("flip,crop"))
    assert set(out) == {"image", "labels", "mask"} and len(out["image"]) == 7
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.Augment.parse("rotate")


# ---- hostile annotation files: one line naming the file (and the data row when known) -------------------

import io  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.storage import StorageError  # noqa: E402

_HEADER = b"image_id,uri,labels,split\n"


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


HOSTILE_ANNOTATIONS = {
    "latin-1 id": (
        "a.csv",
        _HEADER + b"i0,a.jpg,cat,train\ncaf\xe9,b.jpg,dog,val\n",
        StorageError,
        r"data row 2, column image_id, is not UTF-8 text \(byte 0xe9\); save the file as UTF-8",
    ),
    "latin-1 header": (
        "a.csv",
        b"image_id,uri,l\xe4bels\ni0,a.jpg,cat\n",
        StorageError,
        "header line is not UTF-8",
    ),
    "10 MB uri": (
        "a.csv",
        _HEADER + b"i0,a.jpg,cat,train\ni1," + b"u" * (10 << 20) + b",dog,val\n",
        AnnotationError,
        r"data row 2: uri is 10485760 characters long \(at most 8192\)",
    ),
    "20 MB labels": (
        "a.csv",
        _HEADER + b"i0,a.jpg," + b"c" * (20 << 20) + b",train\n",
        AnnotationError,
        r"data row 1: labels is 20971520 characters long \(at most 1048576\)",
    ),
    "40 MB line": (
        "a.csv",
        _HEADER + b"i0,a.jpg," + b"c" * (40 << 20) + b",train\n",
        StorageError,
        "is not a readable CSV file: a line longer than 16 MiB",
    ),
    "csv missing labels": (
        "a.csv",
        b"image_id,uri\ni0,a.jpg\n",
        AnnotationError,
        r"missing column\(s\) labels",
    ),
    "parquet missing uri": (
        "a.parquet",
        _parquet(pa.table({"image_id": ["i0"], "labels": [["cat"]]})),
        AnnotationError,
        r"missing column\(s\) uri \(have: image_id, labels\)",
    ),
    "empty csv": ("a.csv", b"", StorageError, r"is empty \(0 bytes\)"),
    "empty parquet": ("a.parquet", b"", StorageError, r"is empty \(0 bytes\)"),
    "binary csv": ("a.csv", np.random.default_rng(1).bytes(4096), StorageError, "binary data, not CSV text"),
    "csv as parquet": (
        "a.parquet",
        _HEADER + b"i0,a.jpg,cat,train\n",
        StorageError,
        "not a readable Parquet file",
    ),
    "ragged csv": (
        "a.csv",
        _HEADER + b"i0,a.jpg\n",
        StorageError,
        "CSV parse error: Expected 4 columns, got 2",
    ),
    "duplicate columns": (
        "a.csv",
        b"image_id,uri,labels,uri\ni0,a,cat,b\n",
        StorageError,
        r"column\(s\) uri appear twice",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_ANNOTATIONS))
def test_a_hostile_annotations_file_is_one_line_naming_it(tmp_path, taxonomy_with_unseen, name):
    filename, data, error, pattern = HOSTILE_ANNOTATIONS[name]
    path = tmp_path / filename
    path.write_bytes(data)
    with pytest.raises(error, match=pattern) as info:
        annotations.load(str(path), taxonomy_with_unseen)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and len(message) < 500
    assert info.value.__cause__ is None


def test_thousands_of_huge_junk_labels_make_a_short_message(tmp_path, taxonomy_with_unseen):
    rows = _rows(200)
    for k, row in enumerate(rows):
        row["labels"] = [f"junk-{k}-" + "x" * 5000]
    with pytest.raises(AnnotationError, match=r"200 label\(s\) not in the taxonomy: .* and 180 more") as info:
        annotations.load(_write(tmp_path, rows), taxonomy_with_unseen)
    assert len(str(info.value)) < 2000 and "\n" not in str(info.value)


def test_csv_values_are_read_as_written_not_guessed_as_numbers(tmp_path):
    from pipelines.storage import read_table

    (tmp_path / "a.csv").write_text("image_id,uri,labels\n007,a.jpg,1e3|red\n010,b.jpg,\n")
    assert read_table(str(tmp_path / "a.csv")).to_pylist() == [
        {"image_id": "007", "uri": "a.jpg", "labels": "1e3|red"},
        {"image_id": "010", "uri": "b.jpg", "labels": ""},
    ]
