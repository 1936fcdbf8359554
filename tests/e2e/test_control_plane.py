"""The sidecar in managed mode: tern-proxy --control-plane against real tern-control
processes.

- a YAML change reaches the sidecar and changes routing, with the ACK in /sidecars;
- static stability: kill the control plane and the sidecar keeps serving; restart the
  sidecar while the control plane is down and it boots from its state dir; bring the
  control plane back and it reconnects and converges;
- two replicas: stop the one the sidecar uses, it moves to the other without a failed
  request.

tern-control validates the whole set and builds scoped sets that validate on their own,
so it never pushes a set that does not compile: the NACK path (a refused push keeps the
old snapshot and is answered with its diagnostics) runs against a small fake control
plane written here with grpcio (protobuf encoded by hand), and in proxy/src/control.rs's
tests.
"""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from concurrent import futures

import grpc

from conftest import (
    BIN_DIR,
    Proc,
    Proxy,
    checkout_docs,
    free_addr,
    http_get,
    port_open,
    request,
    wait_until,
    write_config,
)

TERN_CONTROL = BIN_DIR / "tern-control"
if not TERN_CONTROL.exists():
    pytest.skip(
        f"{TERN_CONTROL} not built (tern-control is not in this tree yet); "
        "build with `cargo build --workspace --bins`",
        allow_module_level=True,
    )


# --------------------------------------------------------------------------------------
# helpers


class Control:
    """One tern-control replica."""

    def __init__(self, log_dir: Path, config_dir: Path, name: str = "control",
                 listen: str | None = None, admin: str | None = None):
        self.listen = listen or free_addr()
        self.admin = admin or free_addr()
        self.log_dir, self.config_dir, self.name = log_dir, config_dir, name
        self.proc = None
        self.start()

    def start(self):
        argv = [TERN_CONTROL, "--config-dir", self.config_dir,
                "--listen", self.listen, "--admin", self.admin]
        self.proc = Proc(f"{self.name}-{self.listen.rsplit(':', 1)[1]}-{time.monotonic_ns()}",
                         argv, self.log_dir)
        wait_until(lambda: self.proc.ensure_alive() or (port_open(self.listen) and port_open(self.admin)),
                   20, f"{self.name} to listen")

    def sidecars(self) -> list[dict]:
        status, body = http_get(self.admin, "/sidecars")
        assert status == 200, body
        doc = json.loads(body)
        return doc["sidecars"] if isinstance(doc, dict) else doc

    def sidecar(self, workload: str) -> dict | None:
        for s in self.sidecars():
            if s.get("workload") == workload:
                return s
        return None

    def kill(self):
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stop()

    def stop(self):
        self.proc.stop()


class ManagedProxy(Proxy):
    """A tern-proxy that takes its config from tern-control (conftest's Proxy helpers,
    other flags)."""

    def __init__(self, log_dir: Path, control: list[str], state_dir: Path, workload: str,
                 admin: str | None = None, outbound: str | None = None, wait_ready: bool = True,
                 extra: list[str] | None = None):
        self.outbound = outbound or free_addr()
        self.inbound = free_addr()
        self.admin = admin or free_addr()
        self.app = free_addr()
        self.config_dir = None
        self.workload = workload
        argv = [
            BIN_DIR / "tern-proxy",
            "--control-plane", ",".join(control),
            "--state-dir", state_dir,
            "--workload", workload,
            "--outbound", self.outbound,
            "--inbound", self.inbound,
            "--app", self.app,
            "--admin", self.admin,
            "--namespace", "shop",
            "--workers", "2",
        ] + (extra or [])
        self.proc = Proc(f"{workload}-{self.admin.rsplit(':', 1)[1]}-{time.monotonic_ns()}", argv, log_dir)
        if wait_ready:
            self.wait_ready()

    def control(self) -> dict:
        status, body = self.admin_get("/control")
        assert status == 200, body
        return json.loads(body)

    def ready_text(self) -> tuple[int, str]:
        return self.admin_get("/ready")


def route_gen(proxy: Proxy) -> str | None:
    """The x-route header the checkout route's /legacy rule sets (tells the config apart)."""
    r = request(proxy.outbound, "GET", "/legacy/x", host="checkout.shop", timeout=10)
    assert r.status == 200, (r.status, r.header("tern-error"), r.body[:200])
    return yaml.safe_load(r.body)["headers"].get("x-route")


