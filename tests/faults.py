"""A fault-injecting HTTP proxy for tests, put in front of a local S3 server (moto).

It forwards every request unchanged (method, path, query, headers, body) and relays the answer, except the
requests a `Rule` picks (by HTTP method, object-key substring, a seeded fraction, at most `times`), which
get a fault instead:

- a real S3 error response (`SlowDown` 503, `ServiceUnavailable` 503, `InternalError` 500,
  `AccessDenied` 403, `NoSuchKey` 404): the `<Error><Code>..</Code><Message>..</Message></Error>` XML body
  S3 sends, as application/xml (no body for HEAD, as S3 does);
- `reset`: the connection is reset (SO_LINGER 0, then close) without an answer;
- `truncate`: the real answer's headers (with the full Content-Length), half its body, then a plain close;
- `delay`: wait `delay_s`, then forward as usual (`delay_s` on any other fault waits before the fault).

It counts the requests it sees per (method, object key) and the body bytes it delivered per key. Loopback
only: it listens on 127.0.0.1 and refuses an upstream that is not a loopback address. `stop()` (or leaving
the `with` block) closes the listener and every open connection, so no thread outlives the test.
"""

from __future__ import annotations

import http.client
import http.server
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

S3_ERRORS = {
    "SlowDown": (503, "Please reduce your request rate."),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "AccessDenied": (403, "Access Denied"),
    "NoSuchKey": (404, "The specified key does not exist."),
}
FAULTS = (*S3_ERRORS, "reset", "truncate", "delay")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
UPSTREAM_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 60.0  # a keep-alive client connection left idle this long is closed
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
)
_CHUNK = 64 << 10


@dataclass(frozen=True)
class Rule:
    """Which requests get which fault. The first rule (in order) that picks a request wins."""

    fault: str  # one of FAULTS
    method: str | None = None  # "GET", "HEAD", "PUT", ...; None: any
    key: str | None = None  # a substring of the object key (not the bucket); None: any
    fraction: float = 1.0  # the share of matching requests it picks (the proxy's seeded random)
    times: int | None = None  # it picks at most this many requests; None: no limit
    delay_s: float = 0.0

    def __post_init__(self):
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(FAULTS)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be within [0, 1], not {self.fraction}")

    def matches(self, method: str, key: str) -> bool:
        return (self.method is None or self.method.upper() == method) and (
            self.key is None or self.key in key
        )


def object_key(path: str) -> str:
    """The object key of a path-style S3 request path ('/bucket/a%20b.jpg?x=1' → 'a b.jpg'); '' for a
    bucket-level request."""
    _, _, key = urlsplit(path).path.lstrip("/").partition("/")
    return unquote(key)


