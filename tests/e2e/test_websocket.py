"""WebSocket echo through outbound -> inbound -> a Python websockets server."""

import socket
import threading

import pytest
from websockets.sync.client import connect
from websockets.sync.server import serve

from conftest import free_addr, service, split_addr


@pytest.fixture(scope="module")
def ws_mesh(module_stack):
    def echo(ws):
        for msg in ws:
            ws.send(msg)

    app = free_addr()
    server = serve(echo, *split_addr(app), max_size=None)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    b_in = free_addr()
    module_stack.write("ws.yaml", service("ws", endpoints=[b_in]))
    module_stack.proxy(app=app, name="proxy-b", inbound=b_in)
    a = module_stack.proxy(name="proxy-a")
    yield a
    server.shutdown()
    t.join(10)


def test_websocket_echo(ws_mesh):
    sock = socket.create_connection(split_addr(ws_mesh.outbound), timeout=15)
    with connect("ws://ws/socket", sock=sock, open_timeout=15, close_timeout=5, max_size=None) as ws:
        for i in range(50):
            ws.send(f"text message {i} ✓")
            assert ws.recv(timeout=15) == f"text message {i} ✓"
        blob = bytes(range(256)) * 4096  # 1 MiB binary frame
        ws.send(blob)
        assert ws.recv(timeout=30) == blob
        ws.ping(b"are you there").wait(timeout=15)


def test_websocket_two_concurrent_sessions(ws_mesh):
    socks = [socket.create_connection(split_addr(ws_mesh.outbound), timeout=15) for _ in range(2)]
    conns = [connect("ws://ws.default.svc.cluster.local/", sock=s, open_timeout=15) for s in socks]
    try:
        for i in range(20):
            for j, c in enumerate(conns):
                c.send(f"{j}:{i}")
            for j, c in enumerate(conns):
                assert c.recv(timeout=15) == f"{j}:{i}"
    finally:
        for c in conns:
            c.close()
