"""One progress style for every command: `mumic <command>: <message>` on stderr (stdout is for results),
the same line logged at INFO; `every(seconds)` rate-limits the lines of long loops."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("mumic")


class Progress:
    def __init__(self, command: str, enabled: bool = True):
        self.command = command
        self.enabled = enabled
        self._last: dict[str, float] = {}

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"mumic {self.command}: {message}", file=sys.stderr, flush=True)
        log.info("%s: %s", self.command, message)

    def every(self, seconds: float, message: str, key: str = "") -> bool:
        """Say `message` unless a line with this key was said less than `seconds` ago; True when said."""
        now = time.monotonic()
        if now - self._last.get(key, -float("inf")) < seconds:
            return False
        self._last[key] = now
        self(message)
        return True
