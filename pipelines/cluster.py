"""The Ray cluster a command runs on: RAY_ADDRESS's, or a local one started for the command."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import ray


def ensure_ray() -> bool:
    """Join the cluster of RAY_ADDRESS (or start a local one) unless this process is already connected;
    True when this call started it."""
    if ray.is_initialized():
        return False
    ray.init(include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Ray for the length of a block: a cluster this block started is shut down when it ends."""
    started = ensure_ray()
    try:
        yield
    finally:
        if started:
            ray.shutdown()
