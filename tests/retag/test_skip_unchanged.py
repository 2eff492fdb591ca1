"""Unchanged images cost no download: a catalog row whose image_id, uri, size and ETag (S3) or
modification time (local) are those of its `current` row, tagged ok by this model version, is skipped
before any GET — and every guarantee stays: exactly once, resume, prune, content-hash skips for copies."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import job_env
from deltalake import CommitProperties, DeltaTable

from mumic_core import synthetic
from pipelines import tables
from pipelines.retag import catalog, run_retag, unchanged
from pipelines.retag.fetch import FetchOptions, fetch_batch
from pipelines.retag.staging import parquet_bytes
from pipelines.storage import files

ROOT = Path(__file__).resolve().parents[2]
N = 10
UTC = dt.UTC


def retag(catalog_uri: Path | str, model: Path | str, output: Path | str, **kw) -> dict:
    return run_retag(str(catalog_uri), str(model), str(output), progress=False, **kw)


def current_of(output: Path | str) -> dict[str, dict]:
    return {r["image_id"]: r for r in tables.open_table(str(output) + "/current").to_pyarrow_table().to_pylist()}


def tags_of(output: Path | str, run_id: str) -> dict[str, dict]:
    rows = tables.open_table(str(output) + "/tags").to_pyarrow_table().to_pylist()
    return {r["image_id"]: r for r in rows if r["run_id"] == run_id}


def rewrite(path: Path, data: bytes, keep_mtime: bool = False) -> None:
    """New bytes in place; the modification time kept (a lie to the listing), or moved 2 s on."""
    st = path.stat()
    path.write_bytes(data)
    ns = st.st_mtime_ns if keep_mtime else st.st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(ns, ns))


def same_size_other_bytes(data: bytes) -> bytes:
    """The same number of bytes, one of them different (inside the JPEG's scan data: it still decodes)."""
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def exactly_once(output: Path | str, run_id: str, summary: dict, catalog_ids: set[str]) -> None:
    """Every catalog row is a tags row of the run or counted skipped, none twice, each in current."""
    tagged = tags_of(output, run_id)
    (run,) = [r for r in tables.open_table(str(output) + "/runs").to_pyarrow_table().to_pylist() if r["run_id"] == run_id]
    assert set(tagged) <= catalog_ids and len(tagged) + run["rows_skipped"] == len(catalog_ids)
    assert (run["rows_ok"] + run["rows_error"], run["rows_skipped"]) == (len(tagged), summary["rows_skipped"])
    now = current_of(output)
    assert catalog_ids <= set(now) and all(now[i]["last_seen_run_id"] == run_id for i in catalog_ids)


# ---- the index and the catalog's object columns, without Ray ----------------------------------------------


def batch_of(rows: list[tuple]) -> pa.RecordBatch:
    return catalog._listed(rows)


def test_known_objects_say_unchanged_only_for_the_same_id_uri_size_and_etag_or_mtime():
    t = 1_700_000_000_000_000
    known = unchanged.KnownObjects.from_batches([batch_of([
        ("a", "s3://b/a.jpg", 10, "e1", None),
        ("b", "s3://b/b.jpg", 10, "e2", None),
        ("c", "/x/c.jpg", 20, None, t),
        ("d", "/x/d.jpg", None, None, None),  # current holds it, but not what it was listed as
    ])])
    assert len(known) == 4 and known.nbytes == 4 * 24
    now = batch_of([
        ("a", "s3://b/a.jpg", 10, "e1", None),  # unchanged
        ("b", "s3://b/b.jpg", 10, "e9", None),  # rewritten with the same size: new ETag
        ("c", "/x/c.jpg", 20, None, t + 1),  # touched
        ("c2", "/x/c.jpg", 20, None, t),  # another id for the same file: not its row
        ("a", "s3://b/moved.jpg", 10, "e1", None),  # moved
        ("d", "/x/d.jpg", None, None, None),  # a manifest row that says nothing: ask the store
        ("a", "s3://b/a.jpg", None, None, None),  # idem, current knows what it was
        ("e", "/x/e.jpg", 5, None, t),  # new
    ])
    same, expect = known.classify(now)
    assert same.tolist() == [True, False, False, False, False, False, False, False]
    asked = pc.is_valid(expect).to_pylist()
    assert asked == [False, False, False, False, False, True, True, False]
    assert expect[5].as_py() == unchanged.UNKNOWN  # nothing to compare with: the metadata request only learns
    listed_a = unchanged.meta_of(batch_of([("a", "s3://b/a.jpg", 10, "e1", None)]))[0]
    assert expect[6].as_py() == listed_a != unchanged.UNKNOWN


def test_the_split_stages_unchanged_rows_as_skipped_unread_and_passes_on_the_rest():
    known = unchanged.KnownObjects.from_batches([batch_of([("a", "/x/a", 1, "e", None), ("b", "/x/b", 2, "e", None)])])
    staged: list[pa.Table] = []
    rest = list(unchanged.split([batch_of([("a", "/x/a", 1, "e", None), ("b", "/x/b", 3, "e", None)])], known, staged.append))
    (skipped,) = staged
    assert skipped.column("image_id").to_pylist() == ["a"] and skipped.column("status").to_pylist() == ["skipped"]
    assert skipped.column("content_sha256").null_count == 1  # never read: no hash of its own
    assert pa.Table.from_batches(rest).column("image_id").to_pylist() == ["b"]
    assert rest[0].schema == unchanged.TODO_SCHEMA


def test_a_folder_listing_carries_size_and_mtime_and_an_s3_listing_size_and_etag(tmp_path, s3_bucket):
    import boto3

    (tmp_path / "a.jpg").write_bytes(b"12345")
    os.utime(tmp_path / "a.jpg", ns=(1_700_000_000_123_456_789,) * 2)
    (row,) = pa.Table.from_batches(list(catalog.iter_catalog(str(tmp_path)))).to_pylist()
    assert (row["size"], row["etag"]) == (5, None)
    assert row["mtime"] == dt.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="imgs/a.jpg", Body=b"123")
    (row,) = pa.Table.from_batches(list(catalog.iter_catalog(f"s3://{s3_bucket}/imgs"))).to_pylist()
    assert (row["size"], row["etag"], row["mtime"]) == (3, hashlib.md5(b"123").hexdigest(), None)  # no quotes


