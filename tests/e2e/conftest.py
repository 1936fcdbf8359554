"""Harness for Tern's end-to-end tests: real processes, real sockets on 127.0.0.1.

Binaries come from target/debug (tests/run.sh builds them first). Every process is
started through `Proc`, its stdout/stderr go to files, it is always stopped at the end, and
the tail of its logs is attached to the report of a failing test.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
BIN_DIR = TARGET / "debug"
NS = "default"

# --------------------------------------------------------------------------------------
# binaries, ports, waiting


def binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.exists():
        pytest.fail(f"{path} not found: build with `cargo build --workspace --bins` first")
    return path


_used_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """A port that is free now, outside the kernel's ephemeral range (so that the many
    outgoing connections of the load tests cannot take it between allocation and bind)."""
    with _port_lock:
        for _ in range(1000):
            port = random.randint(20000, 32000)
            if port in _used_ports:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            finally:
                s.close()
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port found")


def free_addr() -> str:
    return f"127.0.0.1:{free_port()}"


def split_addr(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    """Polls `pred` until it returns a truthy value; fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - reported below
            last_exc = e
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def port_open(addr: str) -> bool:
    try:
        with socket.create_connection(split_addr(addr), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# processes

_all_procs: list["Proc"] = []


class Proc:
    """A child process with its output captured to files."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.stdout.log"
        self.stderr_path = log_dir / f"{name}.stderr.log"
        full_env = dict(os.environ)
        full_env.setdefault("RUST_BACKTRACE", "1")
        full_env.setdefault("RUST_LOG", "info")
        if env:
            full_env.update(env)
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(
            self.argv, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL, env=full_env
        )
        self.pid = self.popen.pid
        _all_procs.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self):
        return self.popen.poll()

    def signal(self, sig=signal.SIGTERM):
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float):
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0):
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        for f in (self._out, self._err):
            if not f.closed:
                f.close()

    def output(self) -> str:
        self._out.flush()
        return self.stdout_path.read_text(errors="replace")

    def logs(self, max_lines: int = 80) -> str:
        parts = [f"$ {' '.join(self.argv)}  (pid {self.pid}, exit {self.returncode()})"]
        for p in (self.stdout_path, self.stderr_path):
            try:
                lines = p.read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            if len(lines) > max_lines:
                lines = [f"... {len(lines) - max_lines} lines cut ..."] + lines[-max_lines:]
            parts.append(f"--- {p.name} ---")
            parts.extend(lines)
        return "\n".join(parts)

    def vm_hwm_kib(self) -> int:
        """Peak resident set size (VmHWM) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def ensure_alive(self):
        if not self.alive():
            pytest.fail(f"{self.name} exited with {self.returncode()}:\n{self.logs()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        start = getattr(item, "_tern_proc_start", 0)
        for i, p in enumerate(_all_procs[:]):
            if i >= start:  # started by this test: more of its logs
                rep.sections.append((f"process {p.name}", p.logs(max_lines=150)))
            elif p.alive():  # shared (module/session) process still running
                rep.sections.append((f"process {p.name} (shared)", p.logs(max_lines=30)))


@pytest.fixture(autouse=True)
def _mark_procs(request):
    request.node._tern_proc_start = len(_all_procs)
    yield


def pytest_sessionfinish(session, exitstatus):
    for p in _all_procs:
        try:
            p.stop(timeout=5)
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------
# tern-demo-app and tern-proxy


class DemoApp:
    def __init__(self, log_dir: Path, name: str, **flags):
        self.addr = free_addr()
        argv = [binary("tern-demo-app"), "--listen", self.addr, "--name", name]
        for k, v in flags.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = Proc(f"demo-{name}-{self.addr.rsplit(':', 1)[1]}", argv, log_dir)
        wait_until(
            lambda: self.proc.ensure_alive() or f"listening on {self.addr}" in self.proc.output(),
            15,
            f"tern-demo-app {name} to listen",
        )

    @property
    def port(self) -> int:
        return split_addr(self.addr)[1]

    def stop(self):
        self.proc.stop()


class Proxy:
    def __init__(self, log_dir: Path, config_dir: Path, app: str | None = None, name: str = "proxy",
                 namespace: str = NS, extra: list[str] | None = None, env: dict | None = None,
                 wait_ready: bool = True, inbound: str | None = None, outbound: str | None = None):
        self.outbound = outbound or free_addr()
        self.inbound = inbound or free_addr()
        self.admin = free_addr()
        self.app = app or free_addr()
        self.config_dir = config_dir
        argv = [
            binary("tern-proxy"),
            "--config-dir", config_dir,
            "--outbound", self.outbound,
            "--inbound", self.inbound,
            "--app", self.app,
            "--admin", self.admin,
            "--namespace", namespace,
        ] + (extra or [])
        self.proc = Proc(f"{name}-{self.admin.rsplit(':', 1)[1]}", argv, log_dir, env=env)
        if wait_ready:
            self.wait_ready()

    @property
    def inbound_port(self) -> int:
        return split_addr(self.inbound)[1]

    def wait_ready(self, timeout: float = 30):
        def ready():
            self.proc.ensure_alive()
            return self.admin_get("/ready")[0] == 200

        wait_until(ready, timeout, f"{self.proc.name} /ready")

    def admin_get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        return http_get(self.admin, path, timeout=timeout)

    def config_version(self) -> str:
        status, body = self.admin_get("/config")
        assert status == 200, body
        return json.loads(body)["version"]

    def metrics(self) -> "Metrics":
        status, body = self.admin_get("/metrics")
        assert status == 200, body
        return Metrics(body)

    def stop(self):
        self.proc.stop()


def http_get(addr: str, path: str, timeout: float = 5, host: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*split_addr(addr), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# Prometheus text parsing

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text: str):
        self.text = text
        self.samples: list[tuple[str, dict, float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line.strip())
            if not m:
                continue
            labels = dict(_LABEL.findall(m.group(2) or ""))
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            self.samples.append((m.group(1), labels, value))

    def get(self, name: str, **labels) -> list[tuple[dict, float]]:
        return [(l, v) for n, l, v in self.samples
                if n == name and all(l.get(k) == str(v2) for k, v2 in labels.items())]

    def sum(self, name: str, **labels) -> float:
        return sum(v for _, v in self.get(name, **labels))

    def has_family(self, name: str) -> bool:
        """A family is there if it has samples or at least a # TYPE line (a labelled family
        with no sample yet)."""
        base = name[:-6] if name.endswith("_total") else name
        if re.search(rf"^# TYPE ({re.escape(name)}|{re.escape(base)}) ", self.text, re.M):
            return True
        return any(n == name or n.startswith(name + "_") for n, _, _ in self.samples)


# --------------------------------------------------------------------------------------
# configuration (Kubernetes / Gateway API shaped YAML)


def service(name: str, port: int = 80, endpoints: list = (), ns: str = NS,
            app_protocol: str | None = None, port_name: str = "http") -> list[dict]:
    """A Service with one port and its EndpointSlice.

    `endpoints`: list of "host:port" strings (ready) or ("host:port", ready) tuples; all must
    share the target port (one EndpointSlice port)."""
    sp = {"name": port_name, "port": port, "protocol": "TCP"}
    if app_protocol:
        sp["appProtocol"] = app_protocol
    docs = [{
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [dict(sp, targetPort=port_name)]},
    }]
    eps = [(e, True) if isinstance(e, str) else e for e in endpoints]
    if eps:
        target_ports = {split_addr(a)[1] for a, _ in eps}
        assert len(target_ports) == 1, "one target port per EndpointSlice"
        esp = {"name": port_name, "port": target_ports.pop(), "protocol": "TCP"}
        if app_protocol:
            esp["appProtocol"] = app_protocol
        docs.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-slice",
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [esp],
            "endpoints": [
                {"addresses": [split_addr(a)[0]], "conditions": {"ready": ready}} for a, ready in eps
            ],
        })
    return docs


