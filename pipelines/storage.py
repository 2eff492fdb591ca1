"""Where bytes live: local paths, file:// and s3:// URIs, resolved the same way by every stage.

The S3 endpoint and credentials come from the usual AWS settings (AWS_ENDPOINT_URL, the credentials
chain), so AWS, MinIO, Ceph and a local test server all work without flags. Nothing here logs secrets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

SCHEMES_REMOTE = ("s3://", "gs://", "gcs://", "abfs://", "az://")


class StorageError(ValueError):
    """A user-fixable problem reaching a path or URI (one line)."""


def is_remote(uri: str) -> bool:
    return str(uri).startswith(SCHEMES_REMOTE)


def normalize(uri: str | Path) -> str:
    """file:///abs → /abs; s3 URIs unchanged; local paths made absolute."""
    uri = str(uri)
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    if is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def parent(uri: str) -> str:
    uri = normalize(uri)
    return uri.rstrip("/").rsplit("/", 1)[0]


def join(base: str, *parts: str) -> str:
    base = normalize(base)
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def resolve(uri: str, base_dir: str | None = None) -> str:
    """A catalog `uri` as an absolute location: s3://…, file:///…, /abs, or relative to `base_dir`."""
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://") or os.path.isabs(uri):
        return normalize(uri)
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme: {uri.split('://')[0]}://")
    if base_dir is None:
        return normalize(uri)
    return join(base_dir, uri)


def fs_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path within it."""
    return fsspec.core.url_to_fs(normalize(uri))


def read_bytes(uri: str) -> bytes:
    with fsspec.open(normalize(uri), "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = fs_for(uri)
    parent_dir = path.rstrip("/").rsplit("/", 1)[0]
    if parent_dir:
        fs.makedirs(parent_dir, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = fs_for(uri)
    return fs.exists(path)


def read_table(uri: str) -> pa.Table:
    """A Parquet or CSV file (by extension) as an Arrow table; CSV columns are read as strings."""
    uri = normalize(uri)
    fs, path = fs_for(uri)
    if not fs.exists(path):
        raise StorageError(f"not found: {uri}")
    lower = uri.lower()
    with fs.open(path, "rb") as f:
        if lower.endswith((".csv", ".csv.gz", ".tsv")):
            opts = pacsv.ConvertOptions(strings_can_be_null=False, column_types=None)
            delimiter = "\t" if lower.endswith(".tsv") else ","
            table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=opts)
            return table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))
        if lower.endswith((".parquet", ".pq")):
            return pq.read_table(f)
    raise StorageError(f"unsupported table format (want .parquet or .csv): {uri}")


def delta_storage_options(uri: str) -> dict[str, str]:
    """storage_options for deltalake (delta-rs object_store) built from the AWS environment."""
    if not str(uri).startswith("s3://"):
        return {}
    opts: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["AWS_REGION"] = region
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        if os.environ.get(key):
            opts[key] = os.environ[key]
    # Single writer per table (one retag run at a time): no external lock needed.
    opts.setdefault("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    return opts


_SECRET_PATTERNS = [
    re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret|password|token)(['\"]?\s*[:=]\s*['\"]?)([^\s'\",}]+)"),
    re.compile(r"(://[^:/@\s]+:)([^@/\s]+)(@)"),  # user:password@host
]


def redact(text: str) -> str:
    """Scrub credentials from a message before it is logged, stored or shown."""
    text = str(text)
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}***{m.group(3)}", text)
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret and len(secret) >= 6:
        text = text.replace(secret, "***")
    return text
