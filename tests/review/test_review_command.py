"""`mumic review` end to end on a real `current` table (one real retag): the queue is the selection over the
table's own scores, its CSV is annotations the reader accepts, the contact sheet shows every image, and
bad arguments are one line."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import cli
from mumic_core import checkpoint, synthetic
from mumic_core.taxonomy import Taxonomy
from pipelines import tables
from pipelines.annotations import load as load_annotations
from pipelines.registry.references import resolve_model
from pipelines.retag import run_retag
from pipelines.review import margins, review_queue

N = 16


@pytest.fixture(scope="module")
def tagged(tiny_model_dir, ray_cluster, tmp_path_factory) -> tuple[Path, list[dict]]:
    """N generated images retagged by the tiny model into a fresh output (its `current` table)."""
    folder = tmp_path_factory.mktemp("review-catalog")
    rows = synthetic.write_dataset(folder, N, seed=41)
    catalog = folder / "catalog.parquet"
    pq.write_table(pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}), catalog)
    output = tmp_path_factory.mktemp("review") / "out"
    summary = run_retag(str(catalog), str(tiny_model_dir), str(output), progress=False, run_id="r1")
    assert summary["rows_ok"] == N
    return output, rows


def current_scores(output: Path) -> tuple[list[str], list[str], np.ndarray]:
    rows = sorted(tables.open_table(str(output / "current")).to_pyarrow_table().to_pylist(), key=lambda r: r["image_id"])
    return [r["image_id"] for r in rows], [r["uri"] for r in rows], np.array([r["scores"] for r in rows], np.float32)


def review(*args: str) -> int:
    return cli.main(["review", *args])


def test_the_queue_is_the_selection_over_currents_scores_and_its_csv_is_annotations(
    tagged, tiny_model_dir, tmp_path, capsys
):
    output, _ = tagged
    out = tmp_path / "queue.csv"
    assert review("--output", str(output), "--model", str(tiny_model_dir), "--k", "6", "--out", str(out), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["queued"], summary["rows"], summary["rows_other_model"]) == (6, N, 0)

    cfg = checkpoint.read_config(str(tiny_model_dir))
    names, thresholds = Taxonomy.from_dict(cfg["taxonomy"]).names, np.asarray(cfg["thresholds"], np.float32)
    ids, uris, scores = current_scores(output)
    want = review_queue(margins(scores, thresholds), ids, 6)
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["image_id"], r["review_label"]) for r in written] == [(ids[p.row], names[p.column]) for p in want]
    for r, p in zip(written, want, strict=True):
        s = scores[p.row]
        guess = [names[c] for c in np.argsort(-s, kind="stable") if s[c] >= thresholds[c]]
        assert r["labels"] == "|".join(guess)
        assert r["uri"] == uris[p.row]
        assert float(r["score"]) == pytest.approx(float(s[p.column]), abs=1e-4)

    # what `mumic train --annotations` reads: the extra columns are ignored, the guess is the labels
    ann = load_annotations(str(out), synthetic.taxonomy(), require=())
    assert list(ann.frame["image_id"]) == [r["image_id"] for r in written]
    assert [sorted(x) for x in ann.frame["labels"]] == [sorted(filter(None, r["labels"].split("|"))) for r in written]
    assert ann.label_matrix().shape == (6, len(names))

    sheet = Path(summary["sheet"])
    assert sheet == out.with_suffix(".html")
    page = sheet.read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 6 and summary["unshown"] == 0
    for r in written:
        assert f"<b>{r['image_id']}</b>" in page and f"check: {r['review_label']}" in page


def test_labels_restrict_the_queue_and_k_beyond_the_table_queues_every_image(tagged, tiny_model_dir, tmp_path, capsys):
    output, _ = tagged
    out = tmp_path / "red-blue.csv"
    args = ["--output", str(output), "--model", str(tiny_model_dir), "--k", "50", "--labels", "red, blue"]
    assert review(*args, "--out", str(out), "--no-sheet", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["queued"] == N and summary["sheet"] is None and not out.with_suffix(".html").exists()
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert {r["review_label"] for r in written} <= {"red", "blue"}
    assert sorted(r["image_id"] for r in written) == sorted(current_scores(output)[0])


def test_the_default_queue_lands_under_the_output_and_a_config_file_works(tagged, tiny_model_dir, tmp_path, capsys):
    output, _ = tagged
    config = tmp_path / "review.yaml"
    config.write_text(f"output: {output}\nmodel: {tiny_model_dir}\nk: 3\nsheet: false\n")
    assert review("--config", str(config)) == 0
    printed = capsys.readouterr().out
    (written,) = sorted((output / "review").glob("queue-*.csv"))
    assert re.fullmatch(r"queue-\d{8}T\d{6}Z\.csv", written.name)
    assert str(written) in printed and "queued 3 of 16 images" in printed


def test_the_queue_can_be_written_to_s3(tagged, tiny_model_dir, s3_bucket, capsys):
    import boto3

    output, _ = tagged
    uri = f"s3://{s3_bucket}/queues/q.csv"
    assert review("--output", str(output), "--model", str(tiny_model_dir), "--k", "4", "--out", uri, "--json") == 0
    assert json.loads(capsys.readouterr().out)["sheet"] == f"s3://{s3_bucket}/queues/q.html"
    s3 = boto3.client("s3")
    body = s3.get_object(Bucket=s3_bucket, Key="queues/q.csv")["Body"].read().decode()
    assert body.splitlines()[0].replace('"', "") == "image_id,uri,labels,review_label,score,threshold,rank"
    assert len(body.splitlines()) == 5
    assert load_annotations(uri, synthetic.taxonomy(), require=()).frame.shape[0] == 4


def one_error_line(args: list[str]) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "review", *args], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("mumic review:")]
    assert len(lines) == 1 and lines[0].startswith("mumic: error:"), r.stderr
    return r.returncode, lines[0]


def test_a_model_that_tagged_nothing_here_is_one_line_saying_to_retag(tagged, tiny_model_untrained, tmp_path):
    output, _ = tagged
    other = tmp_path / "other-model"
    checkpoint.save(tiny_model_untrained, other, extra={"version": "v-other"})
    assert resolve_model(str(other)).version == "v-other"
    code, line = one_error_line(["--output", str(output), "--model", str(other)])
    assert code == 1
    assert "were tagged by other-model/v-other" in line and f"({N} by other models)" in line and "retag" in line


def in_process_error(args: list[str], capsys) -> tuple[int, str]:
    code = review(*args)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("mumic review:")]
    assert len(lines) == 1 and lines[0].startswith("mumic: error:"), lines
    return code, lines[0]


def test_bad_arguments_are_one_line_errors(tagged, tiny_model_dir, tmp_path, capsys):
    output, _ = tagged
    model = str(tiny_model_dir)
    code, line = in_process_error(["--output", str(output), "--model", model, "--labels", "red,no-such-label"], capsys)
    assert code == 1 and "not in the model's taxonomy: 'no-such-label'" in line
    code, line = in_process_error(["--output", str(output), "--model", model, "--labels", " , "], capsys)
    assert code == 2 and "--labels needs at least one" in line
    code, line = in_process_error(["--output", str(output), "--model", model, "--k", "0"], capsys)
    assert code == 2 and "--k" in line
    code, line = in_process_error(["--output", str(output), "--model", model, "--out", str(tmp_path / "q.txt")], capsys)
    assert code == 2 and "--out must name a .csv file" in line
    code, line = in_process_error(["--output", str(tmp_path / "nothing-here"), "--model", model], capsys)
    assert code == 1 and "no current table" in line
    code, line = in_process_error(["--output", str(output), "--model", str(tmp_path / "no-model")], capsys)
    assert code == 1 and "no saved model" in line


def test_review_is_a_listed_command_with_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["review", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mumic review" in out and "--labels" in out and "--k" in out
    assert "review" in cli.build_parser().format_help()