def test_a_manifest_may_say_size_etag_and_mtime_and_a_wrong_type_is_one_line(tmp_path):
    (tmp_path / "c.csv").write_text('image_id,uri,size,etag,mtime\na,a.jpg,12,"""abc""",2026-11-30T01:02:03Z\nb,b.jpg,,,\n')
    rows = pa.Table.from_batches(list(catalog.iter_catalog(str(tmp_path / "c.csv")))).to_pylist()
    assert [(r["size"], r["etag"]) for r in rows] == [(12, "abc"), (None, None)]
    assert rows[0]["mtime"] == dt.datetime(2026, 11, 30, 1, 2, 3, tzinfo=UTC) and rows[1]["mtime"] is None
    pq.write_table(pa.table({"image_id": ["a"], "uri": ["a.jpg"], "size": ["big"]}), tmp_path / "c.parquet")
    with pytest.raises(catalog.CatalogError, match="column size holds string, not int64"):
        list(catalog.iter_catalog(str(tmp_path / "c.parquet")))


def test_leaving_out_staged_ids_is_one_join_that_keeps_the_order(tmp_path):
    n = 200_000
    ids = pa.array([f"img-{i:07d}" for i in range(n)])
    snap = catalog.write_snapshot(pa.table({"image_id": ids, "uri": ids}).to_batches(max_chunksize=7_000), str(tmp_path / "s"))
    exclude = ids.filter(pa.array(np.arange(n) % 3 == 0))
    rest = pa.Table.from_batches(list(catalog.without_ids(catalog.read_snapshot(snap.files), exclude)))
    assert rest.column("image_id").to_pylist() == [f"img-{i:07d}" for i in range(n) if i % 3]
    assert rest.schema == catalog.CATALOG_SCHEMA


