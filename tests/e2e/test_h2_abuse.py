"""HTTP/2 abuse contained per connection, beyond what h2's own guards catch:

- streams cancelled *after* the proxy dispatched them (the upstream is slow, so each
  cancellation costs the proxy real work): Tern's own Rapid Reset guard closes the
  connection;
- a CONTINUATION flood (one header block that never ends): the connection is closed once
  the block passes the header list limit, long before the flood is sent.

In both cases another client on its own connection keeps being served, and the proxy
stays up. The bystander goes through the same proxies but over HTTP/1.1 (Service
`web-h1`), so it does not share the attacker's HTTP/2 connection from B to the app: the
cancellations Tern relays there can trip the *application's* own HTTP/2 guard, which
closes that connection for every stream on it. Surviving that needs retries of requests
that never reached the app (the resilience work), not containment in Tern."""

import select
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest

from conftest import free_addr, request, service, split_addr

BATCH = 50          # streams in flight per round (below the 100-stream limit)
MAX_ROUNDS = 200    # at most 10,000 cancelled streams
FLOOD_BYTES = 4 * 1024 * 1024  # a 4 MiB header block, 64 x the 64 KiB limit


@pytest.fixture
def pair(stack):
    app = stack.demo("app")
    b_in = free_addr()
    stack.write("web.yaml", service("web", endpoints=[b_in], app_protocol="kubernetes.io/h2c")
                + service("web-h1", endpoints=[b_in]))
    b = stack.proxy(app=app.addr, name="proxy-b", inbound=b_in)
    a = stack.proxy(name="proxy-a")
    return a, b


def h2_client(addr: str):
    s = socket.create_connection(split_addr(addr), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c


def drain(s, c, timeout: float):
    """Reads what arrives within `timeout`; returns why the connection ended, or None."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.0, deadline - time.monotonic())
        r, _, _ = select.select([s], [], [], left)
        if not r:
            return None
        try:
            data = s.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        if not data:
            return "closed"
        try:
            events = c.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            return f"protocol error {e!r}"
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                return f"goaway {ev.error_code!r}"
        out = c.data_to_send()
        if out:
            try:
                s.sendall(out)
            except OSError:
                return "closed while answering"
        if time.monotonic() >= deadline:
            return None


def cancel_after_dispatch(addr: str) -> dict:
    """Opens BATCH streams to a slow path, waits until the proxy has dispatched them, then
    cancels them all; repeats until the connection is lost or MAX_ROUNDS."""
    s, c = h2_client(addr)
    headers = [(":method", "GET"), (":path", "/sleep/5000"), (":scheme", "http"), (":authority", "web")]
    result = {"cancelled": 0, "lost": None}
    try:
        for _ in range(MAX_ROUNDS):
            ids = []
            for _ in range(BATCH):
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, headers, end_stream=True)
                ids.append(sid)
            try:
                s.sendall(c.data_to_send())
            except OSError as e:
                result["lost"] = f"send failed {e!r}"
                break
            # Give the proxy time to accept and forward them.
            lost = drain(s, c, 0.02)
            if lost:
                result["lost"] = lost
                break
            for sid in ids:
                c.reset_stream(sid, error_code=8)  # CANCEL
            try:
                s.sendall(c.data_to_send())
            except OSError as e:
                result["lost"] = f"send failed {e!r}"
                break
            result["cancelled"] += BATCH
            lost = drain(s, c, 0)
            if lost:
                result["lost"] = lost
                break
        if result["lost"] is None:
            result["lost"] = drain(s, c, 3)
    finally:
        s.close()
    return result


def continuation_flood(addr: str) -> dict:
    """Sends HEADERS without END_HEADERS, then CONTINUATION frames of valid HPACK until
    the proxy closes the connection or FLOOD_BYTES are sent."""
    s, c = h2_client(addr)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    drain(s, c, 0.2)  # settings exchange
    enc = hpack.Encoder()
    block = enc.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "web")])
    filler = hpack.Encoder()
    filler.header_table_size = 0
    chunk = filler.encode([(f"x-flood-{i}", "a" * 200) for i in range(40)])  # ~9 KiB of literals

    def frame(ftype: int, flags: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + (1).to_bytes(4, "big") + payload

    result = {"sent": 0, "lost": None}
    try:
        s.sendall(frame(0x1, 0x0, block))  # HEADERS, stream 1, no END_HEADERS
        while result["sent"] < FLOOD_BYTES:
            try:
                s.sendall(frame(0x9, 0x0, chunk))  # CONTINUATION, no END_HEADERS
            except OSError as e:
                result["lost"] = f"send failed {e!r}"
                break
            result["sent"] += len(chunk)
            lost = drain(s, c, 0)
            if lost:
                result["lost"] = lost
                break
        if result["lost"] is None:
            result["lost"] = drain(s, c, 3)
    finally:
        s.close()
    return result


def run_with_bystander(addr: str, attack) -> tuple[dict, dict]:
    stop = threading.Event()
    bystander = {"ok": 0, "bad": []}

    def other_client():
        while not stop.is_set() or bystander["ok"] < 20:
            r = request(addr, "GET", "/bystander", host="web-h1")
            if r.status == 200:
                bystander["ok"] += 1
            else:
                reason = {k.lower(): v for k, v in r.headers.items()}.get("tern-error")
                bystander["bad"].append((r.status, reason))
            if bystander["ok"] >= 2000:
                break

    t = threading.Thread(target=other_client)
    t.start()
    try:
        result = attack(addr)
    finally:
        stop.set()
        t.join(60)
    return result, bystander


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
def test_cancelling_dispatched_streams_loses_the_connection(pair, listener):
    a, b = pair
    addr = a.outbound if listener == "outbound" else b.inbound
    result, bystander = run_with_bystander(addr, cancel_after_dispatch)
    assert result["lost"], f"the connection survived {result['cancelled']} cancelled streams"
    assert result["cancelled"] < BATCH * MAX_ROUNDS, result
    assert bystander["bad"] == [], bystander
    assert bystander["ok"] >= 20
    a.proc.ensure_alive()
    b.proc.ensure_alive()


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
def test_continuation_flood_loses_the_connection(pair, listener):
    a, b = pair
    addr = a.outbound if listener == "outbound" else b.inbound
    result, bystander = run_with_bystander(addr, continuation_flood)
    assert result["lost"], f"the connection survived {result['sent']} bytes of CONTINUATION"
    assert result["sent"] < FLOOD_BYTES, result
    assert bystander["bad"] == [], bystander
    a.proc.ensure_alive()
    b.proc.ensure_alive()