def http_route(name: str, parent: str, rules: list[dict], ns: str = NS, parent_port: int | None = 80) -> dict:
    ref = {"group": "", "kind": "Service", "name": parent}
    if parent_port is not None:
        ref["port"] = parent_port
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"parentRefs": [ref], "rules": rules},
    }


def backend(name: str, port: int = 80, weight: int | None = None) -> dict:
    b = {"name": name, "port": port}
    if weight is not None:
        b["weight"] = weight
    return b


def write_config(config_dir: Path, filename: str, docs: list[dict] | str):
    """Writes a YAML file atomically (written beside the directory, then renamed in)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs, sort_keys=False)
    tmp = config_dir.parent / f".{config_dir.name}.{filename}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    tmp.write_text(text)
    os.rename(tmp, config_dir / filename)


# --------------------------------------------------------------------------------------
# HTTP/1.1 client helpers


@dataclass
class Resp:
    status: int
    headers: dict
    body: bytes
    raw_headers: list = field(default_factory=list)

    def json(self):
        return json.loads(self.body)

    def header(self, name: str):
        return self.headers.get(name.lower())


def request(addr: str, method: str, path: str, host: str | None = None, headers: dict | None = None,
            body=None, timeout: float = 15, conn: http.client.HTTPConnection | None = None) -> Resp:
    """One HTTP/1.1 request. `host` is sent as the Host header (service name)."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(*split_addr(addr), timeout=timeout)
    try:
        h = dict(headers or {})
        if host is not None:
            h["Host"] = host
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data, r.getheaders())
    finally:
        if own:
            conn.close()