def test_a_metadata_request_skips_an_unchanged_local_file_unread_and_reads_a_changed_one(tmp_path):
    for name, data in (("same.jpg", b"same"), ("moved.jpg", b"old")):
        (tmp_path / name).write_bytes(data)
    known = unchanged.KnownObjects.from_batches(list(catalog.iter_catalog(str(tmp_path))))
    rewrite(tmp_path / "moved.jpg", b"OLD")  # same size, moved on in time
    (tmp_path / "new.jpg").write_bytes(b"new")
    manifest = pa.table({"image_id": ["same.jpg", "moved.jpg", "new.jpg"], "uri": [str(tmp_path / n) for n in ("same.jpg", "moved.jpg", "new.jpg")]})
    batch = catalog.conform(manifest.to_batches()[0])
    _, expect = known.classify(batch)
    out = fetch_batch(pa.Table.from_batches([batch]).append_column(unchanged.EXPECT, expect), FetchOptions(roots=(str(tmp_path),)))
    assert out.column("status").to_pylist() == ["skipped", None, None]
    assert out.column("data").to_pylist() == [None, b"OLD", b"new"]
    assert unchanged.EXPECT not in out.column_names
    assert out.column("size").to_pylist() == [4, 3, None]  # what the stat said, for current to keep
    # outside the allowed folders a file is never even stat'ed as unchanged: it is read, and refused
    out = fetch_batch(pa.Table.from_batches([batch]).append_column(unchanged.EXPECT, expect), FetchOptions(roots=("/elsewhere",)))
    assert [e.split(":")[0] for e in out.column("error").to_pylist()] == ["forbidden"] * 3


def test_a_head_request_skips_an_unchanged_s3_object_without_a_get(s3_server, fault_proxy):
    import boto3

    bucket = f"head-{uuid.uuid4().hex[:8]}"
    direct = boto3.client("s3", endpoint_url=s3_server)
    direct.create_bucket(Bucket=bucket)
    for key, body in (("same.jpg", b"same"), ("changed.jpg", b"aaaa")):
        direct.put_object(Bucket=bucket, Key=key, Body=body)
    known = unchanged.KnownObjects.from_batches(list(catalog.iter_catalog(f"s3://{bucket}/")))
    direct.put_object(Bucket=bucket, Key="changed.jpg", Body=b"bbbb")  # same size, new ETag
    fault_proxy.clear()
    uris = [f"s3://{bucket}/same.jpg", f"s3://{bucket}/changed.jpg"]
    batch = catalog.conform(pa.table({"image_id": ["same.jpg", "changed.jpg"], "uri": uris}).to_batches()[0])
    _, expect = known.classify(batch)
    out = fetch_batch(pa.Table.from_batches([batch]).append_column(unchanged.EXPECT, expect))
    assert out.column("data").to_pylist() == [None, b"bbbb"] and out.column("status").to_pylist() == ["skipped", None]
    assert [fault_proxy.count(k, "HEAD") for k in ("same.jpg", "changed.jpg")] == [1, 1]
    assert [fault_proxy.count(k, "GET") for k in ("same.jpg", "changed.jpg")] == [0, 1]


def test_the_content_hash_set_is_sorted_and_unique_even_where_hashes_share_their_first_bytes():
    from pipelines.retag.decode import KnownDigests

    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (300, 32), dtype=np.uint8)
    raw[:40, :8] = 7  # 40 distinct hashes with the same first 8 bytes, and 20 more sharing others
    raw[100:120, :8] = 9
    digests = raw.view("S32").reshape(-1)
    known = KnownDigests(np.concatenate([digests, digests[::3]]))  # with duplicates, as tags has them
    assert np.array_equal(known.digests, np.unique(digests))
    assert known.contains(digests).all() and not known.contains(rng.integers(0, 256, (50, 32), dtype=np.uint8).view("S32").reshape(-1)).any()


