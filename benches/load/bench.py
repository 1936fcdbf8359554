"""Load benchmark driver: tern-proxy against nginx and HAProxy on loopback.

Started by run.sh (which installs the tools and builds tern-proxy); see
docs/benchmarks.md for the method. Every process started here is recorded in
OUT/pids (one pid a line, for run.sh's trap) and stopped before exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import idle_conns  # noqa: E402
import parse  # noqa: E402
from parse import PERCENTILES, fmt, median, pkey, ratio  # noqa: E402

ADDR = "127.0.0.1"
PROXY_CPU = "1"   # every proxy under test
LOAD_CPU = "0"    # load generator, upstream, this driver
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = ("tern-bench-" * 94)[:1024]  # fixed 1 KiB body

# port plan (all on 127.0.0.1)
P = {
    "up_h1": 18080, "up_h2c": 18081,
    "nginx_h1": 18100, "nginx_h2c": 18101,
    "nginxX_h1": 18110, "nginxX_h2c": 18111, "nginxY_h1": 18120,
    "haproxy_h1": 18130, "haproxy_h2c": 18131,
    "tern1": (18140, 18141, 18142),      # outbound, inbound, admin
    "ternA": (18150, 18151, 18152),
    "ternB1": (18160, 18161, 18162),
    "ternB2": (18170, 18171, 18172),
    # tern-mtls-pair: managed sidecars (outbound, inbound, admin) and their tern-control
    "ternMA": (18240, 18241, 18242),
    "ternMB1": (18250, 18251, 18252),
    "ternMB2": (18260, 18261, 18262),
    "control": (18230, 18231),           # gRPC, admin
    "mem_tern": (18200, 18201, 18202),
    "mem_nginx": 18210, "mem_haproxy": 18220,
}
HOST_H1 = "upstream.bench"
HOST_H2C = "upstream-h2c.bench"
MTLS_CLIENT_SA = "bench-client"   # sidecar A of tern-mtls-pair
MTLS_SERVER_SA = "bench-server"   # sidecars B1/B2 (one service account, like two replicas)
LINKERD_PAIR_CPU_US = 59.0        # reference (issue 8): linkerd2-proxy pair, 2-core loopback
LINKERD_PAIR_ADDED_P99_MS = 1.3   # ... and its added p99 at 1,000 req/s
# The endpoints every sidecar of tern-pair sees: B's inbound listeners (h1 -> B1, h2c ->
# B2), which A dials and at which B finds the Service a connection is for (as at a pod IP
# in a cluster); B then hands requests to its app, the upstream.
PAIR_ENDPOINTS = (P["ternB1"][1], P["ternB2"][1])


# ---------------------------------------------------------------------------
# processes


class Procs:
    def __init__(self, out: Path):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pidfile = out / "pids"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], cpu: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen(["taskset", "-c", cpu] + argv, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        self.procs[name] = p
        with open(self.pidfile, "a") as f:
            f.write(f"{p.pid}\n")
        return p

    def tree(self, name: str) -> list[int]:
        p = self.procs.get(name)
        return proc_tree(p.pid) if p and p.poll() is None else []

    def stop(self, name: str):
        p = self.procs.pop(name, None)
        if p is None:
            return
        pids = proc_tree(p.pid) if p.poll() is None else []
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for pid in pids[1:]:  # children (nginx workers) that outlived the master
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self):
        for name in list(self.procs):
            try:
                self.stop(name)
            except Exception as e:  # keep stopping the rest
                print(f"warning: stopping {name}: {e}", file=sys.stderr)


def proc_tree(root: int) -> list[int]:
    """root and all its descendants (by scanning /proc/*/stat ppid)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = parse.parse_proc_stat(Path(f"/proc/{d}/stat").read_text())
        except (OSError, ValueError):
            continue
        children.setdefault(st["ppid"], []).append(st["pid"])
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    return sum(user_sys_ticks(pids))


def user_sys_ticks(pids: list[int]) -> tuple[int, int]:
    """utime and stime (clock ticks) of `pids`, summed."""
    user = system = 0
    for pid in pids:
        try:
            st = parse.parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
            user += st["utime"]
            system += st["stime"]
        except OSError:
            pass
    return user, system


def thread_files(pids: list[int], name: str):
    """The text of /proc/PID/task/TID/`name` for every live thread of `pids` (threads that
    exited are lost)."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                yield Path(f"/proc/{pid}/task/{tid}/{name}").read_text()
            except OSError:
                pass


def sched_ns(pids: list[int]) -> int:
    """On-CPU nanoseconds of all live threads (schedstat, field 1): finer than stat's
    clock ticks, used as a cross-check."""
    return sum(int(text.split()[0]) for text in thread_files(pids, "schedstat"))


def context_switches(pids: list[int], kind: str) -> int:
    """Context switches of one `kind` of all live threads of `pids`: "voluntary" (the
    thread waited) or "nonvoluntary" (it was preempted)."""
    return sum(int(line.split()[1]) for text in thread_files(pids, "status")
               for line in text.splitlines() if line.startswith(f"{kind}_ctxt_switches:"))


def status_kb(pids: list[int], field_name: str) -> Optional[int]:
    total, seen = 0, False
    for pid in pids:
        try:
            v = parse.parse_proc_status_kb(Path(f"/proc/{pid}/status").read_text(), field_name)
        except OSError:
            continue
        if v is not None:
            total += v
            seen = True
    return total if seen else None


def reset_hwm(pids: list[int]):
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def wait_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ADDR, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def http_get(port: int, path: str = "/", host: str = "x", timeout: float = 2.0) -> Optional[int]:
    try:
        with socket.create_connection((ADDR, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return int(data.split(b" ", 2)[1]) if data else None
    except (OSError, ValueError, IndexError):
        return None


def wait_http(port: int, path: str = "/", host: str = "x", want: int = 200,
              timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_get(port, path, host) == want:
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------
# configs

NGINX_COMMON = """
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {wconns}; multi_accept on; }}
"""
NGINX_HTTP_COMMON = """
  access_log off;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
"""


def nofile_limit() -> int:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nginx_conf(d: Path, http_body: str, wconns: int = 4096) -> Path:
    """worker_connections is sized to the test: nginx preallocates (and touches)
    its connection array at start, so an oversized value inflates its RSS."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "tmp").mkdir(exist_ok=True)
    conf = (NGINX_COMMON.format(dir=d, nofile=nofile_limit(), wconns=wconns) + "http {\n" + NGINX_HTTP_COMMON.format(dir=d)
            + http_body + "}\n")
    (d / "nginx.conf").write_text(conf)
    return d / "nginx.conf"


def upstream_conf(d: Path) -> Path:
    wconns = max(1024, min(nofile_limit() - 64, 16384))
    return nginx_conf(d, wconns=wconns, http_body=f"""
  default_type text/plain;
  server {{
    listen {ADDR}:{P['up_h1']} backlog=4096;
    listen {ADDR}:{P['up_h2c']} http2 backlog=4096;
    location / {{ return 200 "{BODY}"; }}
  }}
""")


def nginx_proxy_conf(d: Path, listens: list[tuple[int, bool]], upstream_port: int,
                     wconns: int = 4096) -> Path:
    ls = "\n".join(f"    listen {ADDR}:{p}{' http2' if h2 else ''} backlog=4096;" for p, h2 in listens)
    return nginx_conf(d, wconns=wconns, http_body=f"""
  upstream up {{ server {ADDR}:{upstream_port}; keepalive 128; keepalive_requests 100000000; keepalive_timeout 300s; }}
  server {{
{ls}
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
""")


def haproxy_conf(d: Path, h1: int, h2c: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    conf = f"""global
  nbthread 1
  # maxconn: left to HAProxy, derived from the open-files limit
  log stderr format raw local0 warning

defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  option http-keep-alive
  http-reuse always

frontend fe_h1
  bind {ADDR}:{h1}
  default_backend be_h1

frontend fe_h2c
  bind {ADDR}:{h2c} proto h2
  default_backend be_h2c

backend be_h1
  http-reuse always
  server up {ADDR}:{P['up_h1']}

backend be_h2c
  http-reuse always
  server up {ADDR}:{P['up_h2c']} proto h2
"""
    (d / "haproxy.cfg").write_text(conf)
    return d / "haproxy.cfg"


def tern_yaml(h1_port: int, h2c_port: int, sa: Optional[str] = None) -> str:
    """sa: the service account the EndpointSlices' sidecars present (annotation
    tern.dev/service-account), which makes a managed sidecar call them over mTLS."""
    ann = f" annotations: {{tern.dev/service-account: {sa}}}," if sa else ""
    return f"""apiVersion: v1
kind: Service
metadata: {{name: upstream, namespace: bench}}
spec: {{ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: upstream-1,{ann} namespace: bench, labels: {{kubernetes.io/service-name: upstream}}}}
addressType: IPv4
endpoints: [{{addresses: ["{ADDR}"], conditions: {{ready: true}}}}]
ports: [{{name: http, port: {h1_port}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: upstream-h2c, namespace: bench}}
spec: {{ports: [{{name: http, port: 80, appProtocol: kubernetes.io/h2c}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: upstream-h2c-1,{ann} namespace: bench, labels: {{kubernetes.io/service-name: upstream-h2c}}}}
addressType: IPv4
endpoints: [{{addresses: ["{ADDR}"], conditions: {{ready: true}}}}]
ports: [{{name: http, port: {h2c_port}}}]
""" + POLICIES


# Every layer configured, so the numbers are those of a mesh with its policies on:
# retries (bodies buffered, heads kept for replay), per-route request timeout, breakers,
# limits, a concurrency limit, P2C, and a rate limit the inbound side checks (set far
# above the offered load: it must cost, not refuse).
POLICIES = "".join(
    f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {svc}, namespace: bench}}
spec:
  parentRefs: [{{group: "", kind: Service, name: {svc}, port: 80}}]
  rules:
  - backendRefs: [{{name: {svc}, port: 80}}]
    timeouts: {{request: 10s}}
    retry: {{attempts: 2, backoff: 25ms, codes: [502, 503]}}
---
apiVersion: policy.tern.dev/v1alpha1
kind: BackendPolicy
metadata: {{name: {svc}, namespace: bench}}
spec:
  targetRefs: [{{group: "", kind: Service, name: {svc}}}]
  circuitBreaker: {{consecutiveFailures: 5}}
  limits: {{maxConnections: 100000, maxPendingRequests: 100000, maxRequests: 100000}}
  concurrency: {{maxConcurrent: 4096, maxQueue: 4096, queueTimeout: 1s}}
---
apiVersion: policy.tern.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: {svc}, namespace: bench}}
spec:
  targetRefs: [{{group: "", kind: Service, name: {svc}}}]
  rate: {{requests: 10000000, per: 1s}}
"""
    for svc in ("upstream", "upstream-h2c")
)


# ---------------------------------------------------------------------------
# targets and tests


@dataclass
class Target:
    name: str
    h1: int
    h2c: int
    procs: dict          # proto -> list of process names measured
    ref: str             # target whose numbers the ratios divide by
    hops: int
    note: str = ""
    host_h1: str = HOST_H1
    host_h2c: str = HOST_H2C
    error: Optional[str] = None


@dataclass
class Test:
    name: str
    proto: str           # h1 | h2c
    tool: str            # wrk | h2load
    conns: int
    streams: int = 1
    rps: Optional[int] = None  # total fixed rate; None = closed loop
    desc: str = ""


TESTS = {
    "h1-closed": Test("h1-closed", "h1", "wrk", 64, desc="HTTP/1.1 closed loop, wrk -t1 -c64"),
    "h2c-closed": Test("h2c-closed", "h2c", "h2load", 16, 4, desc="h2c closed loop, h2load -c16 -m4"),
    "h1-rate-1k": Test("h1-rate-1k", "h1", "h2load", 10, 1, 1000,
                       desc="HTTP/1.1 fixed 1,000 req/s, h2load --h1 -c10 --rps 100"),
    "h1-rate-5k": Test("h1-rate-5k", "h1", "h2load", 10, 1, 5000,
                       desc="HTTP/1.1 fixed 5,000 req/s, h2load --h1 -c10 --rps 500"),
    "h2c-rate-1k": Test("h2c-rate-1k", "h2c", "h2load", 10, 1, 1000,
                        desc="h2c fixed 1,000 req/s, h2load -c10 --rps 100"),
    "h2c-rate-5k": Test("h2c-rate-5k", "h2c", "h2load", 10, 1, 5000,
                        desc="h2c fixed 5,000 req/s, h2load -c10 --rps 500"),
}
DEFAULT_TESTS = ["h1-closed", "h2c-closed", "h1-rate-1k", "h1-rate-5k"]


def make_targets() -> dict[str, Target]:
    t = [
        Target("direct", P["up_h1"], P["up_h2c"], {"h1": [], "h2c": []}, "nginx", 0,
               "no proxy: the floor"),
        Target("nginx", P["nginx_h1"], P["nginx_h2c"], {"h1": ["nginx"], "h2c": ["nginx"]},
               "nginx", 1, "h2c in, HTTP/1.1 to the upstream (proxy_pass has no h2)"),
        Target("haproxy", P["haproxy_h1"], P["haproxy_h2c"],
               {"h1": ["haproxy"], "h2c": ["haproxy"]}, "nginx", 1,
               "h2c in, h2c to the upstream (proto h2)"),
        Target("tern", P["tern1"][0], P["tern1"][0], {"h1": ["tern1"], "h2c": ["tern1"]},
               "nginx", 1, "outbound listener; h2c in, h2c to the upstream"),
        Target("nginx-2hop", P["nginxX_h1"], P["nginxX_h2c"],
               {"h1": ["nginxX", "nginxY"], "h2c": ["nginxX", "nginxY"]}, "nginx-2hop", 2,
               "nginx -> nginx -> upstream; h2c only on the first leg"),
        Target("tern-pair", P["ternA"][0], P["ternA"][0],
               {"h1": ["ternA", "ternB1"], "h2c": ["ternA", "ternB2"]}, "nginx-2hop", 2,
               "A outbound -> B inbound -> upstream; CPU/RSS of A+B"),
        Target("tern-mtls-pair", P["ternMA"][0], P["ternMA"][0],
               {"h1": ["ternMA", "ternMB1"], "h2c": ["ternMA", "ternMB2"]}, "nginx-2hop", 2,
               "managed sidecars (tern-control with a CA): A outbound -> mTLS + HTTP/2 -> "
               "B inbound -> upstream; CPU/RSS of A+B (tern-control not counted)"),
    ]
    return {x.name: x for x in t}


def start_tern(procs: Procs, conf_root: Path, name: str, ports, app: int, cfg_ports,
               tern_bin: str):
    out, inb, admin = ports
    d = conf_root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "bench.yaml").write_text(tern_yaml(*cfg_ports))
    procs.start(name, [tern_bin, "--config-dir", str(d), "--outbound", f"{ADDR}:{out}",
                       "--inbound", f"{ADDR}:{inb}", "--app", f"{ADDR}:{app}",
                       "--admin", f"{ADDR}:{admin}", "--namespace", "bench",
                       "--workers", "1", "--drain-timeout", "1s", "--log", "warn"], PROXY_CPU)
    if not wait_http(admin, "/ready", timeout=20):
        raise RuntimeError(f"{name}: /ready not 200 within 20s (see logs/{name}.log)")


def http_text(port: int, path: str, timeout: float = 2.0) -> Optional[str]:
    """GET a small admin page (HTTP/1.0: the body ends at EOF); None on any failure."""
    try:
        with socket.create_connection((ADDR, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            return None
        return body.decode(errors="replace")
    except OSError:
        return None


def start_mtls_pair(procs: Procs, conf_root: Path, tern_bin: str, control_bin: str,
                    ternctl_bin: str, ready_timeout: float = 30):
    """tern-mtls-pair: a fresh CA (`ternctl ca init`), two tokens (`ternctl ca token`:
    client and server service accounts), tern-control with --ca-dir/--tokens serving the
    plain pair's config with the server's EndpointSlices annotated, and three managed
    sidecars: A (client), B1 (HTTP/1.1 app) and B2 (h2c app), which share the server's
    token and service account like two replicas."""
    d = conf_root / "mtls"
    cfg = d / "config"
    cfg.mkdir(parents=True, exist_ok=True)

    def ctl(*argv: str) -> str:
        r = subprocess.run([ternctl_bin, *argv], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ternctl {' '.join(argv)} exited {r.returncode}: {r.stderr[-300:]}")
        return r.stdout.strip()

    ctl("ca", "init", "--dir", str(d / "ca"))
    tokens = d / "tokens.yaml"
    token_files = {}
    for sa in (MTLS_CLIENT_SA, MTLS_SERVER_SA):
        tok = ctl("ca", "token", "--tokens", str(tokens), "--namespace", "bench",
                  "--service-account", sa).splitlines()[-1].strip()
        f = d / f"{sa}.token"
        f.write_text(tok + "\n")
        f.chmod(0o600)
        token_files[sa] = f
    # A's services point at B's inbound listeners (h1 -> B1, h2c -> B2), now annotated
    (cfg / "bench.yaml").write_text(tern_yaml(P["ternMB1"][1], P["ternMB2"][1], MTLS_SERVER_SA))
    grpc, cadmin = P["control"]
    # tern-control is idle during the measured windows; it stays off the proxy core
    procs.start("tern-control", [control_bin, "--config-dir", str(cfg),
                                 "--listen", f"{ADDR}:{grpc}", "--admin", f"{ADDR}:{cadmin}",
                                 "--ca-dir", str(d / "ca"), "--tokens", str(tokens),
                                 "--log", "warn"], LOAD_CPU)
    if not wait_http(cadmin, "/ready", timeout=20):
        raise RuntimeError("tern-control: /ready not 200 within 20s (see logs/tern-control.log)")
    sidecars = [("ternMA", MTLS_CLIENT_SA, P["up_h1"]),
                ("ternMB1", MTLS_SERVER_SA, P["up_h1"]),
                ("ternMB2", MTLS_SERVER_SA, P["up_h2c"])]
    for name, sa, app in sidecars:
        out, inb, admin = P[name]
        state = d / "state" / name
        state.mkdir(parents=True, exist_ok=True)
        procs.start(name, [tern_bin, "--control-plane", f"{ADDR}:{grpc}",
                           "--service-account", sa, "--namespace", "bench",
                           "--token-file", str(token_files[sa]), "--state-dir", str(state),
                           "--workload", name,
                           "--outbound", f"{ADDR}:{out}", "--inbound", f"{ADDR}:{inb}",
                           "--app", f"{ADDR}:{app}", "--admin", f"{ADDR}:{admin}",
                           "--workers", "1", "--drain-timeout", "1s", "--log", "warn"],
                    PROXY_CPU)
    for name, _, _ in sidecars:
        # /ready is 503 until the sidecar has its config and its certificate
        if not wait_http(P[name][2], "/ready", timeout=ready_timeout):
            raise RuntimeError(f"{name}: /ready not 200 within {ready_timeout:g}s "
                               f"(see logs/{name}.log)")
        ident = http_text(P[name][2], "/identity") or ""
        (procs.logs / f"{name}.identity").write_text(ident)
    if not wait_http(P["ternMA"][0], "/", HOST_H1, timeout=ready_timeout / 2):
        raise RuntimeError("tern-mtls-pair: no 200 through A for upstream.bench")
    r = subprocess.run(["taskset", "-c", LOAD_CPU, "h2load", "-n", "20", "-c", "1",
                        "-H", f":authority: {HOST_H2C}", f"http://{ADDR}:{P['ternMA'][0]}/"],
                       capture_output=True, text=True, timeout=ready_timeout)
    if "status codes: 20 2xx" not in r.stdout:
        raise RuntimeError(f"tern-mtls-pair: h2c through A failed: {r.stdout[-400:]}")
    for b in ("ternMB1", "ternMB2"):
        check_mtls(b)


def inbound_clients(admin_port: int) -> Optional[dict[str, float]]:
    """tern_inbound_clients_total summed by its tls label, from a sidecar's /metrics."""
    text = http_text(admin_port, "/metrics")
    if text is None:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tern_inbound_clients_total{"):
            labels, _, value = line.rpartition(" ")
            tls = labels.split('tls="', 1)[1].split('"', 1)[0] if 'tls="' in labels else "?"
            out[tls] = out.get(tls, 0.0) + float(value)
    return out


def check_mtls(name: str) -> dict[str, float]:
    """Fails unless the server sidecar `name` accepted mTLS connections, and only those."""
    c = inbound_clients(P[name][2])
    if c is None:
        raise RuntimeError(f"{name}: /metrics unreadable")
    if c.get("mtls", 0) <= 0 or c.get("plaintext", 0) > 0:
        raise RuntimeError(f"{name}: NOT mTLS: tern_inbound_clients_total by tls = {c}")
    return c


def start_nginx(procs: Procs, name: str, conf: Path, cpu: str, port: int):
    procs.start(name, ["nginx", "-c", str(conf), "-p", str(conf.parent)], cpu)
    if not wait_port(port):
        raise RuntimeError(f"{name}: port {port} not listening (see logs/{name}.log)")


def start_haproxy(procs: Procs, name: str, conf: Path, port: int):
    procs.start(name, ["haproxy", "-db", "-f", str(conf)], PROXY_CPU)
    if not wait_port(port):
        raise RuntimeError(f"{name}: port {port} not listening")


def start_all(procs: Procs, conf: Path, targets: dict[str, Target], tern_bin: Optional[str],
              tern_error: Optional[str], control_bin: Optional[str] = None,
              ternctl_bin: Optional[str] = None):
    start_nginx(procs, "upstream", upstream_conf(conf / "upstream"), LOAD_CPU, P["up_h1"])
    if not wait_http(P["up_h1"]):
        raise RuntimeError("upstream nginx does not answer")

    def guard(names: list[str], fn):
        names = [n for n in names if n in targets]
        if not names:
            return  # target not selected: do not start it
        try:
            fn()
        except Exception as e:  # a target that fails to start is reported, not fatal
            for n in names:
                targets[n].error = str(e)
            print(f"warning: {names}: {e}", file=sys.stderr)

    guard(["nginx"], lambda: start_nginx(
        procs, "nginx",
        nginx_proxy_conf(conf / "nginx", [(P["nginx_h1"], False), (P["nginx_h2c"], True)],
                         P["up_h1"]), PROXY_CPU, P["nginx_h1"]))

    def two_nginx():
        start_nginx(procs, "nginxY", nginx_proxy_conf(conf / "nginxY", [(P["nginxY_h1"], False)],
                                                      P["up_h1"]), PROXY_CPU, P["nginxY_h1"])
        start_nginx(procs, "nginxX",
                    nginx_proxy_conf(conf / "nginxX", [(P["nginxX_h1"], False),
                                                       (P["nginxX_h2c"], True)], P["nginxY_h1"]),
                    PROXY_CPU, P["nginxX_h1"])
    guard(["nginx-2hop"], two_nginx)
    guard(["haproxy"], lambda: start_haproxy(
        procs, "haproxy", haproxy_conf(conf / "haproxy", P["haproxy_h1"], P["haproxy_h2c"]),
        P["haproxy_h1"]))
    if tern_bin is None:
        for n in ("tern", "tern-pair", "tern-mtls-pair"):
            if n in targets:
                targets[n].error = tern_error or "tern-proxy not built"
        return
    guard(["tern"], lambda: start_tern(procs, conf, "tern1", P["tern1"], P["up_h1"],
                                       (P["up_h1"], P["up_h2c"]), tern_bin))

    def pair():
        start_tern(procs, conf, "ternB1", P["ternB1"], P["up_h1"], PAIR_ENDPOINTS, tern_bin)
        start_tern(procs, conf, "ternB2", P["ternB2"], P["up_h2c"], PAIR_ENDPOINTS, tern_bin)
        start_tern(procs, conf, "ternA", P["ternA"], P["up_h1"], PAIR_ENDPOINTS, tern_bin)
    guard(["tern-pair"], pair)
    if "tern-mtls-pair" in targets:
        missing = [f for f, b in (("tern-control", control_bin), ("ternctl", ternctl_bin))
                   if not b or not os.access(b, os.X_OK)]
        if missing:
            targets["tern-mtls-pair"].error = f"{' and '.join(missing)} not built"
        else:
            guard(["tern-mtls-pair"], lambda: start_mtls_pair(procs, conf, tern_bin, control_bin,
                                                              ternctl_bin))


# ---------------------------------------------------------------------------
# running load


def load_cmd(target: Target, test: Test, duration: float, log_file: Optional[Path]) -> list[str]:
    port = target.h1 if test.proto == "h1" else target.h2c
    host = target.host_h1 if test.proto == "h1" else target.host_h2c
    url = f"http://{ADDR}:{port}/"
    if test.tool == "wrk":
        return ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{test.conns}",
                f"-d{max(1, round(duration))}s", "--timeout", "5s",
                "-H", f"Host: {host}", "-s", str(HERE / "wrk_stats.lua"), url]
    cmd = ["taskset", "-c", LOAD_CPU, "h2load", "-t1", f"-c{test.conns}", f"-m{test.streams}",
           f"-D{int(duration * 1000)}ms", "-T", "10", "-N", "5"]
    if test.proto == "h1":
        cmd += ["--h1"]
    # h2load derives Host (HTTP/1.1) from :authority; a "host:" header would be sent twice
    cmd += ["-H", f":authority: {host}"]
    if test.rps:
        cmd += [f"--rps={test.rps / test.conns:g}"]
    if log_file:
        cmd += [f"--log-file={log_file}"]
    return cmd + [url]


def run_load(cmd: list[str], timeout: float) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-500:]}")
    return r.stdout


def measure(procs: Procs, target: Target, test: Test, duration: float, raw: Path,
            rep: int) -> dict:
    names = target.procs[test.proto]
    pids = [pid for n in names for pid in procs.tree(n)]
    if names and len(pids) < len(names):
        raise RuntimeError(f"{target.name}: a proxy process is gone")
    log_file = raw / f"{target.name}_{test.name}_r{rep}.h2log" if test.tool == "h2load" else None
    cmd = load_cmd(target, test, duration, log_file)
    reset_hwm(pids)
    t0 = time.monotonic()
    (u0, k0), s0 = user_sys_ticks(pids), sched_ns(pids)
    x0 = [context_switches(pids, k) for k in ("voluntary", "nonvoluntary")]
    out = run_load(cmd, timeout=duration + 60)
    (u1, k1), s1 = user_sys_ticks(pids), sched_ns(pids)
    x1 = [context_switches(pids, k) for k in ("voluntary", "nonvoluntary")]
    c0, c1 = u0 + k0, u1 + k1
    wall = time.monotonic() - t0
    hwm = status_kb(pids, "VmHWM") if pids else None
    (raw / f"{target.name}_{test.name}_r{rep}.txt").write_text(" ".join(cmd) + "\n\n" + out)
    if test.tool == "wrk":
        res = parse.parse_wrk(out)
    else:
        res = parse.parse_h2load(out)
        with open(log_file) as f:
            res.update(parse.latency_percentiles_ms(parse.parse_h2load_log(f)))
        log_file.unlink()  # can be large; percentiles are kept
    res["cpu_us_per_req"] = (parse.cpu_us_per_request(c0, c1, CLK_TCK, res["requests"])
                             if pids else None)
    # The split: user space (what callgrind counts) and the kernel (system calls, TCP).
    res["user_us_per_req"] = (parse.cpu_us_per_request(u0, u1, CLK_TCK, res["requests"])
                              if pids else None)
    res["sys_us_per_req"] = (parse.cpu_us_per_request(k0, k1, CLK_TCK, res["requests"])
                             if pids else None)
    # Fewer switches per request: more events handled per wake-up (batching).
    for i, kind in enumerate(("waits", "preemptions")):
        res[f"{kind}_per_req"] = ((x1[i] - x0[i]) / res["requests"]
                                  if pids and res["requests"] else None)
    res["cpu_us_per_req_schedstat"] = ((s1 - s0) / 1e3 / res["requests"]
                                       if pids and res["requests"] else None)
    res["proxy_cpu_pct"] = ((c1 - c0) / CLK_TCK / wall * 100) if pids else None
    res["peak_rss_kb"] = hwm
    res["rep"] = rep
    return res


def busy_note() -> dict:
    la = Path("/proc/loadavg").read_text().split()[:3]
    builds = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                comm = Path(f"/proc/{d}/comm").read_text().strip()
            except OSError:
                continue
            if comm in ("rustc", "cc1", "cc1plus", "ld", "cargo", "clippy-driver", "rust-lld"):
                builds += 1
    dirty = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("Dirty:")), None)
    return {"loadavg": [float(x) for x in la], "build_procs": builds, "dirty_kb": dirty}


# ---------------------------------------------------------------------------
# idle connections / memory


def idle_test(procs: Procs, conf: Path, which: str, n: int, tern_bin: Optional[str]) -> dict:
    name = f"mem-{which}-{n}"
    if which == "tern":
        port = P["mem_tern"][0]
        start_tern(procs, conf, name, P["mem_tern"], P["up_h1"], (P["up_h1"], P["up_h2c"]),
                   tern_bin)
    elif which == "nginx":
        port = P["mem_nginx"]
        start_nginx(procs, name, nginx_proxy_conf(conf / name, [(port, False)], P["up_h1"],
                                                  wconns=n + 1024), PROXY_CPU, port)
    else:
        port = P["mem_haproxy"]
        start_haproxy(procs, name, haproxy_conf(conf / name, port, port + 1), port)
    try:
        time.sleep(0.3)
        pids = procs.tree(name)
        base = status_kb(pids, "VmRSS")
        t0 = time.monotonic()

        async def go():
            conns, failures = await idle_conns.open_idle(port, HOST_H1, n, parallel=200)
            await asyncio.sleep(0.5)
            held = idle_conns.count_open(conns)
            rss = status_kb(pids, "VmRSS")
            hwm = status_kb(pids, "VmHWM")
            await idle_conns.close_all(conns)
            return len(conns), failures, held, rss, hwm

        opened, failures, held, rss, hwm = asyncio.run(go())
        return {"target": which, "test": f"idle-{n}", "connections": n, "opened": opened,
                "failed": failures, "held_at_sample": held, "baseline_rss_kb": base,
                "rss_kb": rss, "peak_rss_kb": hwm, "open_s": round(time.monotonic() - t0, 2)}
    finally:
        procs.stop(name)


# ---------------------------------------------------------------------------
# summary


METRICS = ["rps"] + [pkey(p) + "_ms" for p in PERCENTILES] + [
    "cpu_us_per_req", "cpu_us_per_req_schedstat", "peak_rss_kb", "proxy_cpu_pct"]


def summarise(cells: dict, targets: dict[str, Target], tests: list[str]) -> list[dict]:
    """cells[(target, test)] = list of per-rep dicts -> one summary dict per cell."""
    rows = []
    med = {}
    for (tn, te), reps in cells.items():
        ok = [r for r in reps if "error" not in r]
        m = {k: median(r.get(k) for r in ok) for k in METRICS}
        m["errors"] = sum(r.get("errors", 0) + r.get("non_2xx", 0) for r in ok)
        m["requests_total"] = sum(r.get("requests", 0) for r in ok)
        med[(tn, te)] = m
    for (tn, te), reps in cells.items():
        t = targets[tn]
        m = med[(tn, te)]
        ref = med.get((t.ref, te), {})
        row = {"kind": "load", "target": tn, "test": te, "hops": t.hops, "ref": t.ref,
               "reps": len([r for r in reps if "error" not in r]), **m,
               "ratio": {k: ratio(m.get(k), ref.get(k)) for k in
                         ("rps", "p50_ms", "p99_ms", "p99.9_ms", "cpu_us_per_req", "peak_rss_kb")},
               "raw": reps}
        d = med.get(("direct", te), {})
        row["added_p99_ms"] = (m["p99_ms"] - d["p99_ms"]
                               if m.get("p99_ms") is not None and d.get("p99_ms") is not None
                               and tn != "direct" else None)
        errs = [r["error"] for r in reps if "error" in r]
        if errs:
            row["failed_reps"] = errs
        rows.append(row)
    return rows


def mb(kb: Optional[float]) -> Optional[float]:
    return None if kb is None else kb * 1024 / 1e6


def p99_spread(*cells: dict) -> float:
    """Largest max - min of p99 across the reps of any of these cells (ms)."""
    spread = 0.0
    for cell in cells:
        p = [r["p99_ms"] for r in cell.get("raw", []) if r.get("p99_ms") is not None]
        if len(p) > 1:
            spread = max(spread, max(p) - min(p))
    return spread


def goals(rows: list[dict], idle: list[dict]) -> list[tuple[str, str, str]]:
    """[(goal, measured, met/missed/not measured)]."""
    by = {(r["target"], r["test"]): r for r in rows}
    out = []

    def verdict(ok):
        return "not measured" if ok is None else ("met" if ok else "missed")

    for te, label in (("h1-closed", "HTTP/1.1"), ("h2c-closed", "h2c")):
        t, n = by.get(("tern", te), {}), by.get(("nginx", te), {})
        a, b = t.get("cpu_us_per_req"), n.get("cpu_us_per_req")
        ok = None if a is None or b is None else a <= b
        out.append((f"tern CPU/request ≤ nginx's, {label} hop ({te})",
                    f"tern {fmt(a, '.1f')} µs vs nginx {fmt(b, '.1f')} µs", verdict(ok)))
    for te in ("h1-rate-1k", "h1-rate-5k", "h2c-rate-1k", "h2c-rate-5k"):
        t, n = by.get(("tern", te)), by.get(("nginx", te))
        if not t or not n:
            continue
        a, b = t.get("added_p99_ms"), n.get("added_p99_ms")
        ok = None if a is None or b is None else (a - b) <= 0.05
        # p99 spread across reps of the three cells involved: when it dwarfs the 0.05 ms
        # threshold the verdict says so instead of pretending precision
        spread = p99_spread(t, n, by.get(("direct", te), {}))
        v = verdict(ok)
        if ok is not None and spread > 0.1:
            v = f"inconclusive (would be {v}): p99 varies {spread:.2f} ms across reps"
        p90 = (None if t.get("p90_ms") is None or n.get("p90_ms") is None
               else t["p90_ms"] - n["p90_ms"])
        # tern - nginx within each rep (run back to back, so they share the machine's
        # state at that moment): steadier than the difference of the two medians
        paired = sorted(x["p99_ms"] - y["p99_ms"] for x, y in zip(t.get("raw", []),
                                                                    n.get("raw", []))
                        if x.get("p99_ms") is not None and y.get("p99_ms") is not None)
        paired_txt = ("" if not paired else
                      f"; per-rep tern - nginx p99: median "
                      f"{statistics.median(paired):+.3f}, {paired[0]:+.3f} to {paired[-1]:+.3f}")
        out.append((f"tern added p99 within 0.05 ms of nginx's ({te})",
                    f"tern {fmt(a, '+.3f')} ms vs nginx {fmt(b, '+.3f')} ms over direct "
                    f"(diff {fmt(None if ok is None else a - b, '+.3f')} ms; p90 diff "
                    f"{fmt(p90, '+.3f')} ms{paired_txt})", v))
    idle_by = {(i["target"], i["connections"]): i for i in idle}
    i64 = idle_by.get(("tern", 64), {}).get("peak_rss_kb")
    l64 = by.get(("tern", "h1-closed"), {}).get("peak_rss_kb")
    vals = [v for v in (i64, l64) if v is not None]
    worst = max(vals) if vals else None
    out.append(("tern peak RSS at 64 connections ≤ 10 MB",
                f"{fmt(mb(i64), '.1f')} MB idle, {fmt(mb(l64), '.1f')} MB under h1-closed load (64 conns)",
                verdict(None if worst is None else mb(worst) <= 10)))
    i10k = idle_by.get(("tern", 10000), {})
    v = i10k.get("peak_rss_kb")
    held = i10k.get("held_at_sample")
    out.append(("tern peak RSS at 10,000 idle connections ≤ 40 MB",
                f"{fmt(mb(v), '.1f')} MB ({fmt(held, 'd')} held)",
                verdict(None if v is None else (mb(v) <= 40 and held == 10000))))
    for te in ("h1-closed", "h2c-closed"):
        a = by.get(("tern-pair", te), {}).get("cpu_us_per_req")
        b = by.get(("nginx-2hop", te), {}).get("cpu_us_per_req")
        ok = None if a is None or b is None else a < b
        out.append((f"tern pair CPU/request < two nginx hops ({te})",
                    f"pair {fmt(a, '.1f')} µs vs 2×nginx {fmt(b, '.1f')} µs", verdict(ok)))
    # issue 8: the mTLS pair against linkerd2-proxy's pair (reference figures, not measured here)
    half = LINKERD_PAIR_CPU_US / 2
    for te in ("h1-closed", "h2c-closed", "h1-rate-1k", "h1-rate-5k"):
        r = by.get(("tern-mtls-pair", te))
        if not r:
            continue
        a = r.get("cpu_us_per_req")
        plain = by.get(("tern-pair", te), {}).get("cpu_us_per_req")
        out.append((f"mTLS pair CPU/request < half of linkerd2-proxy's pair "
                    f"({LINKERD_PAIR_CPU_US:g} µs / 2 = {half:g} µs) ({te})",
                    f"mTLS pair {fmt(a, '.1f')} µs (plain pair {fmt(plain, '.1f')} µs)",
                    verdict(None if a is None else a < half)))
    for te in ("h1-rate-1k",):
        r = by.get(("tern-mtls-pair", te))
        if not r:
            continue
        a = r.get("added_p99_ms")
        lim = LINKERD_PAIR_ADDED_P99_MS / 2
        d = by.get(("direct", te), {})
        spread = p99_spread(r, d)
        ok = None if a is None else a < lim
        v = verdict(ok)
        if ok is not None and spread > 0.1:
            v = f"inconclusive (would be {v}): p99 varies {spread:.2f} ms across reps"
        plain = by.get(("tern-pair", te), {}).get("added_p99_ms")
        out.append((f"mTLS pair added p99 < half of linkerd2-proxy's pair "
                    f"({LINKERD_PAIR_ADDED_P99_MS:g} ms / 2 = {lim:g} ms) ({te})",
                    f"mTLS pair {fmt(a, '+.3f')} ms over direct's p99 {fmt(d.get('p99_ms'), '.3f')} ms "
                    f"(plain pair {fmt(plain, '+.3f')} ms)", v))
    return out


def render(meta: dict, rows: list[dict], idle: list[dict], targets: dict[str, Target],
           tests: list[str]) -> str:
    L = [f"# Tern load benchmark — {meta['date']}", ""]
    L.append(f"- machine: {meta['nproc']} CPUs, {meta['cpu_model']}, kernel {meta['kernel']}, "
             f"{meta['mem_gib']:.0f} GiB")
    L.append(f"- versions: {meta['versions']['nginx']}; {meta['versions']['haproxy']}; "
             f"{meta['versions']['wrk']}; {meta['versions']['h2load']}; "
             f"{meta['versions']['rustc']}; tern git {meta['git_rev']}")
    L.append(f"- run: {meta['reps']} reps × {meta['duration_s']:g} s per cell (+{meta['warmup_s']:g} s "
             f"warm-up), medians shown; proxies on CPU {PROXY_CPU}, load generator + upstream on "
             f"CPU {LOAD_CPU}")
    L.append(f"- machine load: loadavg {meta['busy_start']['loadavg']} at start, "
             f"{meta.get('busy_end', {}).get('loadavg')} at end; compiler processes seen during "
             f"the run: max {meta.get('max_build_procs', 0)}"
             + (" — **the machine was busy with other builds: absolute numbers are noisy, "
                "compare ratios**" if meta.get("max_build_procs", 0) else ""))
    L.append("")
    by = {(r["target"], r["test"]): r for r in rows}
    headers = ["target", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "CPU µs/req",
               "CPU µs/req (schedstat)", "proxy CPU %", "peak RSS MB", "ratio ref", "req/s ×", "p99 ×", "CPU ×", "RSS ×"]
    for te in tests:
        L.append(f"## {te}: {TESTS[te].desc}")
        L.append("")
        body = []
        for tn, t in targets.items():
            r = by.get((tn, te))
            if t.error or r is None or r["reps"] == 0:
                why = t.error or (r or {}).get("failed_reps", ["not run"])[0]
                body.append([tn, f"not run: {why[:80]}"] + [""] * (len(headers) - 2))
                continue
            ra = r["ratio"]
            name = tn + (f" ⚠ {r['errors']} errors" if r["errors"] else "")
            body.append([name, fmt(r["rps"], ",.0f"), fmt(r["p50_ms"], ".3f"),
                         fmt(r["p90_ms"], ".3f"), fmt(r["p99_ms"], ".3f"),
                         fmt(r["p99.9_ms"], ".3f"), fmt(r["cpu_us_per_req"], ".1f"),
                         fmt(r.get("cpu_us_per_req_schedstat"), ".1f"),
                         fmt(r["proxy_cpu_pct"], ".0f"), fmt(mb(r["peak_rss_kb"]), ".1f"),
                         t.ref if tn != "direct" else "nginx",
                         fmt(ra["rps"], ".2f"), fmt(ra["p99_ms"], ".2f"),
                         fmt(ra["cpu_us_per_req"], ".2f"), fmt(ra["peak_rss_kb"], ".2f")])
        L.append(parse.markdown_table(headers, body))
        L.append("")
    if idle:
        L.append("## Memory against idle keep-alive connections (HTTP/1.1, one request each)")
        L.append("")
        body = [[i["target"], f"{i['connections']:,}", f"{i['opened']:,}", f"{i['held_at_sample']:,}",
                 fmt(mb(i["baseline_rss_kb"]), ".1f"), fmt(mb(i["rss_kb"]), ".1f"),
                 fmt(mb(i["peak_rss_kb"]), ".1f")] for i in idle]
        L.append(parse.markdown_table(["target", "connections", "opened", "held at sample",
                                       "RSS before MB", "RSS held MB", "peak RSS MB"], body))
        L.append("")
    L.append("## Targets (from the issue)")
    L.append("")
    L.append(parse.markdown_table(["goal", "measured", "verdict"],
                                  [list(g) for g in goals(rows, idle)], ["l", "l", "l"]))
    L.append("")
    L.append("Notes: " + "; ".join(f"**{t.name}**: {t.note}" for t in targets.values()) + ". "
             "MB = 10^6 bytes. CPU µs/req = utime+stime of all the target's proxy processes over "
             "the measured window ÷ requests completed; proxy CPU % = the same CPU time ÷ wall time "
             "(100 % = the one proxy core saturated). Ratios divide by the `ratio ref` row of the "
             "same test (one-hop targets by nginx, two-hop targets by nginx-2hop).")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------
# main


def cmd_out(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except Exception as e:
        return f"unavailable ({e})"


def machine_meta(args) -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = parse.parse_proc_status_kb(Path("/proc/meminfo").read_text(), "MemTotal") or 0
    return {
        "kind": "meta",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "mem_gib": mem_kb / 1024 / 1024,
        "versions": {
            "nginx": cmd_out(["nginx", "-v"]),
            "haproxy": cmd_out(["haproxy", "-v"]),
            "wrk": cmd_out(["wrk", "-v"]).split(" Copyright")[0],
            "h2load": cmd_out(["h2load", "--version"]),
            "rustc": cmd_out(["rustc", "-V"]),
            "python": platform.python_version(),
        },
        "git_rev": cmd_out(["git", "-C", str(HERE), "describe", "--always", "--dirty"]),
        "reps": args.reps, "duration_s": args.duration, "warmup_s": args.warmup,
        "tern_bin": args.tern_bin, "tern_build": args.tern_error or "ok",
        "tern_control_bin": args.tern_control_bin, "ternctl_bin": args.ternctl_bin,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, help="run directory (required unless --render)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--tests", default=",".join(DEFAULT_TESTS))
    ap.add_argument("--targets",
                    default="direct,nginx,haproxy,tern,nginx-2hop,tern-pair,tern-mtls-pair")
    ap.add_argument("--idle", default="64,1000,10000", help="idle connection counts ('' = skip)")
    ap.add_argument("--idle-targets", default="tern,nginx")
    ap.add_argument("--tern-bin", default=None)
    ap.add_argument("--tern-error", default=None)
    ap.add_argument("--tern-control-bin", default=None, help="for tern-mtls-pair")
    ap.add_argument("--ternctl-bin", default=None, help="for tern-mtls-pair (ca init, ca token)")
    ap.add_argument("--latest", type=Path, default=None, help="directory for latest.md/.jsonl")
    ap.add_argument("--render", type=Path, default=None,
                    help="only re-render summary.md from an existing results.jsonl")
    args = ap.parse_args()
    if args.render:
        objs = [json.loads(x) for x in args.render.read_text().splitlines() if x.strip()]
        meta = next(o for o in objs if o.get("kind") == "meta")
        rows = [o for o in objs if o.get("kind") == "load"]
        idle = [{k: v for k, v in o.items() if k != "kind"} for o in objs if o.get("kind") == "idle"]
        tests = list(dict.fromkeys(r["test"] for r in rows))
        all_t = make_targets()
        present = {r["target"] for r in rows}
        targets = {n: t for n, t in all_t.items() if n in present}
        md = render(meta, rows, idle, targets, tests)
        (args.render.parent / "summary.md").write_text(md)
        print(md)
        return

    if args.out is None:
        ap.error("--out is required")
    idle_conns.raise_nofile(65536)
    out: Path = args.out
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    conf = out / "conf"
    tests = [t for t in args.tests.split(",") if t]
    for t in tests:
        if t not in TESTS:
            sys.exit(f"unknown test {t}; known: {', '.join(TESTS)}")
    all_targets = make_targets()
    targets = {n: all_targets[n] for n in args.targets.split(",") if n}
    for ref in {t.ref for t in targets.values()} | {"direct"}:
        targets.setdefault(ref, all_targets[ref])  # ratios need their reference
    targets = {n: t for n, t in all_targets.items() if n in targets}  # keep canonical order
    if args.tern_bin and not os.access(args.tern_bin, os.X_OK):
        args.tern_error = f"{args.tern_bin} not executable"
        args.tern_bin = None

    meta = machine_meta(args)
    # Pages a build left dirty are written back by kernel workers that run on any CPU,
    # the proxies' included (seen with `perf sched`: up to 18 % of the proxy's core
    # for seconds after a build): flushed before measuring.
    os.sync()
    meta["busy_start"] = busy_note()
    max_builds = meta["busy_start"]["build_procs"]
    procs = Procs(out)

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)

    cells: dict = {}
    idle: list = []
    try:
        start_all(procs, conf, targets, args.tern_bin, args.tern_error, args.tern_control_bin,
                  args.ternctl_bin)
        n_cells = len(tests) * len(targets) * args.reps
        done = 0
        for rep in range(1, args.reps + 1):
            for te in tests:
                test = TESTS[te]
                for tn, t in targets.items():
                    cells.setdefault((tn, te), [])
                    if t.error:
                        continue
                    done += 1
                    try:
                        if args.warmup > 0:
                            run_load(load_cmd(t, test, args.warmup, None), args.warmup + 60)
                        if tn == "tern-mtls-pair":
                            try:  # after the warm-up: the server sidecar saw mTLS only
                                check_mtls(t.procs[test.proto][1])
                            except RuntimeError as e:
                                t.error = str(e)
                                print(f"ERROR: {e}", file=sys.stderr, flush=True)
                                raise
                        r = measure(procs, t, test, args.duration, raw, rep)
                        if tn == "tern-mtls-pair":
                            # connections B accepted so far: pooled, so this stays small
                            r["inbound_mtls_conns"] = check_mtls(t.procs[test.proto][1])["mtls"]
                        print(f"[{done}/{n_cells}] rep {rep} {te:12s} {tn:11s} "
                              f"{r['rps']:9,.0f} req/s  p99 {fmt(r['p99_ms'], '.3f')} ms  "
                              f"cpu {fmt(r['cpu_us_per_req'], '.1f')} µs/req  "
                              f"rss {fmt(mb(r['peak_rss_kb']), '.1f')} MB"
                              + (f"  errors {r['errors'] + r['non_2xx']}"
                                 if r['errors'] + r['non_2xx'] else ""), flush=True)
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired, OSError) as e:
                        print(f"[{done}/{n_cells}] rep {rep} {te} {tn}: FAILED {e}", flush=True)
                        r = {"rep": rep, "error": str(e)[:300]}
                    cells[(tn, te)].append(r)
                    max_builds = max(max_builds, busy_note()["build_procs"])
        counts = [int(x) for x in args.idle.split(",") if x]
        for which in args.idle_targets.split(","):
            if which == "tern" and not args.tern_bin:
                continue
            for n in counts:
                try:
                    i = idle_test(procs, conf, which, n, args.tern_bin)
                    print(f"idle {which:8s} {n:6d} conns: held {i['held_at_sample']}, "
                          f"rss {fmt(mb(i['rss_kb']), '.1f')} MB, peak {fmt(mb(i['peak_rss_kb']), '.1f')} MB",
                          flush=True)
                    idle.append(i)
                except Exception as e:
                    print(f"idle {which} {n}: FAILED {e}", flush=True)
                max_builds = max(max_builds, busy_note()["build_procs"])
    finally:
        for name in ("ternMA", "ternMB1", "ternMB2"):  # handshake and connection counters
            if name in procs.procs:
                m = http_text(P[name][2], "/metrics")
                if m:
                    (procs.logs / f"{name}.metrics").write_text(m)
        procs.stop_all()
    meta["busy_end"] = busy_note()
    meta["max_build_procs"] = max_builds

    rows = summarise(cells, targets, tests)
    rows.sort(key=lambda r: (tests.index(r["test"]), list(targets).index(r["target"])))
    with open(out / "results.jsonl", "w") as f:
        f.write(json.dumps(meta) + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for i in idle:
            f.write(json.dumps({"kind": "idle", **i}) + "\n")
        for g, m, v in goals(rows, idle):
            f.write(json.dumps({"kind": "goal", "goal": g, "measured": m, "verdict": v}) + "\n")
    md = render(meta, rows, idle, targets, tests)
    (out / "summary.md").write_text(md)
    if args.latest:
        shutil.copy(out / "summary.md", args.latest / "latest.md")
        shutil.copy(out / "results.jsonl", args.latest / "latest.jsonl")
    print()
    print(md)


if __name__ == "__main__":
    main()
