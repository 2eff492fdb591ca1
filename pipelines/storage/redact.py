"""Credentials never leave in a message: every line that is logged, stored or shown passes through here.

Two nets, both applied to every text:

- shapes: `key=value` / `key: value` for secret-sounding keys, `Authorization: ...` and `Bearer ...`,
  the signing parts of presigned URLs (`X-Amz-Signature=`, `X-Amz-Security-Token=`, ...), the password of
  `scheme://user:password@host` (any characters but `@` and whitespace) and the whole user part of
  `http(s)://token@host`, and AWS access key ids (`AKIA...`, `ASIA...`);
- values: the secrets in the environment *now* (read at each call, so a rotated token is covered), when at
  least 6 characters long, and the password of the `MLFLOW_TRACKING_URI`.

It runs on every error row of a retag, so it is a handful of precompiled regexes and `str.replace` calls;
what the environment holds is digested once per distinct environment (cached).
"""

from __future__ import annotations

import base64
import functools
import os
import re
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
MIN_SECRET_CHARS = 6

# Environment variables whose value is a secret wherever it appears.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",  # the legacy name of the session token
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
)
# The access key id is an identifier, not a secret; a real one (20 characters) is still masked, the
# placeholders of local endpoints and tests ("testing", "minioadmin") stay readable.
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
_SECRET_LIKE = re.compile(r"^[A-Za-z0-9+/=_\-]{16,}$")

_KEYS = (
    r"aws_secret_access_key|aws_session_token|secret_access_key|session_token|secret|password|passwd"
    r"|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?|signature"
)
# (pattern, replacement, triggers): a pattern runs only when one of its triggers is in the lowercased text
_PATTERNS = (
    # presigned URLs: ?X-Amz-Signature=...&X-Amz-Security-Token=...&X-Amz-Credential=AKIA.../...
    (
        re.compile(
            r"(?i)([?&;](?:x-amz-signature|x-amz-security-token|x-amz-credential|signature|awsaccesskeyid"
            r"|sig|token|access_token)=)([^&#\s'\"]+)"
        ),
        r"\1" + MASK,
        ("sig", "token", "x-amz-", "awsaccesskeyid"),
    ),
    # Authorization: Bearer xxx / Authorization: Basic xxx / authorization=xxx
    (
        re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:(bearer|basic|token)\s+)?([^\s'\",}]+)"),
        lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{MASK}",
        ("authorization",),
    ),
    (re.compile(r"(?i)\b(bearer\s+)([A-Za-z0-9\-._~+/]+=*)"), r"\1" + MASK, ("bearer",)),
    # key=value, key: value, "key": "value" (also MLFLOW_TRACKING_TOKEN=..., aws_session_token = ...)
    (
        re.compile(rf"(?i)({_KEYS})(['\"]?\s*[:=]\s*['\"]?)(?!\*\*\*)([^\s'\",}}]+)"),
        r"\1\2" + MASK,
        ("secret", "passw", "token", "key", "credential", "signature"),
    ),
    # scheme://user:password@host: the password may hold anything but whitespace and '@'
    (re.compile(r"(://[^:/?#@\s]+:)([^@\s]+)(@)"), r"\1" + MASK + r"\3", ("@",)),
    # http(s)://token@host: a lone user part of an HTTP URI is a token
    (re.compile(r"(?i)(\bhttps?://)([^:/?#@\s]+)(@)"), r"\1" + MASK + r"\3", ("@",)),
    # AWS access key ids, wherever they appear
    (
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b"),
        MASK,
        ("akia", "asia", "agpa", "aida", "aroa", "anpa", "anva", "apka"),
    ),
)


def redact(text: str) -> str:
    """Scrub credentials from a message before it is logged, stored or shown."""
    text = str(text)
    low = text.lower()
    for pattern, replacement, triggers in _PATTERNS:
        if any(t in low for t in triggers):
            text = pattern.sub(replacement, text)
    for secret in _secrets(*_environment()):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


_ENV_NAMES = (*SECRET_ENV, ACCESS_KEY_ENV, "MLFLOW_TRACKING_URI")


def _environment() -> tuple[str | None, ...]:
    return tuple(map(os.environ.get, _ENV_NAMES))


@functools.lru_cache(maxsize=16)
def _secrets(*values: str | None) -> tuple[str, ...]:
    """The secret values of one environment, longest first, with their URL-encoded forms."""
    *secrets, access_key, tracking_uri = values
    found = [s for s in secrets if s]
    if access_key and _SECRET_LIKE.match(access_key):
        found.append(access_key)
    if tracking_uri:
        try:
            password = urlsplit(tracking_uri).password
        except ValueError:  # not a URI (a bad port, ...): the patterns still apply
            password = None
        if password:
            user = unquote(urlsplit(tracking_uri).username or "")
            basic = base64.b64encode(f"{user}:{unquote(password)}".encode()).decode()
            found += [password, unquote(password), basic]
    out = set()
    for s in found:
        s = s.strip()
        if len(s) >= MIN_SECRET_CHARS:
            out.update({s, quote(s, safe="")})
    return tuple(sorted(out, key=len, reverse=True))
