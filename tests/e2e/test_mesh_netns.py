"""The mesh in network namespaces (issue 8): tern-control in the root namespace on the
bridge address, and per "pod" an application, its sidecar (tern-proxy in managed mode, as
uid 2102) and tern-init's rules. Client applications call the server's real pod IP and port,
unaware of the mesh.

Pods of the shared `mesh` (module scope): A (client, service account `a`), B (server `b`:
HTTP on 8080, a client-first echo on 9000, a server-first banner on 9001), C (another
meshed client, service account `c`) and D (no sidecar, no tern-init: a plain client).
Certificates for the refusal tests are made with `cryptography` and presented from the
root namespace (no tern-init there). Renewal and anchor rotation run on meshes of their own
(two pods each) because they change the CA.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import Metrics, binary, free_port, http_get, wait_until, write_config
from netns import PROXY_UID, Netns, Pod, require_tools, skip_unless_netns, sweep_stale

NS = "mesh"
TD = "cluster.local"
MARKER = "tern-secret-body-7f3a9c"  # in B's HTTP answers: must never be on the wire in clear
CLUSTER_IP_WRONG = "10.96.77.20"  # Service b-wrong: B's pod, but the wrong service account

# A Python any uid can run (pyenv builds may live under /root); the apps run as root anyway.
PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def spiffe(sa: str) -> str:
    return f"spiffe://{TD}/ns/{NS}/sa/{sa}"


# --------------------------------------------------------------------------------------
# the applications: one program, `serve NAME` (B's app) and client modes

APP = r"""
import http.client, json, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = "%MARKER%"

def serve(name):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = json.dumps({"name": name, "path": self.path, "peer": "%s:%d" % self.client_address,
                               "marker": MARKER}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    httpd = ThreadingHTTPServer(("0.0.0.0", 8080), H)

    def lines(conn, banner):
        with conn:
            conn.settimeout(30)
            if banner:
                conn.sendall(b"BANNER " + name.encode() + b"\r\n")
            f = conn.makefile("rb")
            for line in f:
                conn.sendall((b"got:" if banner else b"echo:") + line)

    def accept(port, banner):
        srv = socket.create_server(("0.0.0.0", port), backlog=64)
        while True:
            c, _ = srv.accept()
            threading.Thread(target=lines, args=(c, banner), daemon=True).start()

    threading.Thread(target=accept, args=(9000, False), daemon=True).start()
    threading.Thread(target=accept, args=(9001, True), daemon=True).start()
    print("ready", flush=True)
    httpd.serve_forever()

def get(host, port, path):
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode(errors="replace")
        return {"status": r.status, "headers": {k.lower(): v for k, v in r.getheaders()}, "body": body}
    except Exception as e:
        return {"error": repr(e)}

def load(host, port, seconds):
    # New connection per request (the app side), bounded in time and rate.
    ok, failed, errors, statuses = 0, 0, [], {}
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        r = get(host, port, "/load")
        if r.get("status") == 200 and MARKER in r.get("body", ""):
            ok += 1
        else:
            failed += 1
            if len(errors) < 10:
                errors.append(r)
        time.sleep(0.02)
    return {"ok": ok, "failed": failed, "errors": errors}

def line_client(host, port, banner, msg):
    out = {}
    try:
        s = socket.create_connection((host, int(port)), timeout=10)
        f = s.makefile("rb")
        if banner:
            out["banner"] = f.readline().decode()
        s.sendall(msg.encode() + b"\n")
        out["reply"] = f.readline().decode()
        s.close()
    except Exception as e:
        out["error"] = repr(e)
    return out

mode = sys.argv[1]
if mode == "serve":
    serve(sys.argv[2])
elif mode == "get":
    print(json.dumps(get(*sys.argv[2:5])))
elif mode == "load":
    print(json.dumps(load(*sys.argv[2:5])))
elif mode in ("echo", "banner"):
    print(json.dumps(line_client(sys.argv[2], sys.argv[3], mode == "banner", sys.argv[4])))
""".replace("%MARKER%", MARKER)


_app_file: Path | None = None


def app_file() -> Path:
    """APP in a file anyone may read (short argv in the logs)."""
    global _app_file
    if _app_file is None or not _app_file.exists():
        fd, name = tempfile.mkstemp(prefix="tern-mesh-app-", suffix=".py")
        os.write(fd, APP.encode())
        os.close(fd)
        os.chmod(name, 0o644)
        _app_file = Path(name)
    return _app_file


def app_run(pod: Pod, *args, timeout: float = 25) -> dict:
    out = pod.run([PY, app_file(), *args], timeout=timeout).stdout
    try:
        return json.loads(out)
    except ValueError:
        return {"error": f"client printed {out!r}"}


def app_get(pod: Pod, host: str, port: int, path: str = "/") -> dict:
    """An HTTP/1.1 GET by the pod's application (root: redirected by tern-init)."""
    return app_run(pod, "get", host, port, path)


def app_line(pod: Pod, mode: str, host: str, port: int, msg: str) -> dict:
    """`echo` (client-first) or `banner` (server-first) line exchange."""
    return app_run(pod, mode, host, port, msg)


# --------------------------------------------------------------------------------------
# the mesh


def docs_for(b_ip: str, mode: str | None = None, extra: list | None = None) -> list[dict]:
    svc_meta = {"name": "b", "namespace": NS}
    if mode:
        svc_meta["annotations"] = {"tern.dev/mtls-mode": mode}
    ports = [("http", 8080), ("echo", 9000), ("banner", 9001)]
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": svc_meta,
         "spec": {"ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "b-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "b"},
                      "annotations": {"tern.dev/service-account": "b"}},
         "addressType": "IPv4",
         "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
         "endpoints": [{"addresses": [b_ip]}]},
        # the same pod under a clusterIP, but the slice names the wrong service account
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b-wrong", "namespace": NS},
         "spec": {"clusterIP": CLUSTER_IP_WRONG, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "b-wrong-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "b-wrong"},
                      "annotations": {"tern.dev/service-account": "not-b"}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": [b_ip]}]},
    ]
    return docs + (extra or [])


