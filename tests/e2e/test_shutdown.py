"""SIGTERM drains: in-flight requests finish, exit code 0, new connections refused."""

import signal
import socket
import threading
import time

import pytest

from conftest import free_addr, request, service, split_addr


@pytest.fixture
def pair(stack):
    app = stack.demo("app")
    b_in = free_addr()
    stack.write("web.yaml", service("web", endpoints=[b_in]))
    b = stack.proxy(app=app.addr, name="proxy-b", inbound=b_in, extra=["--drain-timeout", "30s"])
    a = stack.proxy(name="proxy-a", extra=["--drain-timeout", "30s"])
    return a, b


def connect_refused(addr: str) -> bool:
    try:
        with socket.create_connection(split_addr(addr), timeout=2) as s:
            # accepted by a lingering backlog: must at least not be served
            s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            s.settimeout(3)
            try:
                data = s.recv(100)
            except (ConnectionResetError, socket.timeout):
                return True
            return not data.startswith(b"HTTP/1.1 200")
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("which", ["a", "b"])
def test_sigterm_drains_in_flight(pair, which):
    a, b = pair
    target = a if which == "a" else b
    results = []
    lock = threading.Lock()

    def slow():
        try:
            r = request(a.outbound, "GET", "/sleep/2000", host="web", timeout=30)
            with lock:
                results.append(r.status)
        except Exception as e:  # noqa: BLE001
            with lock:
                results.append(repr(e))

    threads = [threading.Thread(target=slow) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.8)  # the requests are in flight (they take 2 s at the app)
    target.proc.signal(signal.SIGTERM)
    time.sleep(0.3)
    listener = target.outbound if which == "a" else target.inbound
    during = connect_refused(listener)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert results == [200] * 6, results
    assert target.proc.wait(timeout=30) == 0
    assert during, "a new connection was served while draining"
    assert connect_refused(listener)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(split_addr(listener), timeout=2).close()


def test_sigterm_idle_exits_promptly(pair):
    a, _ = pair
    assert request(a.outbound, "GET", "/", host="web").status == 200
    a.proc.signal(signal.SIGTERM)
    assert a.proc.wait(timeout=15) == 0
