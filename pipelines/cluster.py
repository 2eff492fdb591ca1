"""The Ray cluster a command runs on: RAY_ADDRESS's, or a local one started for the command.

Before starting a local cluster, the processes a killed command's cluster left behind are reaped: a
driver killed with SIGKILL takes its raylet and GCS with it, but Ray's DashboardAgent and RuntimeEnvAgent
(~210 MB together) outlive them. An agent is an orphan when the Ray session it belongs to (named in its
command line, its open log files, or its raylet's pid in its environment) has no live raylet or GCS
server anymore; processes of a live session (another command's or user's cluster) are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ray

from .progress import Progress

# How an agent process looks: its script (before Ray retitles it) or its title (after).
AGENT_MARKS = ("dashboard/agent.py", "runtime_env/agent/main.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
_SESSION = re.compile(r"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+")
_SESSION_PROCS = ("raylet", "gcs_server")  # a session lives while one of these does
_PROC = "/proc"


# Ray Train settings for a cluster started on this machine (set before its raylet starts: every worker
# process inherits them), each unless the environment already says otherwise. The controller polls its
# workers every 2 s by default, so every fit ends up to 2 s after its last epoch, with nothing to gain
# on one machine from the slower poll; the preemption watcher is one more process per fit that watches
# for a cloud node being reclaimed, which a local machine never is. A cluster of RAY_ADDRESS keeps its
# own settings.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_cluster_env() -> None:
    """LOCAL_CLUSTER_ENV into this process's environment, where not already set (before `ray.init`
    starts a local cluster)."""
    for name, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)


def ensure_ray(say: Callable[[str], None] | None = None) -> bool:
    """Join the cluster of RAY_ADDRESS (or start a local one) unless this process is already connected;
    True when this call started it."""
    if ray.is_initialized():
        return False
    if not os.environ.get("RAY_ADDRESS"):
        reap_orphans(say or Progress("ray"))
        local_cluster_env()
    ray.init(include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True


@contextlib.contextmanager
def ray_session(say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Ray for the length of a block: a cluster this block started is shut down when it ends."""
    started = ensure_ray(say)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class RayProcess:
    pid: int
    ppid: int
    rss_bytes: int
    title: str  # the command line, arguments joined by spaces
    sessions: frozenset[str]  # Ray session names it refers to
    raylet_pid: int | None  # RAY_RAYLET_PID of its environment


def _read(path: str, mode: str = "r") -> str | bytes | None:
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process; None when it is gone."""
    text = _read(f"{_PROC}/{pid}/stat")
    if not text:
        return None
    fields = str(text).rsplit(")", 1)[-1].split()  # after "pid (comm)": the comm may hold spaces
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir(_PROC) if name.isdigit()]
    except OSError:  # no /proc (not Linux): nothing is reaped
        return []


def _argv(pid: int) -> list[str]:
    raw = _read(f"{_PROC}/{pid}/cmdline", "rb") or b""
    return [a.decode(errors="replace").strip() for a in bytes(raw).split(b"\0") if a.strip()]


def _open_sessions(pid: int) -> set[str]:
    """Session names in the paths of the files a process holds open (its log files)."""
    found: set[str] = set()
    try:
        fds = os.listdir(f"{_PROC}/{pid}/fd")[:256]
    except OSError:
        return found
    for fd in fds:
        try:
            found.update(_SESSION.findall(os.readlink(f"{_PROC}/{pid}/fd/{fd}")))
        except OSError:
            continue
    return found


def _raylet_pid(pid: int) -> int | None:
    env = bytes(_read(f"{_PROC}/{pid}/environ", "rb") or b"")
    for item in env.split(b"\0"):
        if item.startswith(b"RAY_RAYLET_PID="):
            value = item.split(b"=", 1)[1]
            return int(value) if value.isdigit() else None
    return None


def _rss(pid: int) -> int:
    for line in str(_read(f"{_PROC}/{pid}/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _live_sessions() -> tuple[set[str], set[int]]:
    """The sessions that have a live raylet or GCS server, and the pids of those processes."""
    sessions, pids = set(), set()
    for pid in _pids():
        argv = _argv(pid)
        if argv and os.path.basename(argv[0]) in _SESSION_PROCS and _alive(pid):
            sessions.update(_SESSION.findall(" ".join(argv)))
            pids.add(pid)
    return sessions, pids


def find_orphans() -> list[RayProcess]:
    """Ray agent processes of this user whose session has no live raylet / GCS server anymore."""
    live, session_pids = _live_sessions()
    uid, orphans = os.getuid(), []
    for pid in _pids():
        if pid == os.getpid():
            continue
        title = " ".join(_argv(pid))
        if not any(mark in title for mark in AGENT_MARKS):
            continue
        try:
            if os.stat(f"{_PROC}/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X") or st[1] in session_pids:
            continue  # gone, or a child of a live raylet
        sessions = frozenset(_SESSION.findall(title)) or frozenset(_open_sessions(pid))
        raylet = _raylet_pid(pid)
        if not sessions and raylet is None:
            continue  # cannot tell whose it is: leave it alone
        if sessions & live or (raylet is not None and raylet in session_pids):
            continue
        orphans.append(RayProcess(pid, st[1], _rss(pid), title, sessions, raylet))
    return orphans


def _signal_all(pids: list[int], sig: int, wait_s: float) -> list[int]:
    """Send `sig`, then wait up to `wait_s` for them to go; the pids still alive."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    return alive


def reap_orphans(say: Callable[[str], None] | None = None, term_wait_s: float = 3.0) -> list[RayProcess]:
    """Kill the orphaned agents of dead Ray sessions (SIGTERM, then SIGKILL); those found."""
    orphans = find_orphans()
    if not orphans:
        return []
    pids = [p.pid for p in orphans]
    left = _signal_all(_signal_all(pids, signal.SIGTERM, term_wait_s), signal.SIGKILL, 2.0)
    sessions = sorted({s for p in orphans for s in p.sessions})
    if say is not None:
        say(
            f"reaped {len(orphans) - len(left)} orphaned Ray agent process(es) "
            f"({sum(p.rss_bytes for p in orphans) / 2**20:.0f} MB) of dead session(s) "
            f"{', '.join(sessions) or '(raylet gone)'}" + (f"; {len(left)} would not die" if left else "")
        )
    return orphans
