"""One writer per run id: the run's lease, `<output>/_staging/<run_id>/lease.json`.

A run creates its lease before it writes anything else, atomically (a conditional PUT, If-None-Match: *,
on S3; a create-if-absent on local disk), renews it from a daemon thread while it lives, and deletes it
when it ends. A second writer of the same run id finds the lease live and stops with one line naming the
holder; a lease past its expiry (its holder was killed), or whose holder ran on this machine and is gone,
is taken over, and a progress line says so. Every
change of an existing lease is conditional on the version last read (If-Match on S3, a compare-and-swap
under a folder lock on disk), so of two processes taking over one stale lease only one wins, and a holder
that stalled past its expiry finds out (`check`) instead of committing beside its successor.

TTL and renewal period: `MUMIC_LEASE_TTL_S` (120) and `MUMIC_LEASE_RENEW_S` (20) in the environment.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..storage import StorageError, files, redact
from .options import RetagError

DEFAULT_TTL_S = 120.0
DEFAULT_RENEW_S = 20.0
TTL_ENV, RENEW_ENV = "MUMIC_LEASE_TTL_S", "MUMIC_LEASE_RENEW_S"
_ATTEMPTS = 8  # rounds of create / read / take over before giving up on a lease that keeps changing

log = logging.getLogger("mumic.lease")


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _seconds(env: str, default: float) -> float:
    try:
        value = float(os.environ.get(env) or default)
    except ValueError:
        raise RetagError(f"{env} must be a number of seconds, got {os.environ.get(env)!r}") from None
    if value <= 0:
        raise RetagError(f"{env} must be positive, got {value:g}")
    return value


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease file holds: who writes the run, and until when the lease is good without a renewal."""

    run_id: str
    holder: str  # a uuid per acquisition
    host: str
    pid: int
    acquired_at: str  # ISO 8601, UTC
    expires_at: str
    kind: str = "retag"  # or "vacuum"
    machine: str = ""  # boot id and pid namespace: where `pid` means this process

    def expired(self, now: dt.datetime | None = None) -> bool:
        return dt.datetime.fromisoformat(self.expires_at) <= (now or _now())

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid} since {self.acquired_at} (lease expires {self.expires_at})"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        """The lease in a file's content; None when it is not one (unreadable, cut short)."""
        try:
            raw = json.loads(data.decode("utf-8"))
            info = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
            info.expired()  # a readable expiry
            return info
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


class LeaseHeld(RetagError):
    """Another process holds the run's live lease (exit 2, one line naming it)."""

    def __init__(self, info: LeaseInfo):
        what = "being written" if info.kind == "retag" else f"being cleaned up ({info.kind})"
        super().__init__(f"run {info.run_id} is {what} by {info.describe()}; wait, or use another --run-id")
        self.info = info


class LeaseLost(RetagError):
    """This process's lease expired or was taken over before the end of its run: it must not commit."""


