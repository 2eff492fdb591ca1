"""Object reads: all bytes of one image (local file or S3 object), bounded in size, with one retry layer.

Failures become a `ReadFailed` with a short reason (`not_found`, `access_denied`, `too_large`,
`unavailable`, `unreadable`) from `read_with_retries`, classified by exception type and AWS error code, never by the text of a
message (which holds keys and paths: user data). Throttling and transient failures are retried with
exponential backoff and full jitter inside a total time budget; the SDK itself does not retry.
"""

from __future__ import annotations

import os
import random
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from botocore import exceptions as boto

from . import aws
from .paths import normalize
from .redact import redact

DEFAULT_MAX_BYTES = 256 << 20  # no catalog image is this big; a file that is would exhaust worker memory
REASONS = ("not_found", "access_denied", "forbidden", "too_large", "unavailable", "unreadable")

# AWS error codes (S3's and the SDK's) by what they mean for a read.
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "403",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(max_backoff, base * 2**n)),
    and no wait may end past `budget_s` after the first attempt started."""

    attempts: int = 6  # at most this many reads of one object
    base_s: float = 0.2
    max_backoff_s: float = 20.0
    budget_s: float = 60.0  # total time one object may take, retries included

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * min(self.max_backoff_s, self.base_s * (2**attempt))


class ReadFailed(Exception):
    """Why one object could not be read: `reason` (one of REASONS) and a credential-free detail."""

    def __init__(self, reason: str, detail: str, transient: bool = False):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = " ".join(redact(detail).split())
        self.transient = transient

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def _aws_code(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError, else ("", 0)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str((response.get("Error") or {}).get("Code") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code, status


def classify(exc: BaseException, uri: str) -> ReadFailed:
    """Map a filesystem / SDK exception to a reason; `transient` ones are worth retrying."""
    if isinstance(exc, ReadFailed):
        return exc
    where = redact(uri)
    name = type(exc).__name__
    if isinstance(exc, IsADirectoryError):
        return ReadFailed("not_found", f"{where} is a folder, not a file")
    if isinstance(exc, FileNotFoundError):
        return ReadFailed("not_found", where)
    if isinstance(exc, PermissionError | boto.NoCredentialsError | boto.PartialCredentialsError):
        return ReadFailed("access_denied", f"{where}: {name}")
    if isinstance(exc, boto.ClientError):
        code, status = _aws_code(exc)
        what = f"{where}: {code or 'HTTP'} ({status})"
        if code in _NOT_FOUND_CODES or status == 404:
            return ReadFailed("not_found", where)
        if code in _DENIED_CODES or status in (401, 403):
            return ReadFailed("access_denied", what)
        if code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
            return ReadFailed("unavailable", what, transient=True)
        return ReadFailed("unreadable", what)
    transient_types = (
        ConnectionError,
        TimeoutError,
        boto.ConnectionError,
        boto.HTTPClientError,  # connection closed / reset, read timeouts, a stream broken off
        boto.IncompleteReadError,  # a body cut short: fewer bytes than its Content-Length
    )
    if isinstance(exc, transient_types):
        return ReadFailed("unavailable", f"{where}: {name}", transient=True)
    return ReadFailed("unreadable", f"{where}: {name}")


def confine(roots: Sequence[str] | None) -> tuple[str, ...] | None:
    """Allowed local folders, resolved once (symlinks and `..` gone): what `read_object` compares with."""
    return None if roots is None else tuple(os.path.realpath(normalize(r)) for r in roots)


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _read_local(path: str, max_bytes: int, roots: tuple[str, ...] | None) -> bytes:
    """A regular file inside the allowed folders (after resolving links), at most max_bytes of it; any
    other path is `forbidden` with no byte read (a device such as /dev/zero, a FIFO, /etc/passwd)."""
    real = os.path.realpath(path)
    if roots is not None and not any(_inside(real, root) for root in roots):
        raise ReadFailed("forbidden", f"{redact(path)} is outside the folders this job may read")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ReadFailed("forbidden", f"{redact(path)} is not a regular file")
        if info.st_size > max_bytes:
            raise ReadFailed("too_large", f"{info.st_size} bytes > limit {max_bytes}")
        data = f.read(max_bytes + 1)  # bounded even when the size said is wrong
    if len(data) > max_bytes:
        raise ReadFailed("too_large", f"more than {max_bytes} bytes")
    return data


def _read_to_end(body, limit: int) -> bytes:
    """At most `limit` bytes of a botocore stream, reading until it ends: one read may return fewer bytes
    than asked (a body cut short does), and botocore checks Content-Length only when the stream ends
    (IncompleteReadError)."""
    parts, n = [], 0
    while n < limit:
        chunk = body.read(limit - n)
        if not chunk:
            break
        parts.append(chunk)
        n += len(chunk)
    return b"".join(parts)


def _read_s3(uri: str, max_bytes: int) -> bytes:
    bucket, _, key = uri[len("s3://") :].partition("/")
    response = aws.boto_s3().get_object(Bucket=bucket, Key=key)
    size = int(response.get("ContentLength") or 0)
    body = response["Body"]
    try:
        if size > max_bytes:  # refused from the headers: the body is never downloaded
            raise ReadFailed("too_large", f"{size} bytes > limit {max_bytes}")
        data = _read_to_end(body, max_bytes + 1)
    finally:
        body.close()
    if len(data) > max_bytes:
        raise ReadFailed("too_large", f"more than {max_bytes} bytes")
    if size and len(data) != size:  # never hand on a cut-short image as if it were whole
        raise ReadFailed("unavailable", f"{redact(uri)}: body cut short", transient=True)
    return data


def read_object(
    uri: str, max_bytes: int = DEFAULT_MAX_BYTES, roots: tuple[str, ...] | None = None
) -> bytes:
    """All bytes of one local file or S3 object (one GET), refusing anything above max_bytes. Local
    paths must be regular files, inside `roots` (from `confine`) when given."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        return _read_s3(uri, max_bytes)
    if "://" in uri:
        raise ReadFailed("unreadable", f"unsupported URI scheme {uri.split('://')[0]}://")
    return _read_local(uri, max_bytes, roots)