# ---- nights on a local folder ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def night1(tiny_model_dir, ray_cluster, tmp_path_factory):
    """A folder of N images and one file that is no image, tagged once (listing); the folder and output
    are copied, so each scenario starts from the same first night."""
    base = tmp_path_factory.mktemp("unchanged")
    folder = base / "cat"
    synthetic.write_dataset(folder, N, seed=41)
    (folder / "images" / "bad.jpg").write_bytes(b"not an image at all")
    summary = retag(folder, tiny_model_dir, base / "out", run_id="n1")
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_not_fetched"]) == (N, 1, 0)
    shutil.copytree(folder, base / "pristine")  # copy2: sizes and mtimes as listed on night 1
    return base


def fresh(night1: Path, dest: Path) -> tuple[Path, Path]:
    """The catalog folder as night 1 listed it (same path: current's uris point into it), and a copy of
    the output after night 1."""
    folder = night1 / "cat"
    shutil.rmtree(folder)
    shutil.copytree(night1 / "pristine", folder)
    shutil.copytree(night1 / "out", dest / "out")
    return folder, dest / "out"


def ids_of(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.jpg")}


def test_a_night_downloads_only_new_changed_and_failed_images(night1, tiny_model_dir, tmp_path):
    folder, out = fresh(night1, tmp_path)
    imgs = folder / "images"
    first = current_of(out)
    ids = sorted(i for i in ids_of(folder) if "bad" not in i)
    changed, lie, copied = (imgs / Path(ids[k]).name for k in (0, 1, 2))
    rewrite(changed, same_size_other_bytes(changed.read_bytes()))  # same size, new mtime: read again
    rewrite(lie, b"\0" * lie.stat().st_size, keep_mtime=True)  # size and mtime as listed: trusted, never read
    shutil.copy(copied, imgs / "copy.jpg")  # a renamed copy: read, then skipped by its content hash
    new = synthetic.write_dataset(tmp_path / "new", 1, seed=42)[0]
    shutil.copy(tmp_path / "new" / new["uri"], imgs / "new.jpg")

    two = retag(folder, tiny_model_dir, out, run_id="n2")
    assert two["rows_not_fetched"] == N - 1  # the nine unchanged (the lie among them): no GET
    assert two["rows_processed"] == 4 and two["rows_skipped"] == N - 1 + 1  # + the copy, by its hash
    tagged = tags_of(out, "n2")
    assert set(tagged) == {ids[0], "images/bad.jpg", "images/new.jpg"}
    assert tagged[ids[0]]["content_sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert tagged["images/bad.jpg"]["status"] == "error"  # failed last night: tried again
    now = current_of(out)
    assert now[ids[1]]["labels"] == first[ids[1]]["labels"] and now[ids[1]]["status"] == "ok"
    assert now["images/copy.jpg"]["labels"] == first[ids[2]]["labels"]
    mtime_us = pa.array([now[ids[0]]["mtime"]], tables.UTC_TS).cast(pa.int64())[0].as_py()
    assert mtime_us == changed.stat().st_mtime_ns // 1000
    assert all(now[i]["size"] == (folder / i).stat().st_size for i in ids_of(folder) if "bad" not in i)
    exactly_once(out, "n2", two, ids_of(folder))

    (imgs / Path(ids[3]).name).unlink()
    (imgs / "bad.jpg").unlink()
    three = retag(folder, tiny_model_dir, out, run_id="n3", prune=True)  # nothing to read: no pipeline at all
    assert (three["rows_not_fetched"], three["rows_processed"], three["rows_ok"]) == (N + 1, 0, 0)
    assert set(current_of(out)) == ids_of(folder)  # --prune dropped the two files that are gone
    exactly_once(out, "n3", three, ids_of(folder))


def test_a_new_model_version_downloads_everything_again(night1, tiny_model_dir, tmp_path):
    folder, out = fresh(night1, tmp_path)
    model = tmp_path / "v2" / tiny_model_dir.name  # same name, another version
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "version": "v2"}))
    summary = retag(folder, model, out, run_id="v2")
    assert (summary["rows_not_fetched"], summary["rows_processed"], summary["rows_ok"]) == (0, N + 1, N)
    assert summary["model_version"] == "v2"
    again = retag(folder, tiny_model_dir, out, run_id="back")  # current now holds v2's labels: read again
    assert again["rows_not_fetched"] == 0 and again["rows_skipped"] == N  # ... and skipped by content hash