def try_gen(proxy: Proxy) -> str | None:
    """Like route_gen, None instead of failing (for waiting)."""
    r = request(proxy.outbound, "GET", "/legacy/x", host="checkout.shop", timeout=10)
    return yaml.safe_load(r.body)["headers"].get("x-route") if r.status == 200 else None


class Load:
    """Requests in a loop on a few threads, recording every failure."""

    def __init__(self, proxy: Proxy, threads: int = 4):
        self.proxy, self.failures, self.ok = proxy, [], 0
        self.gens: set = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                r = request(self.proxy.outbound, "GET", "/legacy/x", host="checkout.shop", timeout=10)
                with self._lock:
                    if r.status != 200:
                        self.failures.append((r.status, r.header("tern-error")))
                    else:
                        self.ok += 1
                        self.gens.add(yaml.safe_load(r.body)["headers"].get("x-route"))
            except Exception as e:  # noqa: BLE001 - any failure counts
                with self._lock:
                    self.failures.append(repr(e))
            time.sleep(0.005)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(30)


def synced(control: Control, workload: str, proxy: ManagedProxy) -> dict | None:
    """The control plane's record of `workload` once it has ACKed what it was pushed and
    the sidecar serves that version."""
    s = control.sidecar(workload)
    if not s or s.get("state") != "synced" or not s.get("applied_version"):
        return None
    if s.get("applied_version") != s.get("pushed_version"):
        return None
    if proxy.control().get("applied_version") != s["applied_version"]:
        return None
    return s


@pytest.fixture
def shop(stack):
    v1 = stack.demo("v1")
    v2 = stack.demo("v2")
    stack.write("checkout.yaml", checkout_docs(v1.addr, v2.addr, legacy_value="gen-0"))
    return v1, v2


def rewrite(stack, v1, v2, gen: str):
    write_config(stack.config_dir, "checkout.yaml",
                 checkout_docs(v1.addr, v2.addr, legacy_value=gen))


# --------------------------------------------------------------------------------------
# tests


def test_change_reaches_sidecar_and_is_acked(stack, shop):
    v1, v2 = shop
    control = Control(stack.log_dir, stack.config_dir)
    stack.things.append(control)
    proxy = ManagedProxy(stack.log_dir, [control.listen], stack.base / "state-a", "web-1")
    stack.things.append(proxy)

    wait_until(lambda: try_gen(proxy) == "gen-0", 15, "the config to be served")
    first = wait_until(lambda: synced(control, "web-1", proxy), 15, "the first push to be ACKed")
    status, body = proxy.ready_text()
    assert status == 200 and f"control plane {control.listen} connected" in body, body
    c = proxy.control()
    assert c["connected"] == control.listen
    assert c["source"] == "control-plane"
    assert c["addresses"] == [control.listen]

    rewrite(stack, v1, v2, "gen-1")
    wait_until(lambda: route_gen(proxy) == "gen-1", 15, "the change to change routing")
    second = wait_until(lambda: (s := synced(control, "web-1", proxy))
                        and s["applied_version"] != first["applied_version"] and s,
                        15, "the change to be ACKed")
    assert second.get("last_nack") is None
    m = proxy.metrics()
    assert m.sum("tern_control_pushes_total", result="applied") >= 2
    assert m.sum("tern_control_pushes_total", result="refused") == 0
    assert m.sum("tern_control_connected") == 1

    # the state dir holds what was applied
    current = stack.base / "state-a" / "current"
    assert (current / "version").read_text().strip() == second["applied_version"]

    # an invalid change is refused by the control plane: the sidecar keeps its config
    write_config(stack.config_dir, "broken.yaml", "kind: HTTPRoute\nmetadata: [\n")
    time.sleep(1.5)
    assert route_gen(proxy) == "gen-1"
    assert synced(control, "web-1", proxy)


