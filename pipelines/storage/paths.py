"""Locations: local paths, file:// and s3:// URIs, normalised and joined the same way by every stage."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

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