def authz(name: str, allow: list[dict], target: str = "b") -> dict:
    return {"apiVersion": "policy.tern.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": target}], "allow": allow}}


class Sidecar:
    def __init__(self, mesh: "Mesh", pod: Pod, sa: str):
        self.pod, self.sa, self.mesh = pod, sa, mesh
        token = mesh.token_of[sa]
        self.token_file = mesh.shared / f"{sa}-{pod.index}.token"
        self.token_file.write_text(token + "\n")
        self.token_file.chmod(0o644)
        self.state_dir = mesh.shared / f"state-{pod.index}"
        self.state_dir.mkdir()
        os.chown(self.state_dir, PROXY_UID, PROXY_UID)
        self.proc = pod.popen([
            mesh.bin("tern-proxy"), "--control-plane", mesh.control_addr, "--namespace", NS,
            "--service-account", sa, "--token-file", self.token_file, "--state-dir", self.state_dir,
            "--workload", f"{sa}-{pod.index}", "--outbound", "127.0.0.1:4140", "--inbound", "0.0.0.0:4143",
            "--admin", "0.0.0.0:4191", "--workers", "1",
        ], uid=PROXY_UID, name=f"sidecar-{sa}")

    @property
    def admin(self) -> str:
        return f"{self.pod.ip}:4191"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.admin, path, timeout=5)

    def metrics(self) -> Metrics:
        status, body = self.get("/metrics")
        assert status == 200, body
        return Metrics(body)

    def identity(self) -> dict:
        status, body = self.get("/identity")
        assert status == 200, body
        return json.loads(body)

    def applied_version(self):
        status, body = self.get("/control")
        return json.loads(body).get("applied_version") if status == 200 else None

    def wait_ready(self, timeout: float = 30):
        def ready():
            self.proc.ensure_alive()
            return self.get("/ready")[0] == 200
        wait_until(ready, timeout, f"sidecar {self.sa} /ready (a certificate)", interval=0.1)

    def handshakes(self, result: str, direction: str | None = None) -> float:
        kw = {"result": result} if direction is None else {"result": result, "direction": direction}
        return self.metrics().sum("tern_tls_handshakes_total", **kw)

    def log(self) -> str:
        return self.proc.stderr_path.read_text(errors="replace") + self.proc.stdout_path.read_text(errors="replace")

    def dump(self) -> str:
        try:
            m = "\n".join(line for line in self.get("/metrics")[1].splitlines()
                          if line.startswith(("tern_tls", "tern_inbound_clients", "tern_authz", "tern_identity")))
        except OSError as e:
            m = repr(e)
        return f"--- sidecar {self.sa} ({self.pod.ip}) metrics ---\n{m}\n{self.proc.logs(60)}"


