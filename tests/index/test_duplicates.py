"""`mumic duplicates`: planted near-copies (re-encoded, resized) and byte-identical copies under another id
come out as groups, with the right first image, similarities and `exact_duplicate` marks; unrelated images
make no group; the table's documented query runs; bad arguments are one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from index_helpers import jpeg, mumic, picture, pixel_embedding, write_current
from PIL import Image

from mumic_core.images import sha256_hex
from pipelines import index

ROOT = Path(__file__).resolve().parents[2]


def _image_rows(folder: Path, files: dict[str, bytes]) -> list[dict]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id, data in files.items():
        path = folder / "images" / f"{image_id}.jpg"
        path.write_bytes(data)
        rows.append(
            {"image_id": image_id, "uri": str(path), "content_sha256": sha256_hex(data), "embedding": pixel_embedding(data)}
        )
    return rows


def distinct_pictures(n: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"img-{i:03d}": jpeg(picture(rng)) for i in range(n)}


@pytest.fixture
def planted(tmp_path, tiny_ref):
    """30 unrelated pictures, plus: two re-encodings of img-000 (quality 40 and 60), a resized copy of
    img-001 (80 px), and img-002's very bytes under a second id."""
    _, model = tiny_ref
    files = distinct_pictures(30)
    rng = np.random.default_rng(0)
    originals = [picture(rng) for _ in range(3)]  # the same draws as img-000..002
    files["img-000-q40"] = jpeg(originals[0], 40)
    files["img-000-q60"] = jpeg(originals[0], 60)
    files["img-001-small"] = jpeg(originals[1].resize((80, 80), Image.LANCZOS), 85)
    files["img-002-again"] = files["img-002"]
    write_current(tmp_path, _image_rows(tmp_path, files), model)
    return tmp_path, model


def test_duplicates_find_planted_near_copies_and_byte_copies(planted):
    output, model = planted
    found = index.find_duplicates(str(output), model, threshold=0.95)

    rows = found.table.to_pylist()
    groups: dict[int, list[str]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r["image_id"])
    assert sorted(groups) == [1, 2, 3]  # the largest first, then by first image
    assert groups[1][0] == "img-000" and set(groups[1]) == {"img-000", "img-000-q60", "img-000-q40"}
    assert groups[2] == ["img-001", "img-001-small"]
    assert groups[3] == ["img-002", "img-002-again"]  # the first image is the lowest image_id
    by_id = {r["image_id"]: r for r in rows}
    assert by_id[groups[1][1]]["similarity"] >= by_id[groups[1][2]]["similarity"]  # most similar first
    assert by_id["img-000"]["first_image_id"] == "img-000" and by_id["img-000"]["similarity"] == 1.0
    assert all(0.95 <= by_id[i]["similarity"] <= 1.0 for i in ("img-000-q40", "img-000-q60", "img-001-small"))
    assert by_id["img-002-again"]["first_image_id"] == "img-002"
    assert by_id["img-002-again"]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert {i for i, r in by_id.items() if r["exact_duplicate"]} == {"img-002", "img-002-again"}
    assert {r["group_size"] for r in rows if r["group_id"] == 1} == {3}
    assert {(r["model_name"], r["model_version"], r["threshold"]) for r in rows} == {(*model, 0.95)}
    assert found.images == 34 and found.groups == 3

    from deltalake import DeltaTable

    stored = DeltaTable(str(output / "duplicates")).to_pyarrow_dataset().to_table()
    assert stored.num_rows == 7 and stored.schema.equals(found.table.schema)
    assert set(stored.column("current_version").to_pylist()) == {0}


def test_unrelated_images_make_no_group_and_a_rerun_replaces_the_table(planted, tiny_ref):
    output, model = planted
    index.find_duplicates(str(output), model, threshold=0.95)
    write_current(output, _image_rows(output, distinct_pictures(40, seed=5)), model)

    found = index.find_duplicates(str(output), model, threshold=0.95)

    assert found.table.num_rows == 0 and found.groups == 0 and found.images == 40
    from deltalake import DeltaTable

    assert DeltaTable(str(output / "duplicates")).to_pyarrow_dataset().count_rows() == 0
    # and far below the unrelated pictures' similarity, everything is one group
    loose = index.find_duplicates(str(output), model, threshold=0.05, neighbours=39)
    assert loose.groups >= 1 and loose.table.num_rows > 30


def test_duplicates_command_writes_the_table_and_a_sheet_of_the_largest_groups(planted, tiny_ref):
    output, _ = planted
    folder, _ = tiny_ref
    config = output / "dup.yaml"
    config.write_text(f"output: {output}\nmodel: {folder}\nthreshold: 0.95\n")
    r = mumic("duplicates", "--config", str(config), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["groups"], summary["images_in_groups"], summary["exact_duplicates"]) == (3, 7, 2)
    assert "mumic duplicates:" in r.stderr  # progress, on stderr
    html = Path(summary["sheet"]).read_text()
    assert Path(summary["sheet"]) == output / "reports" / "duplicates.html"
    assert html.count("data:image/jpeg;base64,") == 7 and html.count("same bytes</span>") == 2
    assert html.index("group 1: 3 images") < html.index("group 2: 2 images") < html.index("group 3: 2 images")


def test_bad_arguments_are_one_line_errors(tmp_path, tiny_ref, capsys):
    from jobs import cli

    folder, _ = tiny_ref
    cases = (
        (["--threshold", "1.5"], 2, "--threshold: Input should be less than or equal to 1"),
        (["--threshold", "0"], 2, "--threshold: Input should be greater than 0"),
        (["--neighbours", "0"], 2, "--neighbours: Input should be greater than or equal to 1"),
        (["--model", folder], 1, "no current table"),
        ([], 1, "no committed run"),
    )
    for extra, code, say in cases:
        assert cli.main(["duplicates", "--output", str(tmp_path), *extra]) == code, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mumic: error:") and say in err, err


def test_duplicates_help_says_the_threshold_is_a_cosine_similarity(capsys):
    from jobs import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["duplicates", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: mumic duplicates" in out and "cosine similarity" in out and "--config" in out


def test_the_documented_duplicates_query_runs_as_written(planted):
    output, model = planted
    index.find_duplicates(str(output), model, threshold=0.95)
    blocks = re.findall(r"^```python duplicates\n(.*?)^```", (ROOT / "docs" / "output-tables.md").read_text(), re.M | re.S)
    assert len(blocks) == 1, "docs/output-tables.md has one ```python duplicates block"
    code = re.sub(r'^output = "[^"]*"', f"output = {str(output)!r}", blocks[0], count=1, flags=re.M)
    code += "\nprint(groups.to_json(orient='records'))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]  # its own process, checked by exit code
    groups = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(g["group_id"], g["images"], g["same_bytes"]) for g in groups] == [(1, 3, 0), (2, 2, 0), (3, 2, 2)]
    assert groups[0]["first_image"] == "img-000"