def error_code(resp: Resp) -> str:
    return (resp.header("tern-error") or "").split()[0].rstrip(":;,") if resp.header("tern-error") else ""


# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def log_dir(tmp_path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


@pytest.fixture
def config_dir(tmp_path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    return d


class Stack:
    """Processes of one test (or module), stopped at teardown."""

    def __init__(self, base: Path):
        self.base = base
        self.log_dir = base / "logs"
        self.config_dir = base / "config"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.things: list = []

    def demo(self, name: str, **flags) -> DemoApp:
        d = DemoApp(self.log_dir, name, **flags)
        self.things.append(d)
        return d

    def proxy(self, app: str | None = None, name: str = "proxy", **kw) -> Proxy:
        p = Proxy(self.log_dir, self.config_dir, app=app, name=name, **kw)
        self.things.append(p)
        return p

    def write(self, filename: str, docs):
        write_config(self.config_dir, filename, docs)

    def close(self):
        for t in reversed(self.things):
            try:
                t.stop()
            except Exception:  # noqa: BLE001
                pass


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.close()


# --------------------------------------------------------------------------------------
# the shared mesh: client -> proxy A outbound -> proxy B inbound -> tern-demo-app, plus the
# checkout example of namespace shop and a few broken services for the error tests.


class Mesh:
    def __init__(self, stack: Stack):
        self.stack = stack
        self.app = stack.demo("app")
        self.v1 = stack.demo("v1")
        self.v2 = stack.demo("v2")
        b_inbound = free_addr()
        self.dead_addr = free_addr()  # nothing ever listens here
        stack.write("mesh.yaml", self.docs(b_inbound))
        self.b = stack.proxy(app=self.app.addr, name="proxy-b", inbound=b_inbound)
        self.a = stack.proxy(name="proxy-a")

    def docs(self, b_inbound: str) -> list[dict]:
        return (
            service("web", endpoints=[b_inbound])
            + service("web-h2", endpoints=[b_inbound], app_protocol="kubernetes.io/h2c")
            + service("empty", endpoints=[(b_inbound, False)])
            + service("dead", endpoints=[self.dead_addr])
            + service("slow", endpoints=[b_inbound])
            + [http_route("slow", "slow", [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "timeouts": {"request": "10s", "backendRequest": "500ms"},
                "backendRefs": [backend("slow")],
            }])]
            + checkout_docs(self.v1.addr, self.v2.addr)
        )


