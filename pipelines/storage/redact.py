"""Credentials never leave in a message: every line that is logged, stored or shown passes through here."""

from __future__ import annotations

import os
import re

_SECRET_PATTERNS = [
    re.compile(
        r"(?i)(aws_secret_access_key|aws_session_token|secret|password|token)"
        r"(['\"]?\s*[:=]\s*['\"]?)([^\s'\",}]+)"
    ),
    re.compile(r"(://[^:/@\s]+:)([^@/\s]+)(@)"),  # user:password@host
]


def redact(text: str) -> str:
    """Scrub credentials from a message before it is logged, stored or shown."""
    text = str(text)
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}***{m.group(3)}", text)
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret and len(secret) >= 6:
        text = text.replace(secret, "***")
    return text
