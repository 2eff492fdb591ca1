"""pyarrow filesystems for the retag stages, one per process and endpoint, built from the AWS environment.

Ray tasks and actors call these many times per second; building an S3 client per object would cost a TLS
handshake and a credentials lookup each time, so each process keeps one. Credentials are never passed
explicitly: the AWS SDK reads them from the environment / credentials chain of the process that uses them.
"""

from __future__ import annotations

import os
import threading

import pyarrow.fs as pafs

from . import storage

_CACHE: dict[tuple, pafs.FileSystem] = {}
_LOCK = threading.Lock()


def _s3_settings() -> tuple:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    return endpoint, region


def _make_s3(endpoint: str, region: str) -> pafs.S3FileSystem:
    kwargs: dict = {
        # The SDK's own retries handle one-off hiccups; fetch.py adds longer backoff for throttling.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if endpoint:
        scheme, _, hostport = endpoint.partition("://")
        kwargs["endpoint_override"] = hostport.rstrip("/") if hostport else endpoint
        kwargs["scheme"] = scheme if hostport else "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or s3:// URI; cached per process."""
    uri = storage.normalize(uri)
    if uri.startswith("s3://"):
        key = ("s3", os.getpid(), *_s3_settings())
        fs = _CACHE.get(key)
        if fs is None:
            with _LOCK:
                fs = _CACHE.get(key)
                if fs is None:
                    fs = _CACHE[key] = _make_s3(key[2], key[3])
        return fs, uri[len("s3://") :]
    if storage.is_remote(uri):
        raise storage.StorageError(f"unsupported URI scheme for the retag job: {uri.split('://')[0]}://")
    key = ("local", os.getpid())
    fs = _CACHE.get(key)
    if fs is None:
        fs = _CACHE.setdefault(key, pafs.LocalFileSystem())
    return fs, uri


def read_text(uri: str) -> str | None:
    """A small text file's content, or None when it does not exist."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return None


def write_atomic(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see all of it or nothing (S3 PUTs are atomic; local files are
    written under a hidden temporary name and renamed)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_files(uri: str) -> list[tuple[str, int]]:
    """(uri, size) of the files directly under a folder / prefix, sorted; [] when it does not exist."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except FileNotFoundError:
        return []
    base = storage.normalize(uri).rstrip("/")
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