def test_a_manifest_without_object_columns_is_checked_with_a_stat_and_not_read(night1, tiny_model_dir, tmp_path):
    folder, out = fresh(night1, tmp_path)
    ids = sorted(ids_of(folder))
    manifest = folder / "catalog.parquet"
    pq.write_table(pa.table({"image_id": ids, "uri": ids}), manifest)  # same ids and uris as the listing
    touched = [i for i in ids if "bad" not in i][0]
    rewrite(folder / touched, same_size_other_bytes((folder / touched).read_bytes()))
    summary = retag(manifest, tiny_model_dir, out, run_id="m1")
    assert summary["rows_not_fetched"] == N - 1  # all but the touched one and bad.jpg (it failed)
    assert set(tags_of(out, "m1")) == {touched, "images/bad.jpg"}
    exactly_once(out, "m1", summary, set(ids))


def strip_object_columns(output: Path) -> None:
    """`current` as a release before the object columns wrote it: same rows, without size/etag/mtime."""
    path = str(output / "current")
    old = tables.open_table(path)
    data = old.to_pyarrow_dataset().to_table().drop_columns(list(tables.schema.OBJECT_COLUMNS))
    shutil.rmtree(path)
    table = DeltaTable.create(path, data.schema)
    name = "part-old.parquet"
    blob = parquet_bytes(data)
    files.write_bytes(f"{path}/{name}", blob)
    from deltalake.transaction import AddAction

    add = AddAction(name, len(blob), {}, 0, True, json.dumps({"numRecords": data.num_rows}))
    table.create_write_transaction([add], mode="append", schema=table.schema(), partition_by=[], commit_properties=CommitProperties())


def test_a_current_table_written_before_the_object_columns_gains_them_on_its_next_update(night1, tiny_model_dir, tmp_path):
    folder, out = fresh(night1, tmp_path)
    strip_object_columns(out)
    assert "size" not in tables.open_table(str(out / "current")).schema().to_arrow().names
    two = retag(folder, tiny_model_dir, out, run_id="n2")  # nothing to compare: read, skipped by hash
    assert (two["rows_not_fetched"], two["rows_skipped"], two["rows_error"]) == (0, N, 1)
    table = tables.open_table(str(out / "current"))
    assert tables.schema.OBJECT_COLUMNS == tuple(table.schema().to_arrow().names[-3:])
    assert DeltaTable(str(out / "current"), version=1).to_pyarrow_dataset().schema.names[-1] == "last_seen_at"
    three = retag(folder, tiny_model_dir, out, run_id="n3")
    assert three["rows_not_fetched"] == N  # every image but bad.jpg, unread
    exactly_once(out, "n3", three, ids_of(folder))


# ---- crashes ---------------------------------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def crash_at_first(unchanged_part: bool):
    def on_event(name: str, info: dict) -> None:
        if name == "staged" and bool(info.get("unchanged")) == unchanged_part:
            raise Crash(f"simulated crash after staging part {info['seq']}")

    return on_event