def read_with_retries(
    uri: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
    roots: tuple[str, ...] | None = None,
) -> bytes:
    """read_object, retried on transient failures per `policy`; raises ReadFailed. `sleep`, `clock` and
    `rng` (uniform in [0, 1), the jitter) are the real ones unless a test needs them predictable."""
    started = clock()
    attempt = 0
    while True:
        try:
            return read_object(uri, max_bytes, roots)
        except Exception as e:  # classified: anything unknown becomes `unreadable`, never a crash
            failure = classify(e, uri)
        if not failure.transient:
            raise failure from None
        attempt += 1
        wait = policy.delay(attempt - 1, rng)
        if attempt >= policy.attempts or clock() - started + wait > policy.budget_s:
            failure.detail = f"{failure.detail} (gave up after {attempt} attempts, {clock() - started:.1f}s)"
            raise failure from None
        sleep(wait)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    key = (os.getpid(), threads)  # one pool per worker process, reused by every batch it runs
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="mumic-read")
        return pool


def read_many(
    uris: Sequence[str],
    threads: int = 16,
    max_bytes: int = DEFAULT_MAX_BYTES,
    policy: RetryPolicy = RetryPolicy(),
    roots: tuple[str, ...] | None = None,
) -> list[tuple[bytes | None, ReadFailed | None]]:
    """(bytes, None) or (None, failure) per uri, in order, read by a bounded thread pool (object stores
    are latency-bound; a task never opens more than `threads` connections). `roots`: see read_object."""

    def one(uri: str) -> tuple[bytes | None, ReadFailed | None]:
        try:
            return read_with_retries(uri, max_bytes, policy, roots=roots), None
        except ReadFailed as e:
            return None, e

    if threads > 1 and len(uris) > 1:
        return list(_pool(threads).map(one, uris))
    return [one(u) for u in uris]
