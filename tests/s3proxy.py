"""A fault-injecting HTTP proxy in front of the local S3 server (moto), for the fault tests.

The product talks real S3 HTTP to it (through AWS_ENDPOINT_URL); the proxy forwards every request
to moto unchanged unless a rule says to answer 503, 403, to hang first, to drop the conditional
headers, or to forward the request and then drop its answer (closing the connection unanswered,
as a reset or a read timeout does after the store has acted). Only loopback is used.

With a `policy` (an IAM policy document, `iam_policy.Policy`), the proxy also plays S3's
authorizer: each request is mapped to the IAM action(s) S3 would check (`iam_policy.actions_of`)
and answered 403 AccessDenied unless the policy allows every one; `checks` records what was asked.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from iam_policy import Check, Policy, actions_of, hides_missing

_ERROR = "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message></Error>"


@dataclass
class Rule:
    """Requests whose method is in `methods` and whose path matches `path` get `action`.

    action: "503" (SlowDown), "403" (AccessDenied), "hang" (sleep `hang_s`, then forward),
    "unconditional" (forward without If-None-Match / If-Match, as a store that ignores them would)
    or "drop_response" (forward, then close the connection without answering: the store has acted,
    the client cannot know it).
    header: match only requests that carry this header (e.g. "If-None-Match": conditional PUTs).
    hold: with "hang", forward as soon as this event is set (or after `hang_s`), not before.
    every: act on every n-th matching request; times: act at most this many times (None: always).
    """

    path: str
    action: str
    methods: tuple[str, ...] = ("GET", "PUT", "POST", "HEAD", "DELETE")
    header: str | None = None
    every: int = 1
    times: int | None = None
    hang_s: float = 60.0
    hold: threading.Event | None = None
    seen: int = 0
    fired: int = 0

    def fires(self, method: str, path: str, headers=None) -> bool:
        if method not in self.methods or not re.search(self.path, path):
            return False
        if self.header is not None and (headers is None or headers.get(self.header) is None):
            return False
        self.seen += 1
        if self.seen % self.every or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


@dataclass
class S3Proxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    policy: Policy | None = None
    checks: list[Check] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        up = urlsplit(self.upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self._read_body()
                with proxy._lock:
                    rule = next(
                        (r for r in proxy.rules if r.fires(self.command, self.path, self.headers)),
                        None,
                    )
                if proxy.policy is not None and not self._authorized(body):
                    self._reply(403, _ERROR.format(code="AccessDenied").encode(), "application/xml")
                    return
                if rule is not None and rule.action in ("503", "403"):
                    code = "SlowDown" if rule.action == "503" else "AccessDenied"
                    self._reply(
                        int(rule.action), _ERROR.format(code=code).encode(), "application/xml"
                    )
                    return
                if rule is not None and rule.action == "hang":
                    if rule.hold is not None:
                        rule.hold.wait(rule.hang_s)
                    else:
                        time.sleep(rule.hang_s)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                dropped = {"transfer-encoding"}
                if rule is not None and rule.action == "unconditional":
                    dropped |= {"if-none-match", "if-match"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if rule is not None and rule.action == "drop_response":
                    conn.close()
                    self.close_connection = True  # the client sees the connection close, unanswered
                    return
                if resp.status == 404 and proxy.policy is not None and not self._may_list():
                    # S3 answers a missing object 403, not 404, to whoever may not list the bucket.
                    conn.close()
                    self._reply(403, _ERROR.format(code="AccessDenied").encode(), "application/xml")
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer has no body but must keep the object's length.
                length = (
                    resp.getheader("Content-Length", "0")
                    if self.command == "HEAD"
                    else str(len(data))
                )
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _authorized(self, body: bytes | None) -> bool:
                checks = [
                    Check(
                        self.command,
                        self.path,
                        action,
                        resource,
                        context,
                        proxy.policy.allows(action, resource, context),
                    )
                    for action, resource, context in actions_of(
                        self.command, self.path, dict(self.headers.items()), body
                    )
                ]
                with proxy._lock:
                    proxy.checks.extend(checks)
                return all(c.allowed for c in checks)

            def _may_list(self) -> bool:
                check = hides_missing(self.command, self.path)
                if check is None:
                    return True
                allowed = proxy.policy.allows(*check)
                with proxy._lock:
                    proxy.checks.append(
                        Check(self.command, self.path, *check, allowed, implied=True)
                    )
                return allowed

            def _read_body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = self.headers.get("Content-Length")
                return self.rfile.read(int(length)) if length else None

            def _reply(self, status: int, data: bytes, ctype: str):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
