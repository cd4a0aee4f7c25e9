"""A fault-injecting proxy in front of an S3 endpoint (moto's server in the tests).

It forwards every request and, deterministically by seed, resets a fraction of connections
(a GET with a body is cut halfway through the body, anything else is dropped before any
answer) and answers a fraction of requests with 503 SlowDown, as throttled object storage
does. A request is identified by its method, path, query and Range; its n-th attempt is
faulted or not by a hash of (seed, request, n), so a retried request gets a fresh draw, and
at most ``max_in_a_row`` attempts in a row are faulted. ``fail`` (a regex on the path) makes
every request it matches (as "METHOD /bucket/key") fail, for faults that do not pass. ``hold``
(a regex alike) makes every request it matches wait until ``released`` is set, so a test can
act while a job is at a known point.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import re
import socket
import struct
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultyS3:
    def __init__(self, upstream: str, seed: int = 0, reset: float = 0.0, slow_down: float = 0.0,
                 max_in_a_row: int = 3, fail: str | None = None, hold: str | None = None):
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.seed, self.reset, self.slow_down, self.max_in_a_row = seed, reset, slow_down, max_in_a_row
        self.fail, self.hold = fail, hold
        self.released = threading.Event()
        self.injected = collections.Counter()        # "reset" / "slow_down" / "fail" -> count
        self.failed_paths: set[str] = set()
        self._attempts = collections.Counter()
        self._in_a_row = collections.Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.hold and re.search(proxy.hold, f"{self.command} {_path(self.path)}"):
                    proxy.released.wait(timeout=300)
                fault = proxy._draw(self.command, self.path, self.headers.get("Range"))
                if fault == "slow_down" or fault == "fail":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                if fault == "reset" and self.command != "GET":
                    self._abort()
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "reset" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._abort()
                    return
                self.wfile.write(data)

            def _abort(self):
                # RST rather than FIN: what a dropped connection looks like to the client.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyS3:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _draw(self, method: str, target: str, byte_range: str | None) -> str | None:
        path = _path(target)
        if self.fail and re.search(self.fail, f"{method} {path}"):
            with self._lock:
                self.injected["fail"] += 1
                self.failed_paths.add(path)
            return "fail"
        key = f"{method} {target} {byte_range}"
        with self._lock:
            n = self._attempts[key]
            self._attempts[key] += 1
            u = int.from_bytes(hashlib.sha256(f"{self.seed}|{key}|{n}".encode()).digest()[:8], "big") / 2 ** 64
            fault = "reset" if u < self.reset else "slow_down" if u < self.reset + self.slow_down else None
            if fault and self._in_a_row[key] >= self.max_in_a_row:
                fault = None
            self._in_a_row[key] = self._in_a_row[key] + 1 if fault else 0
            if fault:
                self.injected[fault] += 1
        return fault


def _path(target: str) -> str:
    """/bucket/key of a request target."""
    return urllib.parse.unquote(urllib.parse.urlsplit(target).path)
