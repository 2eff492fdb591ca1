"""The retag stages one by one, without Ray: catalog → fetch → decode → infer → tables."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mumic_core import scoring, synthetic
from pipelines import tables
from pipelines.retag import catalog, commit, decode, fetch, infer
from pipelines.retag.staging import PartWriter, RunStaging, StagedPart

# ---- helpers --------------------------------------------------------------------------------------------


def jpeg_bytes(seed: int = 0) -> bytes:
    img, _ = synthetic.make_image(np.random.default_rng(seed))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def catalog_table(rows: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"image_id": [r[0] for r in rows], "uri": [r[1] for r in rows]})


def collect(batches) -> pa.Table:
    return pa.Table.from_batches(list(batches), schema=catalog.CATALOG_SCHEMA)


# ---- catalog --------------------------------------------------------------------------------------------


def test_catalog_manifest_resolves_relative_uris_against_the_catalog_folder(tmp_path):
    folder = tmp_path / "cats"
    folder.mkdir()
    pq.write_table(
        catalog_table(
            [
                ("a", "images/a.jpg"),
                ("b", "/abs/b.jpg"),
                ("c", "file:///abs/c%20d.jpg"),
                ("d", "s3://bucket/k/d.jpg"),
            ]
        ),
        folder / "catalog.parquet",
    )
    out = collect(catalog.iter_catalog(str(folder / "catalog.parquet"))).to_pydict()
    assert out["image_id"] == ["a", "b", "c", "d"]
    assert out["uri"] == [str(folder / "images/a.jpg"), "/abs/b.jpg", "/abs/c d.jpg", "s3://bucket/k/d.jpg"]


def test_catalog_csv_manifest_keeps_ids_as_strings(tmp_path):
    (tmp_path / "c.csv").write_text("uri,image_id,extra\nx/1.jpg,007,foo\nx/2.jpg,8,bar\n")
    out = collect(catalog.iter_catalog(str(tmp_path / "c.csv"))).to_pydict()
    assert out["image_id"] == ["007", "8"]
    assert out["uri"] == [str(tmp_path / "x/1.jpg"), str(tmp_path / "x/2.jpg")]


def test_catalog_without_a_uri_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "path": ["a.jpg"]}), tmp_path / "c.parquet")
    with pytest.raises(catalog.CatalogError, match=r"no column\(s\) uri .*it has: image_id, path"):
        list(catalog.iter_catalog(str(tmp_path / "c.parquet")))


def test_catalog_with_an_empty_image_id_is_a_clear_error(tmp_path):
    (tmp_path / "c.csv").write_text("image_id,uri\na,a.jpg\n ,b.jpg\n")
    with pytest.raises(catalog.CatalogError, match="data row 2 has an empty image_id"):
        list(catalog.iter_catalog(str(tmp_path / "c.csv")))


def test_catalog_snapshot_refuses_duplicate_image_ids_naming_them(tmp_path):
    batches = [
        pa.record_batch(catalog_table([("a", "/x/a"), ("b", "/x/b")]).to_batches()[0]),
        pa.record_batch(catalog_table([("c", "/x/c"), ("a", "/x/a2")]).to_batches()[0]),
    ]
    with pytest.raises(
        catalog.CatalogError, match=r"1 image_id value\(s\) appear more than once \(e.g. 'a'\)"
    ):
        catalog.write_snapshot(batches, str(tmp_path / "snap"))


def test_catalog_snapshot_round_trips_and_can_leave_out_staged_ids(tmp_path):
    rows = [(f"id{i}", f"/x/{i}.jpg") for i in range(10)]
    batches = catalog_table(rows).to_batches(max_chunksize=3)
    snap = catalog.write_snapshot(batches, str(tmp_path / "snap"), rows_per_file=4)
    assert snap.num_rows == 10 and len(snap.files) == 2  # a file is closed once it holds >= 4 rows
    back = collect(catalog.read_snapshot(snap.files))
    assert back.column("image_id").to_pylist() == [r[0] for r in rows]
    rest = collect(catalog.without_ids(catalog.read_snapshot(snap.files), pa.array(["id0", "id5", "id9"])))
    assert rest.column("image_id").to_pylist() == ["id1", "id2", "id3", "id4", "id6", "id7", "id8"]


def test_catalog_folder_listing_streams_every_image_file_with_id_relative_to_the_folder(tmp_path):
    for rel in ("a.jpg", "sub/b.PNG", "sp ace/ünï café.jpg", "notes.txt", "sub/deeper/c.webp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    gen = catalog.iter_catalog(str(tmp_path), batch_rows=2)
    assert iter(gen) is gen  # a generator: the listing is produced as it is walked
    batches = list(gen)
    assert [b.num_rows for b in batches] == [2, 2]
    out = collect(batches).to_pydict()
    assert sorted(out["image_id"]) == ["a.jpg", "sp ace/ünï café.jpg", "sub/b.PNG", "sub/deeper/c.webp"]
    assert all(u == str(tmp_path / i) for i, u in zip(out["image_id"], out["uri"], strict=True))


def test_catalog_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(catalog.CatalogError, match="no image files under"):
        list(catalog.iter_catalog(str(tmp_path)))


def test_catalog_s3_prefix_listing_is_paginated_and_stays_under_the_prefix(s3_bucket):
    import boto3

    client = boto3.client("s3")
    for key in ("imgs/a.jpg", "imgs/b.jpg", "imgs/sub/c.jpg", "imgs/sub/d.gif", "imgs/e.txt", "imgs2/x.jpg"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    batches = list(catalog.iter_listing(f"s3://{s3_bucket}/imgs", page_size=2))
    out = collect(batches).to_pydict()
    assert out["image_id"] == ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.gif"]
    assert out["uri"][2] == f"s3://{s3_bucket}/imgs/sub/c.jpg"


# ---- fetch ----------------------------------------------------------------------------------------------


def test_fetch_reads_local_files_and_turns_missing_ones_into_not_found_rows(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    batch = catalog_table([("a", str(tmp_path / "a.jpg")), ("m", str(tmp_path / "missing.jpg"))])
    out = fetch.fetch_batch(batch).to_pydict()
    assert out["data"] == [b"abc", None]
    assert out["status"] == [None, "error"]
    assert out["error"][0] is None and out["error"][1].startswith("not_found: ")


def test_fetch_refuses_files_above_max_bytes(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    out = fetch.fetch_batch(
        catalog_table([("big", str(tmp_path / "big.jpg"))]), fetch.FetchOptions(max_bytes=10)
    )
    assert out.column("error")[0].as_py().startswith("too_large: ")


def test_fetch_from_s3_reads_keys_with_spaces_and_unicode_and_reports_missing_keys(s3_bucket):
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="dir with space/ünï café.jpg", Body=b"\xff\xd8hello")
    batch = catalog_table(
        [
            ("u", f"s3://{s3_bucket}/dir with space/ünï café.jpg"),
            ("m", f"s3://{s3_bucket}/nope.jpg"),
        ]
    )
    out = fetch.fetch_batch(batch).to_pydict()
    assert out["data"] == [b"\xff\xd8hello", None]
    assert out["error"][1] == f"not_found: s3://{s3_bucket}/nope.jpg"
    assert "testing-secret-never-logged" not in json.dumps(out["error"])


# ---- decode ---------------------------------------------------------------------------------------------


def fetched(rows: list[tuple[str, bytes | None, str | None]]) -> pa.Table:
    return pa.table(
        {
            "image_id": [r[0] for r in rows],
            "uri": [f"/x/{r[0]}" for r in rows],
            "data": pa.array([r[1] for r in rows], pa.large_binary()),
            "status": pa.array([None if r[2] is None else "error" for r in rows], pa.string()),
            "error": pa.array([r[2] for r in rows], pa.string()),
        }
    )


def test_decode_produces_uint8_pixels_and_the_sha256_of_the_raw_bytes():
    data = [jpeg_bytes(1), jpeg_bytes(2)]
    out = decode.decode_batch(fetched([("a", data[0], None), ("b", data[1], None)]), 64)
    assert "data" not in out.column_names
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert out.column("content_sha256").to_pylist() == [hashlib.sha256(d).hexdigest() for d in data]
    ok, pixels = decode.pixels_of(out, 64)
    assert ok.tolist() == [True, True] and pixels.shape == (2, 3, 64, 64) and pixels.dtype == np.uint8
    from mumic_core.images import load_for_model

    np.testing.assert_array_equal(pixels[1], load_for_model(data[1], 64))


def test_decode_keeps_error_rows_flowing_with_a_reason():
    good = jpeg_bytes(3)
    batch = fetched(
        [
            ("missing", None, "not_found: /x/missing"),
            ("text", b"hello, I am not an image", None),
            ("good", good, None),
            ("empty", b"", None),
        ]
    )
    out = decode.decode_batch(batch, 64).to_pydict()
    assert out["status"] == ["error", "error", "ok", "error"]
    assert out["error"][0] == "not_found: /x/missing"
    assert out["error"][1].startswith("not_an_image: ")
    assert out["error"][2] is None
    assert out["error"][3].startswith("empty: ")
    assert out["content_sha256"][0] is None and out["content_sha256"][2] == hashlib.sha256(good).hexdigest()
    ok, pixels = decode.pixels_of(decode.decode_batch(batch, 64), 64)
    assert ok.tolist() == [False, False, True, False] and pixels.shape == (1, 3, 64, 64)


def test_decode_marks_content_already_tagged_ok_as_skipped_without_decoding_it():
    a, b = jpeg_bytes(4), jpeg_bytes(5)
    known = decode.KnownDigests.from_hex([pa.array([hashlib.sha256(a).hexdigest(), "0" * 64])])
    out = decode.decode_batch(fetched([("a", a, None), ("b", b, None)]), 64, known=known)
    assert out.column("status").to_pylist() == ["skipped", "ok"]
    assert out.column("content_sha256")[0].as_py() == hashlib.sha256(a).hexdigest()
    assert out.column("pixels")[0].as_py() == b""  # no pixels shipped for a skipped row


def test_known_digests_convert_hex_without_per_row_python_and_find_members():
    values = [hashlib.sha256(bytes([i])).hexdigest() for i in range(50)]
    known = decode.KnownDigests.from_hex([pa.array(values[:25] + [None]), pa.chunked_array([values[25:40]])])
    assert len(known) == 40
    probe = decode.digests_from_hex(pa.array(values))
    assert probe[0] == hashlib.sha256(bytes([0])).digest()
    assert known.contains(probe).tolist() == [True] * 40 + [False] * 10


# ---- infer ----------------------------------------------------------------------------------------------


def test_select_labels_keeps_labels_above_their_threshold_plus_the_top_k_best_first():
    scores = np.array([[0.1, 0.9, 0.6, 0.3], [0.2, 0.1, 0.05, 0.15]], np.float32)
    thresholds = np.array([0.5, 0.5, 0.5, 0.25], np.float32)
    idx, sel, counts = scoring.select_labels(scores, thresholds, top_k=1)
    # row 0: 1 (0.9, top-1 and above), 2 (0.6 >= 0.5), 3 (0.3 >= 0.25); row 1: only its top-1, label 0
    assert counts.tolist() == [3, 1]
    assert idx.tolist() == [1, 2, 3, 0]
    np.testing.assert_allclose(sel, [0.9, 0.6, 0.3, 0.2])
    idx0, _, counts0 = scoring.select_labels(scores, np.ones(4, np.float32), top_k=0)
    assert counts0.tolist() == [0, 0] and len(idx0) == 0


def test_predictor_outputs_scores_per_label_chosen_labels_and_unit_embeddings(
    tiny_model_dir, tiny_model_untrained
):
    data = [jpeg_bytes(6), jpeg_bytes(7)]
    batch = decode.decode_batch(
        fetched([("a", data[0], None), ("x", None, "not_found: /x/x"), ("b", data[1], None)]), 64
    )
    pred = infer.Predictor(str(tiny_model_dir), top_k=3)
    out = pred(batch)
    assert "pixels" not in out.column_names
    rows = out.to_pylist()
    assert rows[1]["scores"] is None and rows[1]["labels"] is None and rows[1]["embedding"] is None
    _, pixels = decode.pixels_of(batch, 64)
    expected = tiny_model_untrained.score(pixels).numpy()
    names = tiny_model_untrained.taxonomy.names
    for row, exp in zip((rows[0], rows[2]), expected, strict=True):
        np.testing.assert_allclose(row["scores"], exp, rtol=1e-4, atol=1e-5)
        assert len(row["embedding"]) == tiny_model_untrained.embed_dim
        assert abs(np.linalg.norm(row["embedding"]) - 1.0) < 1e-4
        got = [(lb["label"], lb["score"]) for lb in row["labels"]]
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
        above = {n for n, s in zip(names, exp, strict=True) if s >= 0.5}
        top3 = {names[i] for i in np.argsort(-exp)[:3]}
        assert {n for n, _ in got} == above | top3
    assert out.schema.field("labels").type == tables.LABELS_TYPE


# ---- tables ---------------------------------------------------------------------------------------------


def pipeline_output(ids: list[str], statuses: list[str]) -> pa.Table:
    """Rows shaped like the infer stage's output."""
    n, ok = len(ids), [s == "ok" for s in statuses]
    return pa.table(
        {
            "image_id": ids,
            "uri": [f"/x/{i}.jpg" for i in ids],
            "content_sha256": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
            "status": statuses,
            "error": [None if s != "error" else "not_found: x" for s in statuses],
            "labels": pa.array(
                [[{"label": "red", "score": 0.9}] if o else None for o in ok], tables.LABELS_TYPE
            ),
            "scores": pa.array([[0.9, 0.1] if o else None for o in ok], tables.FLOATS_TYPE),
            "embedding": pa.array([[0.6, 0.8] if o else None for o in ok], tables.FLOATS_TYPE),
            "processed_at": pa.array([0] * n, tables.UTC_TS),
        }
    )


