"""A real S3 HTTP server for tests: moto's server behind a fault-injecting proxy.

Test modules import the fixtures they need (``from s3server import ...``). The
proxy sits on its own loopback port, in front of moto, and can be stopped and
started again on the same port (moto's state, behind it, survives: that is what
a store restarting looks like to a client), answer 503, delay every request, or
forward a request and then drop the connection before the client hears the
answer.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Request headers that belong to one hop, not to the request forwarded.
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


@dataclass
class Faults:
    """What the proxy does to the requests it receives; tests change it live."""

    status: int | None = None  # answer this status instead of forwarding
    delay: float = 0.0  # seconds to wait before forwarding...
    delayed: int = 0  # ...this many of the next requests
    # Forward a request whose "METHOD path" contains this, then drop the
    # connection without answering (once per setting).
    drop_answer_to: str | None = None
    seen: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read what they need from Faults.seen."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if not size:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        faults = self.server.faults
        body = self._body()
        line = f"{self.command} {self.path}"
        faults.seen.append(line)
        if faults.delayed > 0:
            faults.delayed -= 1
            time.sleep(faults.delay)
        if faults.status is not None:
            self._answer(
                faults.status, b"<Error><Code>ServiceUnavailable</Code></Error>"
            )
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body, headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if faults.drop_answer_to and faults.drop_answer_to in line:
            faults.drop_answer_to = None
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(response.status)
        for key, value in response.getheaders():
            # A HEAD answer's length is the object's, though it has no body.
            keep = self.command == "HEAD" or key.lower() != "content-length"
            if key.lower() not in _HOP and keep:
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _answer(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream: tuple[str, int], faults: Faults):
        self.upstream = upstream
        self.faults = faults
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        self.connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut the kept-alive connections too, as a process that dies would."""
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class S3Server:
    """moto's S3 on a free loopback port, reached through a proxy with faults."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.faults = Faults()
        self.port = 0
        self._proxy: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The URL clients use: the proxy's."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start moto and the proxy (the proxy only, if moto runs already)."""
        if self._proxy is not None:
            return
        if self.moto._server is None:
            self.moto.start()
        self._proxy = _ProxyServer(
            self.port, self.moto.get_host_and_port(), self.faults
        )
        self.port = self._proxy.server_address[1]
        self._thread = threading.Thread(target=self._proxy.serve_forever, daemon=True)
        self._thread.start()

    def stop_proxy(self) -> None:
        """Stop listening: clients get connection refused until start()."""
        if self._proxy is None:
            return
        self._proxy.shutdown()
        self._proxy.server_close()
        self._proxy.drop_connections()
        assert self._thread is not None
        self._thread.join()
        self._proxy = None

    def stop(self) -> None:
        """Stop the proxy and moto."""
        self.stop_proxy()
        self.moto.stop()

    def reset_faults(self) -> None:
        self.faults.status = None
        self.faults.delay = 0.0
        self.faults.delayed = 0
        self.faults.drop_answer_to = None
        self.faults.seen.clear()

    def new_bucket(self) -> str:
        """Create an empty bucket with a unique name; return its name."""
        import boto3

        name = f"jobrunner-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=name)
        client.close()
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto server and proxy for the whole test run."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        # A developer's own AWS settings must not reach the test server.
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        server = S3Server()
        server.start()
        try:
            yield server
        finally:
            server.stop()


@dataclass
class S3Store:
    """A fresh bucket on the test server, as a store URL and its options."""

    server: S3Server
    url: str
    options: dict[str, Any]


@pytest.fixture
def s3_store(s3_server: S3Server) -> Iterator[S3Store]:
    """A new bucket for one test; the proxy's faults are reset around it."""
    s3_server.reset_faults()
    s3_server.start()
    bucket = s3_server.new_bucket()
    yield S3Store(
        s3_server, f"s3://{bucket}/store", {"endpoint_url": s3_server.endpoint}
    )
    s3_server.reset_faults()
    s3_server.start()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(0.02)