def test_static_stability(stack, shop):
    v1, v2 = shop
    control = Control(stack.log_dir, stack.config_dir)
    stack.things.append(control)
    state = stack.base / "state-b"
    proxy = ManagedProxy(stack.log_dir, [control.listen], state, "web-2")
    stack.things.append(proxy)
    wait_until(lambda: try_gen(proxy) == "gen-0", 15, "the config to be served")
    before = wait_until(lambda: synced(control, "web-2", proxy), 15, "the first ACK")

    # the control plane dies: the sidecar keeps serving what it has
    control.kill()
    wait_until(lambda: proxy.control()["connected"] is None, 10, "the sidecar to notice")
    status, body = proxy.ready_text()
    assert status == 200 and "control plane unreachable" in body, body
    for _ in range(20):
        assert route_gen(proxy) == "gen-0"
    assert proxy.metrics().sum("tern_control_connected") == 0

    # the sidecar restarts while the control plane is down: it boots from its state dir
    admin, outbound = proxy.admin, proxy.outbound
    proxy.stop()
    proxy = ManagedProxy(stack.log_dir, [control.listen], state, "web-2", admin=admin,
                         outbound=outbound, wait_ready=False)
    stack.things.append(proxy)
    proxy.wait_ready(10)
    status, body = proxy.ready_text()
    assert status == 200, body
    assert "control plane unreachable; serving version" in body and "from the state dir" in body, body
    c = proxy.control()
    assert c["source"] == "state-dir"
    assert c["applied_version"] == before["applied_version"]
    assert c["connected"] is None
    for _ in range(20):
        assert route_gen(proxy) == "gen-0"

    # the control plane comes back (with a change made while it was down): the sidecar
    # reconnects and converges, and no request fails on the way
    rewrite(stack, v1, v2, "gen-2")
    load = Load(proxy)
    try:
        control.start()
        wait_until(lambda: try_gen(proxy) == "gen-2", 30, "the sidecar to converge")
        after = wait_until(lambda: synced(control, "web-2", proxy), 15, "the ACK after reconnecting")
        time.sleep(0.3)
    finally:
        load.stop()
    assert not load.failures, load.failures[:5]
    assert load.gens <= {"gen-0", "gen-2"}, load.gens
    assert after["applied_version"] != before["applied_version"]
    c = proxy.control()
    assert c["connected"] == control.listen and c["source"] == "control-plane"
    assert proxy.metrics().sum("tern_control_reconnects_total") >= 1


def test_two_replicas_failover_without_failed_requests(stack, shop):
    v1, v2 = shop
    r1 = Control(stack.log_dir, stack.config_dir, name="control-1")
    r2 = Control(stack.log_dir, stack.config_dir, name="control-2")
    stack.things += [r1, r2]
    by_addr = {r1.listen: r1, r2.listen: r2}
    proxy = ManagedProxy(stack.log_dir, [r1.listen, r2.listen], stack.base / "state-c", "web-3")
    stack.things.append(proxy)
    wait_until(lambda: try_gen(proxy) == "gen-0", 15, "the config to be served")
    connected = wait_until(lambda: proxy.control()["connected"], 15, "a connection")
    used = by_addr[connected]
    other = r2 if used is r1 else r1
    wait_until(lambda: synced(used, "web-3", proxy), 15, "the ACK")

    load = Load(proxy)
    try:
        time.sleep(0.5)
        used.stop()
        wait_until(lambda: proxy.control()["connected"] == other.listen, 20,
                   "the sidecar to move to the other replica")
        wait_until(lambda: synced(other, "web-3", proxy), 15, "the other replica to record the ACK")
        # a change through the remaining replica still arrives
        rewrite(stack, v1, v2, "gen-3")
        wait_until(lambda: try_gen(proxy) == "gen-3", 15, "the change through the other replica")
        time.sleep(0.5)
    finally:
        load.stop()
    assert not load.failures, load.failures[:5]
    assert load.ok > 50
    status, body = proxy.ready_text()
    assert status == 200 and f"control plane {other.listen} connected" in body, body


# --------------------------------------------------------------------------------------
# a fake control plane (for the NACK path), protobuf by hand


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def encode_push(version: str, docs: list[tuple[str, str]]) -> bytes:
    out = _field(1, version.encode())
    for name, text in docs:
        out += _field(2, _field(1, name.encode()) + _field(2, text.encode()))
    return out


def _fields(data: bytes):
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        assert key & 7 == 2, f"unexpected wire type in {data!r}"
        n, i = _read_varint(data, i)
        yield key >> 3, data[i:i + n]
        i += n


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


HELLO_FIELDS = {1: "workload", 2: "namespace", 3: "service_account", 4: "zone", 5: "region",
                6: "service", 7: "calls", 8: "applied_version", 9: "token"}