CONSTANTS = {"model_name": "m", "model_version": "v1", "taxonomy_sha256": "t" * 64, "run_id": "r1"}


def staged_run(output: Path, rows_per_part: int) -> tuple[RunStaging, list[StagedPart]]:
    staging = RunStaging(str(output), "r1")
    writer = PartWriter(staging, "2026-01-02", CONSTANTS, rows_per_part)
    ids = [f"i{k}" for k in range(7)]
    statuses = ["ok", "ok", "error", "skipped", "ok", "ok", "skipped"]
    writer.add(pipeline_output(ids[:5], statuses[:5]))
    writer.add(pipeline_output(ids[5:], statuses[5:]))
    writer.flush()
    return staging, writer.parts


def run_row(counts: dict) -> dict:
    return {
        "run_id": "r1",
        "run_date": "2026-01-02",
        "started_at": "2026-01-02T01:00:00+00:00",
        "finished_at": "2026-01-02T01:05:00+00:00",
        "model_name": "m",
        "model_version": "v1",
        "taxonomy": json.dumps(["red", "blue"]),
        "catalog": "/x/catalog.parquet",
        **counts,
    }


def test_staged_parts_stay_invisible_until_the_run_commits_them_in_one_transaction(tmp_path):
    staging, parts = staged_run(tmp_path, rows_per_part=3)
    assert [p.rows_ok + p.rows_error + p.rows_skipped for p in parts] == [3, 3, 1]
    assert sum(p.rows_skipped for p in parts) == 2 and sum(p.rows_error for p in parts) == 1
    assert [p.seq for p in staging.parts()] == [1, 2, 3]  # every part has its record
    assert sorted(staging.staged_ids(parts).to_pylist()) == [f"i{k}" for k in range(7)]
    tags_uri = str(tmp_path / "tags")
    assert tables.open_table(tags_uri) is None  # data files exist, but no table sees them
    before = tables.open_or_create(tags_uri, tables.TAGS_SCHEMA, ["run_date"]).version()
    assert tables.open_table(tags_uri).to_pyarrow_table().num_rows == 0

    version = commit.commit_run(tags_uri, "r1", "2026-01-02", parts, run_row({}))
    assert version == before + 1
    table = tables.open_table(tags_uri).to_pyarrow_table()
    assert table.schema.names == tables.TAGS_SCHEMA.names
    assert sorted(table.column("image_id").to_pylist()) == ["i0", "i1", "i2", "i4", "i5"]  # skipped: not rows
    assert set(table.column("run_id").to_pylist()) == {"r1"} and set(
        table.column("run_date").to_pylist()
    ) == {"2026-01-02"}
    assert commit.is_committed(tags_uri, "r1") and not commit.is_committed(tags_uri, "r2")
    # per-file stats let readers prune by run / status
    dt = tables.open_table(tags_uri)
    assert dt.to_pyarrow_dataset().to_table(filter=pa.compute.field("status") == "error").num_rows == 1


