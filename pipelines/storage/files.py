"""Files and objects through one pyarrow filesystem per process and endpoint: read, write, list, delete.

Small files (configs, manifests, table parts, snapshots) go through here; image bytes go through
`objects`, which adds size limits, error reasons and retries.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import aws
from .paths import StorageError, is_remote, normalize

_LOCAL = pafs.LocalFileSystem()


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or s3:// URI; cached per process."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        return aws.arrow_s3(), uri[len("s3://") :]
    if is_remote(uri):
        raise StorageError(f"unsupported URI scheme: {uri.split('://')[0]}://")
    return _LOCAL, uri


def read_bytes(uri: str) -> bytes:
    """All bytes of a file; FileNotFoundError when there is none."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str | None:
    """A small text file's content, or None when it does not exist."""
    try:
        return read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see all of it or nothing (S3 PUTs are atomic; local files are
    written under a hidden temporary name and renamed)."""
    fs, path = filesystem(uri)
    if fs is _LOCAL:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str) -> list[tuple[str, int]]:
    """(uri, size) of the files directly under a folder / prefix, sorted; [] when it does not exist."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except FileNotFoundError:
        return []
    base = normalize(uri).rstrip("/")
    out = [
        (f"{base}/{info.base_name}", int(info.size or 0))
        for info in infos
        if info.type == pafs.FileType.File and not info.base_name.startswith(".")
    ]
    return sorted(out)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


TABLE_EXTENSIONS = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv")


def read_table(uri: str) -> pa.Table:
    """A Parquet or CSV file (by extension) as an Arrow table; CSV columns are read as strings."""
    uri = normalize(uri)
    lower = uri.lower()
    if not lower.endswith(TABLE_EXTENSIONS):
        raise StorageError(f"unsupported table format (want .parquet or .csv): {uri}")
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise StorageError(f"not found: {uri}")
    if lower.endswith((".parquet", ".pq")):
        return pq.read_table(path, filesystem=fs)
    with fs.open_input_stream(path, compression="detect") as f:
        opts = pacsv.ConvertOptions(strings_can_be_null=False, column_types=None)
        delimiter = "\t" if lower.endswith(".tsv") else ","
        table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=opts)
    return table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))