def decode_sidecar_message(data: bytes) -> tuple[str, dict]:
    for num, body in _fields(data):
        kind = {1: "hello", 2: "ack", 3: "nack"}[num]
        msg: dict = {"calls": []} if kind == "hello" else {}
        names = HELLO_FIELDS if kind == "hello" else {1: "version", 2: "reason"}
        for f, v in _fields(body):
            if kind == "hello" and f == 7:
                msg["calls"].append(v.decode())
            else:
                msg[names[f]] = v.decode()
        return kind, msg
    raise AssertionError("empty SidecarMessage")


class FakeControl:
    """Sends each push of `pushes` after the previous one was answered; records what the
    sidecar says."""

    def __init__(self, pushes: list[bytes]):
        self.pushes = pushes
        self.seen: queue.Queue = queue.Queue()
        self.addr = free_addr()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler("tern.control.v1.ControlPlane", {
            "Stream": grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=decode_sidecar_message,
                response_serializer=lambda b: b),
        })
        self.server.add_generic_rpc_handlers((handler,))
        self.server.add_insecure_port(self.addr)
        self.server.start()

    def _stream(self, requests, context):
        it = iter(requests)
        self.seen.put(next(it))
        for push in self.pushes:
            yield push
            self.seen.put(next(it))
        for msg in it:  # keep the stream open while the sidecar is there
            self.seen.put(msg)

    def next(self, timeout: float = 15) -> tuple[str, dict]:
        return self.seen.get(timeout=timeout)

    def stop(self):
        self.server.stop(0)


def test_refused_push_is_nacked_and_the_old_config_keeps_serving(stack, shop):
    v1, v2 = shop
    good = yaml.safe_dump_all(checkout_docs(v1.addr, v2.addr, legacy_value="gen-0"), sort_keys=False)
    docs = [(f"checkout.yaml#{i + 1}", d) for i, d in enumerate(good.split("---\n"))]
    bad = docs[:-1] + [("checkout.yaml#9", "apiVersion: gateway.networking.k8s.io/v1\n"
                        "kind: HTTPRoute\nmetadata:\n  name: broken\n  namespace: shop\n"
                        "spec:\n  rules:\n  - backendRefs:\n    - name: checkout-v1\n"
                        "      port: eighty\n")]
    fake = FakeControl([encode_push("fake-1", docs), encode_push("fake-2", bad)])
    stack.things.append(fake)
    state = stack.base / "state-d"
    proxy = ManagedProxy(stack.log_dir, [fake.addr], state, "web-4",
                         extra=["--service", "shop/web", "--calls", "shop/checkout",
                                "--zone", "z1", "--region", "r1", "--service-account", "web-sa"])
    stack.things.append(proxy)

    kind, hello = fake.next()
    assert kind == "hello", (kind, hello)
    assert hello["workload"] == "web-4" and hello["namespace"] == "shop"
    assert hello["service"] == "shop/web" and hello["calls"] == ["shop/checkout"]
    assert hello["zone"] == "z1" and hello["region"] == "r1"
    assert hello["service_account"] == "web-sa"
    assert hello.get("applied_version", "") == ""
    assert fake.next() == ("ack", {"version": "fake-1"})
    kind, nack = fake.next()
    assert kind == "nack" and nack["version"] == "fake-2", (kind, nack)
    assert "checkout.yaml#9" in nack["reason"], nack["reason"]

    # the last good config keeps serving
    for _ in range(10):
        assert route_gen(proxy) == "gen-0"
    c = proxy.control()
    assert c["applied_version"] == "fake-1" and c["connected"] == fake.addr
    assert (state / "current" / "version").read_text().strip() == "fake-1"
    m = proxy.metrics()
    assert m.sum("tern_control_pushes_total", result="applied") == 1
    assert m.sum("tern_control_pushes_total", result="refused") == 1
    status, body = proxy.ready_text()
    assert status == 200 and "version fake-1" in body, body

    # restarted against a fake that is gone, it boots from fake-1 and says so in Hello
    proxy.stop()
    fake.stop()
    fake2 = FakeControl([])
    stack.things.append(fake2)
    proxy = ManagedProxy(stack.log_dir, [fake2.addr], state, "web-4")
    stack.things.append(proxy)
    kind, hello = fake2.next()
    assert kind == "hello" and hello["applied_version"] == "fake-1", hello
    assert route_gen(proxy) == "gen-0"