class Mesh:
    """tern-control (with a CA and tokens) in the root namespace, sidecars in pods."""

    def __init__(self, net: Netns, accounts=("a", "b", "c"), lifetime: str = "24h"):
        require_tools("iptables-nft-restore", "setpriv", "ss", "tcpdump")
        self.net = net
        # everything uid 2102 reads or writes: outside pytest's root-only tmp dirs
        self.shared = Path(tempfile.mkdtemp(prefix="tern-mesh-"))
        self.shared.chmod(0o755)
        self.bin_dir = self._binaries()
        self.ca_dir = self.shared / "ca"
        self.ternctl("ca", "init", "--dir", self.ca_dir, "--trust-domain", TD)
        self.tokens = self.shared / "tokens.yaml"
        # tokens first: tern-control reads the file at start (it reloads it on changes too)
        self.token_of = {sa: self.ternctl("ca", "token", "--tokens", self.tokens, "--namespace", NS,
                                          "--service-account", sa).stdout.decode().strip() for sa in accounts}
        self.config_dir = self.shared / "config"
        self.config_dir.mkdir()
        self.control_addr = f"{net.host_ip}:{free_port()}"
        self.control_admin = f"{net.host_ip}:{free_port()}"
        self.sidecars: dict[str, Sidecar] = {}
        self.lifetime = lifetime
        self.control = None

    def _binaries(self) -> Path:
        """target/debug if uid 2102 can run tern-proxy from there, else a 0755 copy."""
        src = binary("tern-proxy")
        r = subprocess.run(["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "--",
                            str(src), "--version"], capture_output=True, timeout=20)
        if r.returncode == 0:
            return src.parent
        copy = self.shared / "bin"
        copy.mkdir()
        shutil.copy2(src, copy / "tern-proxy")
        (copy / "tern-proxy").chmod(0o755)
        return copy

    def bin(self, name: str) -> Path:
        return self.bin_dir / name if name == "tern-proxy" else binary(name)

    def ternctl(self, *args) -> subprocess.CompletedProcess:
        r = subprocess.run([str(binary("ternctl")), *map(str, args)], capture_output=True, timeout=30)
        assert r.returncode == 0, f"ternctl {args}: {r.stderr.decode(errors='replace')}"
        return r

    def start_control(self, docs: list[dict]):
        write_config(self.config_dir, "mesh.yaml", docs)
        self.docs = docs
        self.control = self.net.popen([
            binary("tern-control"), "--config-dir", self.config_dir, "--listen", self.control_addr,
            "--admin", self.control_admin, "--ca-dir", self.ca_dir, "--tokens", self.tokens,
            "--cert-lifetime", self.lifetime, "--debounce", "50ms", "--max-delay", "300ms",
        ], name="tern-control")
        wait_until(lambda: self.control.ensure_alive() or http_get(self.control_admin, "/ready")[0] == 200,
                   20, "tern-control /ready", interval=0.1)

    def add(self, pod: Pod, sa: str) -> Sidecar:
        pod.tern_init()
        s = Sidecar(self, pod, sa)
        self.sidecars[sa] = s
        return s

    def wait_all_ready(self):
        for s in self.sidecars.values():
            s.wait_ready()

    def push(self, docs: list[dict], timeout: float = 20):
        """Writes the config and waits until every sidecar applied the new version."""
        before = {sa: s.applied_version() for sa, s in self.sidecars.items()}
        write_config(self.config_dir, "mesh.yaml", docs)
        self.docs = docs

        def applied():
            now = {sa: s.applied_version() for sa, s in self.sidecars.items()}
            return all(now[sa] != before[sa] for sa in now) and len(set(now.values())) == 1
        wait_until(applied, timeout, "every sidecar to apply the new config", interval=0.1)

    def dump(self) -> str:
        parts = [s.dump() for s in self.sidecars.values()]
        if self.control:
            parts.append(self.control.logs(40))
        return "\n".join(parts)

    def close(self):
        shutil.rmtree(self.shared, ignore_errors=True)


def start_app(pod: Pod, name: str):
    proc = pod.popen([PY, app_file(), "serve", name], name=f"app-{name}")
    for port in (8080, 9000, 9001):
        pod.wait_listening(port)
    proc.ensure_alive()
    return proc