def test_committing_an_already_committed_run_id_adds_nothing(tmp_path):
    _, parts = staged_run(tmp_path, rows_per_part=100)
    tags_uri = str(tmp_path / "tags")
    first = commit.commit_run(tags_uri, "r1", "2026-01-02", parts, run_row({}))
    assert commit.commit_run(tags_uri, "r1", "2026-01-02", parts, run_row({})) is None
    dt = tables.open_table(tags_uri)
    assert dt.version() == first and dt.to_pyarrow_table().num_rows == 5


def test_runs_row_is_written_once_and_can_be_rebuilt_from_the_tags_commit(tmp_path):
    _, parts = staged_run(tmp_path, rows_per_part=100)
    row = run_row({"rows_ok": 4, "rows_error": 1, "rows_skipped": 2})
    commit.commit_run(str(tmp_path / "tags"), "r1", "2026-01-02", parts, row)
    assert commit.run_row_from_history(str(tmp_path / "tags"), "r1") == row
    runs_uri = str(tmp_path / "runs")
    assert commit.ensure_run_row(runs_uri, row) is True
    assert commit.ensure_run_row(runs_uri, row) is False
    runs = tables.open_table(runs_uri).to_pyarrow_table()
    assert runs.schema.names == tables.RUNS_SCHEMA.names and runs.num_rows == 1
    assert runs.to_pylist()[0]["rows_skipped"] == 2 and json.loads(runs.to_pylist()[0]["taxonomy"]) == [
        "red",
        "blue",
    ]


