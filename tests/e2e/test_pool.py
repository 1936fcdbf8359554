"""Upstream connection pooling: an upstream that answers before the request body has
arrived, and keeps the connection open to drain it, must not make later requests wait
behind the slow client that still owes that body."""

import socket
import socketserver
import threading

import pytest

from conftest import request, service, split_addr


class EarlyAnswerHandler(socketserver.BaseRequestHandler):
    """HTTP/1.1 keep-alive server: `POST /early` is answered 413 at once, then its body
    is read and discarded on the same, still open, connection; anything else gets 200."""

    def handle(self):
        sock = self.request
        sock.settimeout(30)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                early = lines[0].startswith(b"POST /early ")
                if early:
                    sock.sendall(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                if not early:
                    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except OSError:
            return


@pytest.fixture
def early_upstream():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), EarlyAnswerHandler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_early_response_does_not_stall_other_requests(stack, early_upstream):
    stack.write("svc.yaml", service("early", endpoints=[early_upstream]))
    a = stack.proxy(name="proxy-a", extra=["--workers", "1"])

    # A client announces a 10 MB upload, sends 1 KiB and stops; the upstream answers 413
    # at once and keeps the connection open, waiting for the rest of the body.
    slow = socket.create_connection(split_addr(a.outbound), timeout=10)
    try:
        slow.sendall(b"POST /early HTTP/1.1\r\nHost: early\r\nContent-Length: 10000000\r\n\r\n"
                     + b"x" * 1024)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = slow.recv(4096)
            assert chunk, "the proxy closed the slow client's connection before answering"
            head += chunk
        assert head.startswith(b"HTTP/1.1 413"), head[:200]

        # While that upload is still open, other requests to the same upstream go through
        # on other pooled connections, promptly.
        for i in range(20):
            r = request(a.outbound, "GET", f"/after/{i}", host="early", timeout=5)
            assert r.status == 200, r
    finally:
        slow.close()
    a.proc.ensure_alive()