@pytest.mark.parametrize("where", ["while staging the unchanged rows", "in the pipeline, after the unchanged rows"])
def test_a_run_killed_mid_night_resumes_and_stages_every_row_once(where, night1, tiny_model_dir, tmp_path):
    folder, out = fresh(night1, tmp_path)
    ids = sorted(i for i in ids_of(folder) if "bad" not in i)
    for i in ids[:4]:  # touched: read again (and skipped by their hash)
        rewrite(folder / i, (folder / i).read_bytes())
    kw = {"run_id": "n2", "rows_per_part": 2, "batch_size": 2, "concurrency": 1}
    version = tables.open_table(str(out / "tags")).version()
    during_split = where.startswith("while")
    with pytest.raises(Crash):
        retag(folder, tiny_model_dir, out, on_event=crash_at_first(during_split), **kw)
    assert tables.open_table(str(out / "tags")).version() == version  # nothing committed
    summary = retag(folder, tiny_model_dir, out, **kw)
    # staged before the crash: the unchanged rows (three parts of 2, written from one catalog batch, the
    # crash at the first), and then, in the pipeline, at least the part the driver crashed on (its workers
    # may have staged more by then); the rest is read by the rerun, nothing twice
    pipeline_staged = summary["rows_resumed"] - (N - 4)
    assert summary["rows_not_fetched"] == N - 4
    assert pipeline_staged == 0 if during_split else 2 <= pipeline_staged <= 4 + 1
    assert summary["rows_processed"] == 4 + 1 - pipeline_staged  # touched + bad.jpg, less what was staged
    assert (summary["rows_skipped"], summary["rows_error"]) == (N, 1)
    exactly_once(out, "n2", summary, ids_of(folder))


# ---- S3: count the requests ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_s3_night_gets_only_the_objects_that_changed(s3_server, tiny_model_dir, ray_cluster, fault_proxy, tmp_path):
    """Night 1 in this process; night 2 as `mumic retag` (a job on the session's cluster whose runtime env
    points its workers at the fault proxy) through the proxy, which counts every request its Ray workers
    send: one GET per new or rewritten object, none for the rest, no HEAD."""
    import boto3

    direct = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"nights-{uuid.uuid4().hex[:8]}"
    direct.create_bucket(Bucket=bucket)
    rows = synthetic.write_dataset(tmp_path, 8, seed=43)
    for r in rows:
        direct.upload_file(str(tmp_path / r["uri"]), bucket, f"imgs/{r['image_id']}.jpg")
    prefix, output = f"s3://{bucket}/imgs", f"s3://{bucket}/out"
    assert retag(prefix, tiny_model_dir, output, run_id="n1")["rows_ok"] == 8
    first = f"imgs/{rows[0]['image_id']}.jpg"
    body = direct.get_object(Bucket=bucket, Key=first)["Body"].read()
    direct.put_object(Bucket=bucket, Key=first, Body=same_size_other_bytes(body))  # same size, new ETag
    direct.upload_file(str(tmp_path / rows[1]["uri"]), bucket, "imgs/new.jpg")
    fault_proxy.clear()
    env = job_env(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"])  # its workers count through the proxy
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "retag", "--catalog", prefix, "--model", str(tiny_model_dir),
         "--output", output, "--run-id", "n2", "--json", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    gets = {k: fault_proxy.count(k, "GET") for k in [f"imgs/{r['image_id']}.jpg" for r in rows] + ["imgs/new.jpg"]}
    assert gets == {k: int(k in (first, "imgs/new.jpg")) for k in gets}, gets
    assert sum(fault_proxy.count(k, "HEAD") for k in gets) == 0
    assert (summary["rows_not_fetched"], summary["rows_ok"], summary["rows_skipped"]) == (7, 1, 8)
    now = tables.open_table(f"{output}/current").to_pyarrow_table(columns=["image_id", "etag"]).to_pylist()
    etags = {r["image_id"]: r["etag"] for r in now}
    assert etags[first[len("imgs/") :]] == hashlib.md5(same_size_other_bytes(body)).hexdigest()


def test_the_same_size_rewrite_of_these_tests_is_still_a_jpeg():
    # else a "changed" image would become an error row rather than be tagged again
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="JPEG")
    other = same_size_other_bytes(buf.getvalue())
    assert len(other) == len(buf.getvalue()) and other != buf.getvalue()
    Image.open(io.BytesIO(other)).convert("RGB").load()