def test_part_writer_bounds_its_buffer_by_bytes_as_well_as_rows(tmp_path):
    staging = RunStaging(str(tmp_path), "r1")
    writer = PartWriter(staging, "2026-01-02", CONSTANTS, rows_per_part=1000, max_part_bytes=1)
    flushed = [len(writer.add(pipeline_output([f"a{k}", f"b{k}"], ["ok", "error"]))) for k in range(3)]
    assert flushed == [1, 1, 1] and writer.flush() is None  # every batch went straight to a part
    assert [p.rows_ok + p.rows_error for p in staging.parts()] == [2, 2, 2]


def test_plan_uses_one_single_threaded_actor_per_core_and_keeps_a_cpu_for_io():
    from pipelines.retag import RetagOptions, plan_resources

    plan = plan_resources({"CPU": 2.0}, RetagOptions())
    assert (plan.actors, plan.actor_gpus, plan.torch_threads) == (2, 0.0, 1)
    assert plan.actors * plan.actor_cpus <= 1.0 + 1e-9  # one logical CPU left for read/fetch tasks


def test_a_run_starts_no_more_inference_actors_than_it_has_batches():
    from pipelines.retag import RetagOptions, plan_resources
    from pipelines.retag.dataset import actor_pool_size

    plan = plan_resources({"CPU": 16.0, "GPU": 4.0}, RetagOptions())
    assert [actor_pool_size(plan, rows, 256) for rows in (1, 256, 257, 700, 1024, 10**6)] == [1, 1, 2, 3, 4, 4]


