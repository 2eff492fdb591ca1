"""A real `mlflow server` on loopback for the tests that need one (registry over HTTP, no-secrets)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port


def start_mlflow_server(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """An `mlflow server` (sqlite store and artifacts under `root`) in its own process group, once its
    /health answers; (process, port). Stop it with `stop`."""
    port = free_port()
    with open(root / "server.log", "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root}/server.db",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """Kill a process group started with start_new_session: a test's server holds nothing to save (its
    store is thrown away), and its graceful shutdown took ~5 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=20)