def _machine() -> str:
    """This boot of this machine, and this pid namespace: where a pid names one process ("" if unknown)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie: killed, not yet waited for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def holder_is_gone(info: LeaseInfo) -> bool:
    """A lease whose holder ran here (same boot, same pid namespace) and is dead: no need to wait for its
    expiry. A holder elsewhere can only be judged by its expiry."""
    return bool(info.machine) and info.machine == _machine() and info.pid != os.getpid() and _gone(info.pid)


def read_lease(uri: str) -> LeaseInfo | None:
    """The lease at `uri`, or None when there is none (or it is unreadable)."""
    found = files.read_versioned(uri)
    return None if found is None else LeaseInfo.parse(found[0])


def _stale(held: LeaseInfo | None, dead: bool) -> str:
    if held is None:
        return "an unreadable lease"
    if dead:
        return f"the lease of host {held.host} pid {held.pid}: that process is gone"
    return f"a stale lease of host {held.host} pid {held.pid} (expired {held.expires_at})"


class RunLease:
    """The lease of one run id for this process: `acquire()`, then `check()` before committing, and
    `release()` at the end (also as a context manager: `with RunLease(...).acquire(): ...`)."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        ttl_s: float | None = None,
        renew_s: float | None = None,
        kind: str = "retag",
        say: Callable[[str], None] | None = None,
    ):
        self.uri, self.run_id, self.kind = uri, run_id, kind
        self.ttl_s = ttl_s or _seconds(TTL_ENV, DEFAULT_TTL_S)
        self.renew_s = min(renew_s or _seconds(RENEW_ENV, DEFAULT_RENEW_S), self.ttl_s / 3)
        self.say = say or (lambda message: log.info("%s", message))
        self.info: LeaseInfo | None = None
        self.took_over: LeaseInfo | None = None  # the stale lease this one replaced
        self.lost: str | None = None  # why this process no longer holds it
        self._token: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _fresh(self, acquired_at: str | None = None) -> LeaseInfo:
        now = _now()
        return LeaseInfo(
            run_id=self.run_id,
            holder=self.info.holder if self.info else uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=acquired_at or _iso(now),
            expires_at=_iso(now + dt.timedelta(seconds=self.ttl_s)),
            kind=self.kind,
            machine=_machine(),
        )

    def acquire(self, renew: bool = True) -> RunLease:
        """Create the lease, or take over a stale one; LeaseHeld when another process holds it live, a
        one-line StorageError when the store refuses (no such bucket, no permission)."""
        try:
            self._acquire()
        except RetagError:
            raise
        except Exception as e:
            code = str(((getattr(e, "response", None) or {}).get("Error") or {}).get("Code") or type(e).__name__)
            raise StorageError(f"run {self.run_id}: cannot write its lease {redact(self.uri)}: {code}") from e
        if renew:
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_id}", daemon=True)
            self._thread.start()
        return self

    def _acquire(self) -> None:
        unreadable = 0
        for _ in range(_ATTEMPTS):
            mine = self._fresh()
            if files.create_exclusive(self.uri, mine.to_bytes()):
                found = files.read_versioned(self.uri)
                if found is not None and LeaseInfo.parse(found[0]) == mine:
                    self.info, self._token = mine, found[1]
                    break
                continue  # gone or replaced at once (a vacuum of an expired lease?): look again
            found = files.read_versioned(self.uri)
            if found is None:
                continue  # released meanwhile
            held = LeaseInfo.parse(found[0])
            if held == mine:  # our create landed but its answer was lost (a reset): the SDK retried it
                self.info, self._token = mine, found[1]
                break
            if held is None and unreadable < 2:
                unreadable += 1  # being written where the filesystem has no hard links: read it again
                time.sleep(0.2)
                continue
            dead = held is not None and not held.expired() and holder_is_gone(held)
            if held is not None and not held.expired() and not dead:
                raise LeaseHeld(held)
            token = files.replace_if_unchanged(self.uri, mine.to_bytes(), found[1])
            if token is not None:
                self.info, self._token, self.took_over = mine, token, held
                self.say(f"run {self.run_id}: took over {_stale(held, dead)}")
                break
        else:
            raise RetagError(f"run {self.run_id}: its lease {redact(self.uri)} keeps changing; try again")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            self.renew()

    def renew(self) -> bool:
        """Push the expiry forward (the daemon thread calls this); False when the lease is no longer ours."""
        with self._lock:
            if self.lost or self.info is None or self._token is None:
                return False
            mine = self._fresh(self.info.acquired_at)
            try:
                token = files.replace_if_unchanged(self.uri, mine.to_bytes(), self._token)
            except Exception as e:  # an unreachable store: try again at the next tick, until expiry
                log.warning("run %s: renewing its lease failed (%s)", self.run_id, type(e).__name__)
                if self.info.expired():
                    self.lost = f"its lease expired at {self.info.expires_at} (renewals failed)"
                return False
            if token is None:
                now = read_lease(self.uri)
                self.lost = (
                    f"its lease was taken over by {now.describe()}" if now else "its lease file was removed"
                )
                return False
            self.info, self._token = mine, token
            return True

    def check(self) -> None:
        """LeaseLost unless this process still holds a live lease (call it right before committing)."""
        with self._lock:
            if not self.lost and self.info is not None and self.info.expired():
                self.lost = f"its lease expired at {self.info.expires_at}"
            if self.lost:
                raise LeaseLost(
                    f"run {self.run_id}: {self.lost}; not committing (another process may be writing it)"
                )

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def release(self) -> bool:
        """Stop renewing and delete the lease if it is still ours; True when deleted now. Never raises
        (it runs in `finally` blocks, after the error that matters)."""
        self.stop_renewing()
        with self._lock:
            token, self._token = self._token, None
            if token is None or self.lost:
                return False
            try:
                return files.delete_if_unchanged(self.uri, token)
            except Exception as e:
                log.warning("run %s: releasing its lease failed (%s)", self.run_id, type(e).__name__)
                return False
            finally:
                files.remove_empty_dir(self.uri.rsplit("/", 1)[0])

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def record(self) -> dict:
        """Who holds it, for the run's manifest."""
        assert self.info is not None
        return {
            "holder": self.info.holder,
            "host": self.info.host,
            "pid": self.info.pid,
            "acquired_at": self.info.acquired_at,
            **({"took_over_from": self.took_over.holder} if self.took_over else {}),
        }
