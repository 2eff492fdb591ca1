"""`mumic retag` with everything on s3:// (catalog, images, model folder, output tables) in the local S3 server."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mumic_core import synthetic
from pipelines import tables

SECRET = "testing-secret-never-logged"  # the S3 fixture's secret key: must appear nowhere we write
N_IMAGES = 12


@pytest.fixture(scope="module")
def s3_catalog(s3_server, tiny_model_dir, tmp_path_factory):
    """A bucket holding images (one under a key with spaces and unicode), a Parquet catalog with uris
    relative to it (plus one missing object) and the model folder."""
    import uuid

    import boto3

    client = boto3.client("s3")
    bucket = f"retag-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    local = tmp_path_factory.mktemp("s3src")
    rows = synthetic.write_dataset(local, N_IMAGES, seed=31)
    catalog_rows = []
    for i, r in enumerate(rows):
        key = f"catalog/images/{'dir with space/ünï café' if i == 0 else 'plain/' + r['image_id']}.jpg"
        client.upload_file(str(local / r["uri"]), bucket, key)
        catalog_rows.append({"image_id": r["image_id"], "uri": key.removeprefix("catalog/")})
    catalog_rows.append({"image_id": "gone", "uri": "images/plain/gone.jpg"})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(catalog_rows), buf)
    client.put_object(Bucket=bucket, Key="catalog/catalog.parquet", Body=buf.getvalue())
    for name in ("model.safetensors", "config.json"):
        client.upload_file(str(tiny_model_dir / name), bucket, f"models/tiny/{name}")
    return bucket, catalog_rows


@pytest.fixture(scope="module")
def s3_cli_run(s3_catalog, ray_cluster):
    from jobs.cli import main

    bucket, _ = s3_catalog
    capture = pytest.MonkeyPatch()
    out, err = io.StringIO(), io.StringIO()
    capture.setattr("sys.stdout", out)
    capture.setattr("sys.stderr", err)
    try:
        code = main(
            [
                "retag",
                "--catalog",
                f"s3://{bucket}/catalog/catalog.parquet",
                "--model",
                f"s3://{bucket}/models/tiny",
                "--output",
                f"s3://{bucket}/out",
                "--run-id",
                "s3-run-1",
                "--json",
            ]
        )
    finally:
        capture.undo()
    return code, out.getvalue(), err.getvalue()


def test_retag_end_to_end_with_catalog_images_model_and_tables_on_s3(s3_catalog, s3_cli_run):
    bucket, catalog_rows = s3_catalog
    code, stdout, _ = s3_cli_run
    assert code == 0
    summary = json.loads(stdout)
    assert summary["status"] == "committed" and summary["tags_table"] == f"s3://{bucket}/out/tags"
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_skipped"]) == (N_IMAGES, 1, 0)
    tags = tables.open_table(f"s3://{bucket}/out/tags").to_pyarrow_table()
    tags = tags.filter(pc.equal(tags.column("run_id"), "s3-run-1"))
    by_id = {r["image_id"]: r for r in tags.to_pylist()}
    assert set(by_id) == {r["image_id"] for r in catalog_rows}
    assert by_id["gone"]["status"] == "error" and by_id["gone"]["error"].startswith("not_found: s3://")
    unicode_row = by_id[catalog_rows[0]["image_id"]]
    assert unicode_row["status"] == "ok" and unicode_row["uri"].endswith("dir with space/ünï café.jpg")
    (run,) = [
        r
        for r in tables.open_table(f"s3://{bucket}/out/runs").to_pyarrow_table().to_pylist()
        if r["run_id"] == "s3-run-1"
    ]
    assert (run["rows_ok"], run["rows_error"], run["catalog"]) == (
        N_IMAGES,
        1,
        f"s3://{bucket}/catalog/catalog.parquet",
    )


def test_retag_on_s3_leaves_no_staging_and_no_credentials_anywhere(s3_catalog, s3_cli_run):
    import boto3

    bucket, _ = s3_catalog
    _, stdout, stderr = s3_cli_run
    client = boto3.client("s3")
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
        for o in page.get("Contents", ())
    ]
    assert any(k.startswith("out/tags/_delta_log/") for k in keys) and any(
        k.startswith("out/runs/_delta_log/") for k in keys
    )
    assert not [k for k in keys if k.startswith("out/_staging/s3-run-1/")]
    assert SECRET not in stdout and SECRET not in stderr
    for key in keys:
        assert SECRET.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key


def test_retag_of_an_s3_prefix_skips_content_already_tagged_by_the_same_model(s3_catalog, s3_cli_run):
    from pipelines.retag import run_retag

    bucket, catalog_rows = s3_catalog
    summary = run_retag(
        f"s3://{bucket}/catalog/images/",
        f"s3://{bucket}/models/tiny",
        f"s3://{bucket}/out",
        run_id="s3-prefix",
        progress=False,
    )
    # the prefix lists the N images (not the missing one); their bytes were tagged ok by s3-run-1
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_skipped"]) == (0, 0, N_IMAGES)
    runs = {
        r["run_id"]: r for r in tables.open_table(f"s3://{bucket}/out/runs").to_pyarrow_table().to_pylist()
    }
    assert runs["s3-prefix"]["rows_skipped"] == N_IMAGES
    assert summary["tags_version"] == tables.open_table(f"s3://{bucket}/out/tags").version()