def make_net(tmp_path_factory, n_pods: int) -> Netns:
    skip_unless_netns()
    sweep_stale()
    return Netns(n_pods=n_pods, log_dir=tmp_path_factory.mktemp("netns"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    net = make_net(tmp_path_factory, 4)
    m = None
    try:
        a, b, c, d = net.pods
        m = Mesh(net)
        m.start_control(docs_for(b.ip))
        start_app(b, "B")
        m.add(a, "a")
        m.add(b, "b")
        m.add(c, "c")
        m.wait_all_ready()
        yield m
    finally:
        net.close()
        if m:
            m.close()
        if _app_file:
            _app_file.unlink(missing_ok=True)


@pytest.fixture
def base_config(mesh):
    """Restores the module's base config after a test that changes it."""
    yield
    mesh.push(docs_for(mesh.net.pods[1].ip, extra=[{"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": f"restore-{time.monotonic_ns()}", "namespace": "other"}, "spec": {"ports": [{"port": 1}]}}]))


# --------------------------------------------------------------------------------------
# 1. HTTP through the mesh


def test_http_through_the_mesh_is_mtls_on_the_wire(mesh: Mesh):
    a, b = mesh.net.pods[0], mesh.net.pods[1]
    sb = mesh.sidecars["b"]
    with a.capture(f"tcp and host {b.ip}") as cap:
        r = app_get(a, b.ip, 8080, "/hello-through-the-mesh")
    assert r.get("status") == 200, f"{r}\n{mesh.dump()}"
    body = json.loads(r["body"])
    assert body["name"] == "B" and body["path"] == "/hello-through-the-mesh", body
    # B's app sees its own sidecar (loopback to the pod IP), not A
    assert body["peer"].split(":")[0] in (b.ip, "127.0.0.1"), body

    m = sb.metrics()
    assert m.sum("tern_inbound_clients_total", tls="mtls", client_id=spiffe("a")) >= 1, mesh.dump()
    assert m.sum("tern_tls_handshakes_total", direction="inbound", result="ok") >= 1, mesh.dump()

    segs = cap.segments()
    assert cap.tls_records(), f"no TLS records between {a.ip} and {b.ip}: {segs[:5]}"
    assert all(s.dport == 8080 or s.sport == 8080 for s in segs), "the sidecar dials the original port"
    assert not cap.plaintext(b"GET /hello-through-the-mesh"), "the request line went in clear"
    assert not cap.plaintext(MARKER.encode()), "the response body went in clear"
    assert not cap.plaintext(b"HTTP/1.1"), "HTTP/1.1 in clear on the wire"


# --------------------------------------------------------------------------------------
# 2. refusals: a client certificate from the wrong CA, an expired one, the wrong server

_ANSI = __import__("re").compile(r"\x1b\[[0-9;]*m")


def plain_log(s: Sidecar) -> str:
    return _ANSI.sub("", s.log())


def make_certs(mesh: Mesh, out: Path, issuer_dir: Path | None = None) -> dict[str, tuple[Path, Path]]:
    """Client certificates for spiffe(a): `wrong_ca` (a self-made CA), `expired` (the
    mesh's own issuer, expired an hour ago) and `valid` (the mesh's issuer, valid now).
    Returns {kind: (chain.pem, key.pem)}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM

    def leaf(issuer_cert, issuer_key, not_before, not_after):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([]))
             .issuer_name(issuer_cert.subject)
             .public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(not_before).not_valid_after(not_after)
             .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe("a"))]), critical=True)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False))
        return b.sign(issuer_key, hashes.SHA256()), key

    def write(kind, cert, key, chain):
        c, k = out / f"{kind}.pem", out / f"{kind}.key"
        c.write_bytes(cert.public_bytes(pem) + b"".join(x.public_bytes(pem) for x in chain))
        k.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return c, k

    # a CA of our own, shaped like the mesh's
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the mesh CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    wrong, wrong_key = leaf(ca, ca_key, now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1))

    issuer_dir = issuer_dir or mesh.ca_dir
    issuer = x509.load_pem_x509_certificate((issuer_dir / "issuer.crt").read_bytes())
    issuer_key = serialization.load_pem_private_key((issuer_dir / "issuer.key").read_bytes(), None)
    expired, expired_key = leaf(issuer, issuer_key, now - datetime.timedelta(hours=2), now - datetime.timedelta(hours=1))
    valid, valid_key = leaf(issuer, issuer_key, now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1))
    return {"wrong_ca": write("wrong_ca", wrong, wrong_key, [ca]),
            "expired": write("expired", expired, expired_key, [issuer]),
            "valid": write("valid", valid, valid_key, [issuer])}


def tls_attempt(addr: tuple[str, int], chain: Path, key: Path) -> str:
    """A TLS 1.3 client (ALPN h2) with a client certificate, from the root namespace (no
    tern-init there). Returns what happened: the server must not let it talk."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(str(chain), str(key))
    with socket.create_connection(addr, timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                # TLS 1.3: the server judges the client certificate after the client's
                # Finished; its verdict arrives as an alert (or a close) on the next read.
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                data = s.recv(4096)
                return f"read {data!r}"
        except (ssl.SSLError, OSError) as e:
            return f"refused: {e!r}"


@pytest.mark.parametrize("kind,reason", [("wrong_ca", "unknown_ca"), ("expired", "expired")])
def test_inbound_refuses_bad_client_certificates(mesh: Mesh, tmp_path, kind, reason):
    b = mesh.net.pods[1]
    sb = mesh.sidecars["b"]
    chain, key = make_certs(mesh, tmp_path)[kind]
    before = sb.handshakes(reason, direction="inbound")
    outcome = tls_attempt((b.ip, 8080), chain, key)
    assert outcome.startswith("refused") or outcome == "read b''", outcome
    wait_until(lambda: sb.handshakes(reason, direction="inbound") == before + 1, 5,
               f"B to count result={reason} ({outcome})\n{mesh.dump()}")
    wait_until(lambda: f'reason="{reason}"' in plain_log(sb) or f"reason={reason}" in plain_log(sb), 5, f"B to log reason={reason}\n{mesh.dump()}")
    assert "inbound mTLS refused" in plain_log(sb)
    # and the mesh still works
    assert app_get(mesh.net.pods[0], b.ip, 8080).get("status") == 200


def check_identity_mismatch(mesh: Mesh, client: str):
    pod = mesh.net.pods["abc".index(client)]
    sc = mesh.sidecars[client]
    before = sc.handshakes("identity_mismatch", direction="outbound")
    r = app_get(pod, CLUSTER_IP_WRONG, 80, "/who")
    assert r.get("status") == 502, f"{r}\n{mesh.dump()}"
    assert r["headers"].get("tern-error", "").startswith("tls-failed"), r
    assert MARKER not in r.get("body", "")
    assert sc.handshakes("identity_mismatch", direction="outbound") > before, mesh.dump()
    assert "not-b" in plain_log(sc), mesh.dump()


def test_outbound_refuses_a_server_with_the_wrong_identity(mesh: Mesh):
    # C's sidecar has no connection to B's address yet: a fresh handshake is checked
    assert mesh.sidecars["c"].handshakes("ok", direction="outbound") == 0, "C talked to B before this test"
    check_identity_mismatch(mesh, "c")
    # and B itself, under its right identity, is still reached
    assert app_get(mesh.net.pods[2], mesh.net.pods[1].ip, 8080).get("status") == 200, mesh.dump()


def test_pooled_connection_is_not_reused_for_another_identity(mesh: Mesh):
    # regression (fixed in 806b72b): the HTTP/2 pool was keyed by (address, mtls) only
    a, b = mesh.net.pods[:2]
    assert app_get(a, b.ip, 8080).get("status") == 200  # a pooled mTLS connection to B, verified as b
    check_identity_mismatch(mesh, "a")


# --------------------------------------------------------------------------------------
# 5 and 6. authorization, HTTP and opaque TCP


def test_authorization_allows_a_and_denies_c(mesh: Mesh, base_config):
    a, b, c = mesh.net.pods[:3]
    sb = mesh.sidecars["b"]
    mesh.push(docs_for(b.ip, extra=[authz("only-a", [{"identities": [spiffe("a")]}])]))
    m0 = sb.metrics()
    for _ in range(3):
        ra = app_get(a, b.ip, 8080, "/from-a")
        assert ra.get("status") == 200, f"{ra}\n{mesh.dump()}"
        rc = app_get(c, b.ip, 8080, "/from-c")
        assert rc.get("status") == 403, f"{rc}\n{mesh.dump()}"
        assert rc["headers"].get("tern-error", "").startswith("unauthorized"), rc
        assert MARKER not in rc.get("body", "")
    m1 = sb.metrics()
    d = lambda m, **kw: m1.sum("tern_authz_total", **kw) - m0.sum("tern_authz_total", **kw)  # noqa: E731
    assert d(m1, decision="allow") >= 3 and d(m1, decision="deny") >= 3, mesh.dump()
    assert m1.sum("tern_inbound_clients_total", tls="mtls", client_id=spiffe("c")) >= 1, mesh.dump()  # per connection


def test_opaque_tcp_through_the_mesh_and_denied_to_c(mesh: Mesh, base_config):
    a, b, c = mesh.net.pods[:3]
    sb = mesh.sidecars["b"]
    before = sb.metrics().sum("tern_inbound_clients_total", tls="mtls", client_id=spiffe("a"))
    with a.capture(f"tcp and host {b.ip}") as cap:
        echo = app_line(a, "echo", b.ip, 9000, "ping-opaque-1")
        banner = app_line(a, "banner", b.ip, 9001, "hello-banner-1")
    assert echo.get("reply") == "echo:ping-opaque-1\n", f"{echo}\n{mesh.dump()}"
    assert banner.get("banner") == "BANNER B\r\n" and banner.get("reply") == "got:hello-banner-1\n", \
        f"{banner}\n{mesh.dump()}"
    assert sb.metrics().sum("tern_inbound_clients_total", tls="mtls", client_id=spiffe("a")) >= before + 2, mesh.dump()
    assert cap.tls_records(port=9000) and cap.tls_records(port=9001), cap.segments()[:6]
    for needle in (b"ping-opaque-1", b"hello-banner-1", b"BANNER B"):
        assert not cap.plaintext(needle), f"{needle!r} in clear on the wire"

    mesh.push(docs_for(b.ip, extra=[authz("only-a", [{"identities": [spiffe("a")]}])]))
    denied = app_line(c, "echo", b.ip, 9000, "ping-from-c")
    assert "echo:" not in denied.get("reply", ""), f"{denied}\n{mesh.dump()}"
    denied = app_line(c, "banner", b.ip, 9001, "hello-from-c")
    assert "BANNER" not in denied.get("banner", "") and "got:" not in denied.get("reply", ""), denied
    assert sb.metrics().sum("tern_authz_total", decision="deny") >= 2, mesh.dump()
    assert app_line(a, "echo", b.ip, 9000, "still-a").get("reply") == "echo:still-a\n", mesh.dump()


# --------------------------------------------------------------------------------------
# 7. strict vs permissive


def test_plaintext_is_served_when_permissive_and_closed_when_strict(mesh: Mesh, base_config):
    a, b, d = mesh.net.pods[0], mesh.net.pods[1], mesh.net.pods[3]
    sb = mesh.sidecars["b"]
    # permissive (no annotation): D, outside the mesh, is served in clear
    r = app_get(d, b.ip, 8080, "/plain")
    assert r.get("status") == 200 and MARKER in r["body"], f"{r}\n{mesh.dump()}"
    assert sb.metrics().sum("tern_inbound_clients_total", tls="plaintext") >= 1, mesh.dump()

    mesh.push(docs_for(b.ip, mode="strict"))
    before = sb.handshakes("plaintext_refused")
    r = app_get(d, b.ip, 8080, "/plain-strict")
    assert "error" in r or r.get("status") != 200, f"plaintext served under strict: {r}"
    assert MARKER not in r.get("body", "")
    assert sb.handshakes("plaintext_refused") == before + 1, mesh.dump()
    assert "plaintext refused" in plain_log(sb)
    # mTLS clients are still served
    assert app_get(a, b.ip, 8080, "/mtls-strict").get("status") == 200, mesh.dump()

    mesh.push(docs_for(b.ip, mode="permissive"))
    assert app_get(d, b.ip, 8080, "/plain-again").get("status") == 200, mesh.dump()


# --------------------------------------------------------------------------------------
# 9. a destination outside the mesh is passed through


def test_destination_outside_the_mesh_is_passed_through(mesh: Mesh):
    a = mesh.net.pods[0]
    seen = []

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            seen.append((self.client_address[0], self.path, dict(self.headers)))
            body = b"outside-the-mesh-ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    port = free_port()
    srv = ThreadingHTTPServer((mesh.net.host_ip, port), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        r = app_get(a, mesh.net.host_ip, port, "/outside")
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.get("status") == 200 and r["body"] == "outside-the-mesh-ok", f"{r}\n{mesh.dump()}"
    assert len(seen) == 1 and seen[0][0] == a.ip and seen[0][1] == "/outside", seen
    assert "tern-error" not in r["headers"]


# --------------------------------------------------------------------------------------
# 8. testssl.sh against B's inbound

TESTSSL_TIMEOUT = 75  # per run; a scan takes 10-30 s here


def test_testssl_inbound_offers_tls13_only(mesh: Mesh, tmp_path):
    testssl = shutil.which("testssl") or shutil.which("testssl.sh")
    if testssl is None:
        pytest.fail("testssl not installed: tests/run.sh installs it (apt-get install testssl.sh)")
    b = mesh.net.pods[1]
    # testssl 3.0 cannot present a client certificate, and its connectivity check (openssl
    # s_client) then races B's "certificate required" alert. An openssl wrapper gives
    # s_client a valid mesh certificate; testssl's own socket probes (protocols, ciphers)
    # still go without one: the server's hello is what they read.
    chain, key = make_certs(mesh, tmp_path)["valid"]
    wrapper = tmp_path / "openssl"
    wrapper.write_text(f"""#!/bin/sh
if [ "$1" = s_client ]; then shift; exec {shutil.which("openssl")} s_client -cert {chain} -cert_chain {chain} -key {key} "$@"; fi
exec {shutil.which('openssl')} "$@"
""")
    wrapper.chmod(0o755)
    out = tmp_path / "testssl.json"
    # protocols, cipher categories and forward secrecy; no vulnerability scans (slow, and a
    # TLS 1.3-only server has none of the old protocols they probe)
    cmd = [testssl, "--openssl", str(wrapper), "--protocols", "--std", "--fs", "--warnings", "batch", "--color", "0",
           "--quiet", "--connect-timeout", "5", "--openssl-timeout", "5", "--jsonfile", str(out), f"{b.ip}:4143"]
    t0 = time.monotonic()
    # More goes if its connectivity check alone failed: that check (s_client, then a
    # quick close) fails now and then on a loaded machine, in ~3 s, before any probe, and
    # in CI once for 17 s in a row (four goes): eight goes, 2 s apart, cover ~45 s.
    for attempt in range(8):
        out.unlink(missing_ok=True)
        r = subprocess.run(cmd, capture_output=True, timeout=TESTSSL_TIMEOUT)
        if b"cannot connect" not in r.stdout:
            break
        time.sleep(2)
    took = time.monotonic() - t0
    report = r.stdout.decode(errors="replace")[-4000:]
    if b"cannot connect" in r.stdout:
        # Why is not understood yet (it happened in 2 of ~10 CI runs): keep what B and a
        # plain s_client say at that moment.
        probe = subprocess.run([str(wrapper), "s_client", "-connect", f"{b.ip}:4143", "-brief"],
                               input=b"", capture_output=True, timeout=15)
        pytest.fail(f"testssl could not connect in {attempt + 1} goes over {took:.0f}s:\n{report}\n"
                    f"--- s_client (exit {probe.returncode}) ---\n{probe.stdout.decode(errors='replace')[-2000:]}"
                    f"{probe.stderr.decode(errors='replace')[-2000:]}\n{mesh.dump()}")
    assert out.exists(), f"testssl wrote no JSON (exit {r.returncode}):\n{report}\n{r.stderr.decode(errors='replace')}"
    findings = {f["id"]: f for f in json.loads(out.read_text()) if isinstance(f, dict) and "id" in f}
    sev = lambda i: findings.get(i, {}).get("finding", "")  # noqa: E731
    print(f"testssl took {took:.1f}s: " + json.dumps({k: v.get("finding") for k, v in findings.items()}, indent=1))
    assert "scanProblem" not in findings or findings["scanProblem"]["severity"] != "FATAL", findings.get("scanProblem")
    for proto in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2"):
        assert sev(proto).startswith("not offered"), f"{proto}: {findings.get(proto)}\n{report}"
    assert sev("TLS1_3").startswith("offered"), f"TLS1_3: {findings.get('TLS1_3')}\n{report}"
    for weak in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                 "cipherlist_3DES_IDEA", "cipherlist_OBSOLETED"):
        if weak in findings:
            assert findings[weak]["finding"].startswith("not offered"), f"{weak}: {findings[weak]}"
    assert "cipherlist_STRONG" in findings and findings["cipherlist_STRONG"]["finding"].startswith("offered"), \
        findings.get("cipherlist_STRONG")
    fs = findings.get("FS") or findings.get("PFS") or {}  # the id depends on the testssl version
    assert fs.get("finding", "").startswith("offered") and fs.get("severity") in ("OK", "INFO"), fs


# --------------------------------------------------------------------------------------
# 3 and 4. certificates renewed and anchors rotated under steady load (meshes of their own)


@pytest.fixture
def pair_factory(tmp_path_factory):
    made = []

    def make(lifetime: str) -> Mesh:
        net = make_net(tmp_path_factory, 2)
        made.append(net)
        a, b = net.pods
        m = Mesh(net, accounts=("a", "b"), lifetime=lifetime)
        made.append(m)
        m.start_control(docs_for(b.ip))
        start_app(b, "B")
        m.add(a, "a")
        m.add(b, "b")
        m.wait_all_ready()
        return m

    yield make
    for x in made:
        x.close()
    if _app_file:
        _app_file.unlink(missing_ok=True)


class Load:
    """A's application calling B's pod IP for `seconds` (new connection per request), in
    the background; `result()` is {"ok", "failed", "errors"}."""

    def __init__(self, mesh: Mesh, seconds: float):
        a, b = mesh.net.pods[:2]
        self.seconds = seconds
        self.proc = a.popen([PY, app_file(), "load", b.ip, 8080, seconds], name=f"load-{time.monotonic_ns()}")

    def result(self) -> dict:
        self.proc.wait(timeout=self.seconds + 60)
        out = self.proc.output()
        try:
            return json.loads(out)
        except ValueError:
            pytest.fail(f"load client printed {out!r}\n{self.proc.logs()}")


RENEW_LIFETIME = 10  # seconds; --cert-lifetime


def test_certificates_renewed_under_steady_load(pair_factory):
    mesh = pair_factory(f"{RENEW_LIFETIME}s")
    sa, sb = mesh.sidecars["a"], mesh.sidecars["b"]
    first = {s.sa: s.identity() for s in (sa, sb)}
    r0 = {s.sa: s.metrics().sum("tern_identity_renewals_total", result="ok") for s in (sa, sb)}
    seconds = 2 * RENEW_LIFETIME + 2
    load = Load(mesh, seconds)
    not_afters = {s.sa: {first[s.sa]["not_after_unix"]} for s in (sa, sb)}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in (sa, sb):
            not_afters[s.sa].add(s.identity()["not_after_unix"])
        time.sleep(0.5)
    res = load.result()
    assert res["ok"] > 50 and res["failed"] == 0, f"{res}\n{mesh.dump()}"
    for s in (sa, sb):
        renewed = s.metrics().sum("tern_identity_renewals_total", result="ok") - r0[s.sa]
        assert renewed >= 2, f"{s.sa}: {renewed} renewals in {seconds}s\n{mesh.dump()}"
        assert len(not_afters[s.sa]) >= 3, f"{s.sa}: not_after seen {sorted(not_afters[s.sa])}"
        assert s.metrics().sum("tern_identity_renewals_total", result="failed") == 0, mesh.dump()
        ident = s.identity()
        assert ident["spiffe_id"] == spiffe(s.sa), ident
        assert ident["not_after_unix"] > time.time(), ident
        print(f"{s.sa}: {renewed} renewals in {seconds}s, not_after values {sorted(not_afters[s.sa])}")


def test_short_lived_certificates_renewed_at_seventy_percent(pair_factory):
    mesh = pair_factory(f"{RENEW_LIFETIME}s")
    sa = mesh.sidecars["a"]
    r0 = sa.metrics().sum("tern_identity_renewals_total", result="ok")
    time.sleep(RENEW_LIFETIME)
    renewed = sa.metrics().sum("tern_identity_renewals_total", result="ok") - r0
    # one renewal per 6.5-7.5 s (70 % +- 5 % of 10 s); 3 leaves room for a slow start
    assert 1 <= renewed <= 3, f"{renewed} renewals in {RENEW_LIFETIME}s with a {RENEW_LIFETIME}s lifetime"


def replace_file(path: Path, data: bytes):
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    os.rename(tmp, path)


def test_trust_anchor_rotation_under_steady_load(pair_factory, tmp_path):
    """The rotation: anchors old -> old+new (`ternctl ca bundle`), then the new issuer, then
    anchors new only; each step waits until both sidecars have it."""
    mesh = pair_factory("24h")
    a, b = mesh.net.pods
    sides = [mesh.sidecars["a"], mesh.sidecars["b"]]
    old_issuer = sides[0].identity()["issuer_id"]
    old_dir, new_dir = tmp_path / "old-ca", tmp_path / "new-ca"
    shutil.copytree(mesh.ca_dir, old_dir)
    mesh.ternctl("ca", "init", "--dir", new_dir, "--trust-domain", TD)

    def all_have(pred, what):
        wait_until(lambda: all(pred(s.identity()) for s in sides), 20,
                   f"both sidecars: {what}\n{[s.identity() for s in sides]}\n{mesh.dump()}", interval=0.2)

    seconds = 20
    load = Load(mesh, seconds)
    t0 = time.monotonic()
    time.sleep(2)
    # 1. both anchors; the old issuer keeps signing
    mesh.ternctl("ca", "bundle", mesh.ca_dir / "anchors.pem", mesh.ca_dir / "anchors.pem", new_dir / "anchors.pem")
    all_have(lambda i: i["trust_anchors"] == 2 and i["issuer_id"] == old_issuer, "two anchors")
    time.sleep(1)
    # 2. the new issuer (key first; the CA keeps the last good pair in between)
    replace_file(mesh.ca_dir / "issuer.key", (new_dir / "issuer.key").read_bytes())
    replace_file(mesh.ca_dir / "issuer.crt", (new_dir / "issuer.crt").read_bytes())
    all_have(lambda i: i["issuer_id"] != old_issuer and i["certificate_issuer_id"] == i["issuer_id"],
             "a certificate from the new issuer")
    new_issuer = sides[0].identity()["issuer_id"]
    time.sleep(1)
    # 3. the new anchor only
    replace_file(mesh.ca_dir / "anchors.pem", (new_dir / "anchors.pem").read_bytes())
    all_have(lambda i: i["trust_anchors"] == 1, "the new anchor only")
    steps = time.monotonic() - t0
    res = load.result()
    assert steps < seconds - 1, f"the rotation took {steps:.1f}s, longer than the load ({seconds}s)"
    assert res["ok"] > 50 and res["failed"] == 0, f"{res}\n{mesh.dump()}"

    for s in sides:
        i = s.identity()
        assert i["issuer_id"] == new_issuer and i["certificate_issuer_id"] == new_issuer, i
        assert i["trust_anchors"] == 1 and i["spiffe_id"] == spiffe(s.sa), i
    # the old anchor is gone: a certificate from the old issuer is refused, the new chain works
    certs = make_certs(mesh, tmp_path, issuer_dir=old_dir)
    before = sides[1].handshakes("unknown_ca", direction="inbound")
    outcome = tls_attempt((b.ip, 8080), *certs["valid"])
    assert outcome.startswith("refused") or outcome == "read b''", outcome
    wait_until(lambda: sides[1].handshakes("unknown_ca", direction="inbound") == before + 1, 5,
               f"B to refuse the old issuer's certificate (unknown_ca)\n{mesh.dump()}")
    r = app_get(a, b.ip, 8080, "/after-rotation")
    assert r.get("status") == 200, f"{r}\n{mesh.dump()}"
