"""The AWS settings, read in one place: the endpoint and region from the usual environment variables.

AWS, MinIO, Ceph and a local test server all work without flags. Credentials are never passed around
explicitly: each SDK reads them from the environment / credentials chain of the process that uses them,
except delta-rs, which only takes them as storage options (built here, never logged).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import pyarrow.fs as pafs

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
MAX_CONNECTIONS = 64  # per process: fetch threads of one worker share one client's connection pool


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # "" for AWS itself
    region: str

    @classmethod
    def from_env(cls) -> S3Settings:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
        return cls(endpoint, region)


_CLIENTS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _cached(kind: str, make):
    """One client per (kind, process, settings): building one costs a TLS handshake and a credentials
    lookup, and stages call for one many times per second."""
    settings = S3Settings.from_env()
    key = (kind, os.getpid(), settings)
    client = _CLIENTS.get(key)
    if client is None:
        with _LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                client = _CLIENTS[key] = make(settings)
    return client


def _make_arrow_s3(s: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": READ_TIMEOUT_S,
        # listings, snapshots and table files: a few quick retries; object reads of images go through
        # `objects` instead, whose one retry layer has a time budget
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if s.endpoint:
        scheme, _, hostport = s.endpoint.partition("://")
        kwargs["endpoint_override"] = hostport.rstrip("/") if hostport else s.endpoint
        kwargs["scheme"] = scheme if hostport else "https"
    if s.region:
        kwargs["region"] = s.region
    return pafs.S3FileSystem(**kwargs)


def _make_boto_s3(s: S3Settings, retries: dict):
    import boto3  # the SDK, for the requests pyarrow's filesystem does not make (conditional writes)
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=MAX_CONNECTIONS,
        retries=retries,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=s.endpoint or None, region_name=s.region or None, config=config
    )


def arrow_s3() -> pafs.S3FileSystem:
    return _cached("arrow", _make_arrow_s3)


def boto_s3(retrying: bool = False):
    """A botocore S3 client (thread-safe). Image reads use it with SDK retries off (`objects` has the one
    retry layer, with a time budget); small control files (leases) with the SDK's standard retries."""
    if retrying:
        return _cached("boto-retrying", lambda s: _make_boto_s3(s, {"mode": "standard", "max_attempts": 5}))
    return _cached("boto", lambda s: _make_boto_s3(s, {"total_max_attempts": 1}))


def delta_storage_options(uri: str) -> dict[str, str]:
    """storage_options for deltalake (delta-rs object_store) built from the AWS environment."""
    if not str(uri).startswith("s3://"):
        return {}
    s = S3Settings.from_env()
    opts: dict[str, str] = {}
    if s.endpoint:
        opts["AWS_ENDPOINT_URL"] = s.endpoint
        if s.endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    if s.region:
        opts["AWS_REGION"] = s.region
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        if os.environ.get(key):
            opts[key] = os.environ[key]
    # No AWS_S3_ALLOW_UNSAFE_RENAME: delta-rs writes each commit file with a conditional PUT
    # (If-None-Match: *), so concurrent writers (two run ids at once) cannot overwrite each other's commit.
    # S3 has supported it since 2024; MinIO and the local test server do too.
    return opts