def test_plan_puts_one_actor_on_each_gpu_and_can_ask_for_gpus_before_the_autoscaler_adds_them():
    from pipelines.retag import RetagOptions, plan_resources

    present = plan_resources({"CPU": 16.0, "GPU": 4.0}, RetagOptions())
    assert (present.actors, present.actor_gpus) == (4, 1.0)
    scaling = plan_resources({"CPU": 2.0}, RetagOptions(gpus=3))  # a CPU head, GPU workers at 0 replicas
    assert (scaling.actors, scaling.actor_gpus) == (3, 1.0)


# ---- decode: hostile input ------------------------------------------------------------------------------


def png_by_hand(width: int, height: int, bit_depth: int, scanline: bytes) -> bytes:
    """A grayscale PNG of one repeated scanline (filter byte included), any depth and size."""
    import struct
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    idat = zlib.compress(scanline * height, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decode_batch_gives_each_hostile_image_its_own_row_status_and_never_raises(monkeypatch):
    from mumic_core import images

    png16 = png_by_hand(2000, 1500, 16, b"\x00" + b"\xc0\x00" * 2000)  # 16-bit grey, a few KB on disk
    sliver = png_by_hand(1, 5000, 8, b"\x00\x00")  # 1x5000: far past the aspect-ratio limit
    plugin_bomb = jpeg_bytes(7)  # a valid file whose decoder raises something that is not Pillow's
    real_load = images._load

    def faulty_load(img, data):
        if data == plugin_bomb:
            raise RuntimeError("decoder plugin crashed")
        return real_load(img, data)

    monkeypatch.setattr(images, "_load", faulty_load)  # fault injection into the one decode path
    batch = fetched(
        [
            ("good-1", jpeg_bytes(6), None),
            ("sixteen-bit", png16, None),
            ("plugin-bomb", plugin_bomb, None),
            ("sliver", sliver, None),
            ("good-2", jpeg_bytes(8), None),
        ]
    )
    out = decode.decode_batch(batch, 64).to_pydict()
    assert out["status"] == ["ok", "ok", "error", "error", "ok"]
    assert out["error"][2].startswith("corrupt: unexpected RuntimeError: decoder plugin crashed")
    assert out["error"][3].startswith("unsupported: PNG 1x5000: aspect ratio 5000:1")
    assert all(e is None or "\n" not in e for e in out["error"])
    ok, pixels = decode.pixels_of(decode.decode_batch(batch, 64), 64)
    assert ok.tolist() == [True, True, False, False, True]
    assert int(pixels[1].min()) == int(pixels[1].max()) == 0xC0  # the 16-bit grey, its top 8 bits
