"""HTTP/2 Rapid Reset (CVE-2023-44487): a client that opens and cancels thousands of streams
loses its connection, while other clients keep being served."""

import select
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest

from conftest import free_addr, request, service, split_addr

STREAMS = 10_000
BATCH = 50
ATTACKS = 20


@pytest.fixture
def pair(stack):
    app = stack.demo("app")
    b_in = free_addr()
    stack.write("web.yaml", service("web", endpoints=[b_in])
                + service("web-h2", endpoints=[b_in], app_protocol="kubernetes.io/h2c"))
    b = stack.proxy(app=app.addr, name="proxy-b", inbound=b_in)
    a = stack.proxy(name="proxy-a")
    return a, b


def rapid_reset(addr: str, authority: str) -> dict:
    s = socket.create_connection(split_addr(addr), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    c.increment_flow_control_window(2 ** 30)
    s.sendall(c.data_to_send())
    result = {"sent": 0, "lost": None}
    headers = [(":method", "GET"), (":path", "/rapid"), (":scheme", "http"), (":authority", authority)]

    def pump(timeout: float) -> bool:
        """Reads what is available; True if the connection is gone (GOAWAY or closed)."""
        while True:
            r, _, _ = select.select([s], [], [], timeout)
            if not r:
                return False
            try:
                data = s.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError):
                result["lost"] = "reset"
                return True
            if not data:
                result["lost"] = "closed"
                return True
            try:
                events = c.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                result["lost"] = f"protocol error {e!r}"
                return True
            for ev in events:
                if isinstance(ev, h2.events.ConnectionTerminated):
                    result["lost"] = f"goaway {ev.error_code!r}"
                    return True
            try:
                out = c.data_to_send()
                if out:
                    s.sendall(out)
            except OSError:
                pass
            timeout = 0

    try:
        while result["sent"] < STREAMS:
            for _ in range(BATCH):
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, headers, end_stream=True)
                c.reset_stream(sid, error_code=8)  # CANCEL
            try:
                s.sendall(c.data_to_send())
            except (BrokenPipeError, ConnectionResetError):
                result["lost"] = "closed while sending"
                break
            except OSError as e:
                result["lost"] = f"send error {e!r}"
                break
            result["sent"] += BATCH
            if pump(0):
                break
        if result["lost"] is None:
            # all sent; the verdict may still be on its way
            deadline = time.monotonic() + 5
            while result["lost"] is None and time.monotonic() < deadline:
                pump(0.2)
            result["after_finish"] = True
    finally:
        s.close()
    return result


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
def test_rapid_reset_loses_connection_others_served(pair, listener):
    a, b = pair
    addr = a.outbound if listener == "outbound" else b.inbound
    stop = threading.Event()
    started = threading.Event()
    bystander = {"ok": 0, "bad": []}

    def other_client():
        with httpx.Client(base_url=f"http://{addr}", http1=False, http2=True, timeout=30) as h2c:
            # keeps going while the attacks run, and at least 50 rounds in all
            while (not stop.is_set() or bystander["ok"] < 100) and bystander["ok"] < 5000:
                try:
                    r = h2c.get("/bystander", headers={"host": "web-h2"})
                    if r.status_code == 200:
                        bystander["ok"] += 1
                    else:
                        bystander["bad"].append(r.status_code)
                except Exception as e:  # noqa: BLE001
                    bystander["bad"].append(repr(e))
                r1 = request(addr, "GET", "/bystander-h1", host="web")
                if r1.status == 200:
                    bystander["ok"] += 1
                else:
                    bystander["bad"].append(r1.status)
                started.set()

    t = threading.Thread(target=other_client)
    t.start()
    results = []
    try:
        assert started.wait(30), "the bystander client could not get a first response"
        # the first attack sends up to 10,000 streams; then the attacker reconnects and
        # tries again: each attempt must lose its connection.
        for _ in range(ATTACKS):
            results.append(rapid_reset(addr, "web"))
    finally:
        stop.set()
        t.join(120)
    res = results[0]
    assert not t.is_alive()
    assert res["lost"] is not None, f"connection survived {res['sent']} rapid resets: {res}"
    survived = [r for r in results if r["lost"] is None]
    assert not survived, f"{len(survived)} of {ATTACKS} attack connections survived: {survived[:3]}"
    assert not bystander["bad"], bystander["bad"][:10]
    assert bystander["ok"] > 0
    a.proc.ensure_alive()
    b.proc.ensure_alive()
    # still serving, also new HTTP/2 connections
    with httpx.Client(base_url=f"http://{addr}", http1=False, http2=True, timeout=15) as h2c:
        assert h2c.get("/after", headers={"host": "web"}).status_code == 200
