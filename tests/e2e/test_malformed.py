"""Malformed requests on raw sockets get their 4xx, are never forwarded, and the proxy keeps
serving normal clients after each."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_addr, request, service, split_addr


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list = []

    def _any(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        Recorder.seen.append((self.command, self.path))
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _any

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def rec_mesh(module_stack):
    app = free_addr()
    server = ThreadingHTTPServer(split_addr(app), Recorder)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    b_in = free_addr()
    module_stack.write("rec.yaml", service("rec", endpoints=[b_in]))
    b = module_stack.proxy(app=app, name="proxy-b", inbound=b_in)
    a = module_stack.proxy(name="proxy-a")
    yield {"outbound": a.outbound, "inbound": b.inbound, "a": a, "b": b}
    server.shutdown()


def raw(addr: str, data: bytes, timeout: float = 10) -> bytes:
    """Sends raw bytes, returns what came back until the peer closed or the head of a
    response (and a little more) arrived."""
    with socket.create_connection(split_addr(addr), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may answer and close before reading everything
        out = b""
        try:
            while b"\r\n\r\n" not in out:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except ConnectionResetError:
            pass
        return out


def status_of(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1."), f"no HTTP response, got {resp[:200]!r}"
    return int(resp.split(b" ", 2)[1])


BIG = b"X-Big: " + b"a" * (70 * 1024) + b"\r\n"
MANY = b"".join(b"X-H-%d: v\r\n" % i for i in range(150))

CASES = {
    "garbage request line": (b"THIS IS NOT HTTP AT ALL\r\n\r\n", {400}, False),
    "bad method token": (b"G(T /x HTTP/1.1\r\nHost: rec\r\n\r\n", {400}, False),
    "space in header name": (b"GET /bad-header HTTP/1.1\r\nHost: rec\r\nBad Header: x\r\n\r\n", {400}, False),
    "header without colon": (b"GET /no-colon HTTP/1.1\r\nHost: rec\r\nNoColonHere\r\n\r\n", {400}, False),
    "content-length and transfer-encoding": (
        b"POST /smuggle-clte HTTP/1.1\r\nHost: rec\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}, True),
    "transfer-encoding and content-length": (
        b"POST /smuggle-tecl HTTP/1.1\r\nHost: rec\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n", {400}, True),
    "conflicting content-lengths": (
        b"POST /smuggle-cl HTTP/1.1\r\nHost: rec\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        {400}, False),
    "invalid content-length": (b"POST /bad-cl HTTP/1.1\r\nHost: rec\r\nContent-Length: abc\r\n\r\n", {400}, False),
    "oversized header": (b"GET /big HTTP/1.1\r\nHost: rec\r\n" + BIG + b"\r\n", {431}, False),
    "too many headers": (b"GET /many HTTP/1.1\r\nHost: rec\r\n" + MANY + b"\r\n", {431}, False),
}


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
@pytest.mark.parametrize("case", list(CASES))
def test_malformed_request(rec_mesh, listener, case):
    data, statuses, want_tern_error = CASES[case]
    addr = rec_mesh[listener]
    resp = raw(addr, data)
    assert status_of(resp) in statuses, resp[:300]
    if want_tern_error:
        assert b"\r\ntern-error: bad-request" in resp.lower(), resp[:500]
    # the proxy keeps serving
    r = request(addr, "GET", f"/after/{listener}", host="rec")
    assert r.status == 200, r
    assert r.json() == {"ok": True}


def test_refused_requests_never_reached_the_app(rec_mesh):
    for listener in ("outbound", "inbound"):
        for name in ("content-length and transfer-encoding", "transfer-encoding and content-length",
                     "conflicting content-lengths", "invalid content-length", "oversized header",
                     "too many headers", "space in header name", "header without colon"):
            raw(rec_mesh[listener], CASES[name][0])
    assert request(rec_mesh["outbound"], "GET", "/marker", host="rec").status == 200
    paths = [p for _, p in Recorder.seen]
    assert "/marker" in paths
    leaked = [p for p in paths if p.split("?")[0] in
              ("/smuggle-clte", "/smuggle-tecl", "/smuggle-cl", "/bad-cl", "/big", "/many",
               "/bad-header", "/no-colon")]
    assert not leaked, f"refused requests were forwarded: {leaked}"


def test_pipelined_requests_after_valid_one(rec_mesh):
    """Two pipelined valid requests on one connection are both answered, in order."""
    data = (b"GET /pipe-1 HTTP/1.1\r\nHost: rec\r\n\r\n"
            b"GET /pipe-2 HTTP/1.1\r\nHost: rec\r\nConnection: close\r\n\r\n")
    with socket.create_connection(split_addr(rec_mesh["outbound"]), timeout=10) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    assert out.count(b"HTTP/1.1 200") == 2, out[:500]