def checkout_docs(v1: str, v2: str, weights=(90, 10), legacy_value: str = "legacy") -> list[dict]:
    """Services checkout, checkout-v1, checkout-v2 in namespace shop and the checkout route:
    x-canary: 1 on /api -> v2; /api otherwise split v1/v2 by `weights`; /legacy with header
    filters and a prefix rewrite; /full with a full-path rewrite."""
    return (
        service("checkout", ns="shop", endpoints=[v1])
        + service("checkout-v1", ns="shop", endpoints=[v1])
        + service("checkout-v2", ns="shop", endpoints=[v2])
        + [http_route("checkout", "checkout", ns="shop", rules=[
            {
                "matches": [{
                    "path": {"type": "PathPrefix", "value": "/api"},
                    "headers": [{"type": "Exact", "name": "x-canary", "value": "1"}],
                }],
                "backendRefs": [backend("checkout-v2")],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                "backendRefs": [backend("checkout-v1", weight=weights[0]),
                                backend("checkout-v2", weight=weights[1])],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/legacy"}}],
                "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                        "set": [{"name": "x-route", "value": legacy_value}],
                        "add": [{"name": "x-added", "value": "yes"}],
                        "remove": ["x-remove-me"],
                    }},
                    {"type": "URLRewrite", "urlRewrite": {
                        "hostname": "rewritten.shop",
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"},
                    }},
                    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                        "set": [{"name": "x-resp-filter", "value": "applied"},
                                {"name": "x-demo-service", "value": "filtered"}],
                    }},
                ],
                "backendRefs": [backend("checkout-v1")],
            },
            {
                "matches": [{"path": {"type": "Exact", "value": "/full"}}],
                "filters": [{"type": "URLRewrite", "urlRewrite": {
                    "path": {"type": "ReplaceFullPath", "replaceFullPath": "/replaced"},
                }}],
                "backendRefs": [backend("checkout-v1")],
            },
        ])]
    )


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("mesh"))
    try:
        yield Mesh(s)
    finally:
        s.close()


# --------------------------------------------------------------------------------------
# policies and circuits (shared by the resilience, balancing and shedding tests)


def backend_name(svc: str, port: int = 80) -> str:
    return f"{NS}/{svc}:{port}"


def backend_policy(name: str, target: str, **spec) -> dict:
    return {
        "apiVersion": "policy.tern.dev/v1alpha1",
        "kind": "BackendPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": target}], **spec},
    }


def circuits(proxy) -> dict:
    status, body = proxy.admin_get("/circuits")
    assert status == 200, body
    return json.loads(body)


def circuit_backend(proxy, svc: str) -> dict:
    doc = circuits(proxy)
    for b in doc["backends"]:
        if b["backend"] == backend_name(svc):
            return b
    raise AssertionError(f"{backend_name(svc)} not in /circuits: {doc}")


def circuit_endpoint(proxy, svc: str, addr: str) -> dict:
    b = circuit_backend(proxy, svc)
    for ep in b["endpoints"]:
        if ep["address"] == addr:
            return ep
    raise AssertionError(f"{addr} not in /circuits of {svc}: {b}")


def control(app: "DemoApp", **params):
    """POST /control on a demo app directly (not through the proxy)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    r = request(app.addr, "POST", f"/control?{query}")
    assert r.status == 200, r


def retry_route(name: str, svc: str, retry: dict | None = None, timeouts: dict | None = None,
                non_idempotent: bool = False, port: int = 80) -> dict:
    """An HTTPRoute attached to Service `svc` sending everything back to `svc`, with
    an optional `retry` and `timeouts` on its one rule."""
    rule: dict = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "backendRefs": [{"name": svc, "port": port}],
    }
    if retry is not None:
        rule["retry"] = retry
    if timeouts is not None:
        rule["timeouts"] = timeouts
    route = http_route(name, svc, [rule], parent_port=port)
    if non_idempotent:
        route["metadata"]["annotations"] = {"retry.tern.dev/non-idempotent": "true"}
    return route