class FaultProxy:
    """`with FaultProxy("http://127.0.0.1:PORT") as proxy:` → clients use `proxy.endpoint`."""

    def __init__(self, upstream: str, seed: int = 0):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK:
            raise ValueError(f"the fault proxy only forwards to a loopback http endpoint, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self._lock = threading.Lock()
        self._seed = seed
        self._rules: list[Rule] = []
        self._picked: list[int] = []
        self._rng = random.Random(seed)
        self._seen: Counter[tuple[str, str]] = Counter()
        self._sent: Counter[str] = Counter()
        self.faults: list[tuple[str, str, str]] = []  # (method, key, fault) of every request given a fault
        self._server = _Server(self)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ---- control ------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fault-proxy"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
        self._server.close_connections()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_rules(self, rules: Iterable[Rule], seed: int | None = None) -> None:
        """Replace the rules (and restart the random picks from `seed`, the proxy's own by default)."""
        rules = list(rules)
        with self._lock:
            self._rules = rules
            self._picked = [0] * len(rules)
            self._rng = random.Random(self._seed if seed is None else seed)

    def clear(self) -> None:
        """No rules, no counts: every request is forwarded again."""
        with self._lock:
            self._rules, self._picked = [], []
            self._seen.clear()
            self._sent.clear()
            self.faults.clear()

    # ---- what it saw --------------------------------------------------------------------------------

    def count(self, key: str | None = None, method: str | None = None) -> int:
        """Requests seen for this object key (any key if None), of this method (any if None)."""
        with self._lock:
            return sum(
                n
                for (m, k), n in self._seen.items()
                if (key is None or k == key) and (method is None or m == method.upper())
            )

    def sent(self, key: str) -> int:
        """Body bytes of upstream answers for this key actually delivered to clients."""
        with self._lock:
            return self._sent[key]

    def _pick(self, method: str, key: str) -> Rule | None:
        with self._lock:
            self._seen[(method, key)] += 1
            for i, rule in enumerate(self._rules):
                if not rule.matches(method, key):
                    continue
                if rule.times is not None and self._picked[i] >= rule.times:
                    continue
                if rule.fraction < 1.0 and self._rng.random() >= rule.fraction:
                    continue
                self._picked[i] += 1
                self.faults.append((method, key, rule.fault))
                return rule
            return None

    def _delivered(self, key: str, n: int) -> None:
        with self._lock:
            self._sent[key] += n


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, proxy: FaultProxy):
        self.proxy = proxy
        self._open: dict[socket.socket, threading.Thread] = {}  # client connection → its thread
        self._open_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            daemon=True,
            name="fault-proxy-conn",
        )
        with self._open_lock:
            self._open[request] = thread
        thread.start()

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self, timeout_s: float = 5.0) -> None:
        """End every client connection still open (keep-alive ones wait in a read) and wait for their
        threads (one in a `delay` fault finishes its wait first)."""
        with self._open_lock:
            open_now = list(self._open.items())
        for conn, _ in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for _, thread in open_now:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    disable_nagle_algorithm = True  # headers and body go out in two writes: no delayed-ACK stall between
    timeout = IDLE_TIMEOUT_S
    server: _Server

    def log_message(self, format, *args):  # quiet: tests read counts, not access logs
        pass

    def proxy_request(self) -> None:
        key = object_key(self.path)
        body = self._read_body()
        rule = self.server.proxy._pick(self.command, key)
        if rule is not None and rule.delay_s:
            time.sleep(rule.delay_s)
        if rule is None or rule.fault == "delay":
            self._forward(key, body)
        elif rule.fault == "truncate":
            self._forward(key, body, truncate=True)
        elif rule.fault == "reset":
            self._reset()
        else:
            self._s3_error(rule.fault, key)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = proxy_request

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk

    def _forward(self, key: str, body: bytes, truncate: bool = False) -> None:
        conn = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if "Host" not in self.headers:
                conn.putheader("Host", "{}:{}".format(*self.server.proxy.upstream))
            if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            self._relay(conn.getresponse(), key, truncate)
        finally:
            conn.close()

    def _relay(self, resp: http.client.HTTPResponse, key: str, truncate: bool) -> None:
        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        whole = None if no_body or length is not None else resp.read()  # upstream sent it chunked
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if no_body:
            if length is not None:
                self.send_header("Content-Length", length)  # HEAD: the object's size
            self.end_headers()
            return
        total = len(whole) if whole is not None else int(length)
        self.send_header("Content-Length", str(total))
        self.end_headers()
        self._send_body(resp, key, whole, total // 2 if truncate else total)
        if truncate:
            self.close_connection = True  # a plain close (FIN) with the body cut short

    def _send_body(self, resp, key: str, whole: bytes | None, limit: int) -> None:
        sent = 0
        try:
            while sent < limit:
                chunk = whole[sent:limit] if whole is not None else resp.read(min(_CHUNK, limit - sent))
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # the client hung up (e.g. it refused a body too large): stop relaying
            pass
        finally:
            self.server.proxy._delivered(key, sent)
        if sent < limit:
            self.close_connection = True

    def _reset(self) -> None:
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the last reference to the socket, with linger 0: close sends RST
        self.connection.close()

    def _s3_error(self, code: str, key: str) -> None:
        status, message = S3_ERRORS[code]
        request_id = uuid.uuid4().hex[:16].upper()
        key_xml = f"<Key>{escape(key)}</Key>" if code == "NoSuchKey" else ""
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{key_xml}"
            f"<RequestId>{request_id}</RequestId><HostId>{uuid.uuid4().hex}</HostId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
