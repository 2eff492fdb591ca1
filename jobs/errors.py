"""What a command reports to the user: `UserError` (one line on stderr) and the exit statuses."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 1 (or `.code`)."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code
