"""tern-init on its own: the iptables rules redirect a pod's TCP traffic to the sidecar's
ports (seen by a fake sidecar that reports SO_ORIGINAL_DST), never the proxy UID's own
connections, loopback, or what is skipped; --clean undoes it; both iptables backends.

Two pods A and B on a bridge (netns.py). Servers and the fake sidecar are one small
Python program: it answers any HTTP request with JSON {name, local, peer, orig, uid}, and
`GET /dial/HOST/PORT` makes it connect to HOST:PORT itself and include that answer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from netns import PROXY_UID, Netns, Pod, netns_fixture, require_tools

net = netns_fixture(n_pods=2)

# A Python for processes that drop to another uid (pyenv builds may live under /root).
PY_ANY_UID = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

# One program, two uses: `serve NAME PORTS` (the servers and the fake sidecar) and
# `get HOST PORT PATH` (the client: prints the answer's JSON, or {"error"}).
PROG = r"""
import json, os, socket, struct, sys, threading

def orig_dst(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST -> sockaddr_in
    except OSError:
        return None
    return "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack(">H", raw[2:4])[0])

def dial(host, port, path="/"):
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])

def handle(conn):
    with conn:
        conn.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        path = head.split(b" ")[1].decode()
        local, peer = conn.getsockname(), conn.getpeername()
        body = {"name": name, "local": "%s:%d" % local, "peer": "%s:%d" % peer,
                "orig": orig_dst(conn), "uid": os.getuid()}
        if path.startswith("/dial/"):
            _, _, host, port = path.split("/")
            try:
                body["dial"] = dial(host, port)
            except (OSError, ValueError) as e:
                body["dial"] = {"error": repr(e)}
        data = json.dumps(body).encode()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)

def accept_loop(srv):
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()

if sys.argv[1] == "get":
    try:
        print(json.dumps(dial(*sys.argv[2:5])))
    except (OSError, ValueError) as e:
        print(json.dumps({"error": repr(e)}))
    sys.exit(0)
name, ports = sys.argv[2], [int(p) for p in sys.argv[3].split(",")]
servers = [socket.create_server(("0.0.0.0", p), backlog=128) for p in ports]
for s in servers[1:]:
    threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
print("ready", flush=True)
accept_loop(servers[0])
"""


def serve(pod: Pod, name: str, *ports: int, uid: int | None = None):
    """Starts the JSON server in `pod` on `ports` (all interfaces) and waits for it."""
    proc = pod.popen([PY_ANY_UID, "-c", PROG, "serve", name, ",".join(map(str, ports))], uid=uid, name=f"{pod.ns}-{name}")
    for port in ports:
        pod.wait_listening(port)
    proc.ensure_alive()
    return proc


def get(pod: Pod, host: str, port: int, path: str = "/", uid: int | None = None) -> dict:
    """An HTTP GET from `pod` (as `uid`, root by default): the server's JSON, or {"error"}."""
    out = pod.run([PY_ANY_UID, "-c", PROG, "get", host, port, path], uid=uid, timeout=15).stdout.decode()
    return json.loads(out)


def nat_rules(pod: Pod, mode: str = "nft") -> list[str]:
    out = pod.run([f"iptables-{mode}-save", "-t", "nat"]).stdout.decode()
    return [line for line in out.splitlines() if line.startswith(("-A", ":TERN"))]


@pytest.fixture(autouse=True)
def _tools():
    require_tools("iptables-nft-restore", "iptables-nft-save", "setpriv", "ss")


def test_outbound_goes_to_the_sidecar_except_its_own_and_loopback(net: Netns):
    a, b = net.pods
    serve(b, "B", 8080)
    a.tern_init()
    serve(a, "sidecar", 4140, uid=PROXY_UID)
    serve(a, "A-local", 7070)

    # root's connection to B:8080 lands on the sidecar, which sees where it was going
    for uid in (None, 1000):
        r = get(a, b.ip, 8080, uid=uid)
        assert r.get("name") == "sidecar", r
        assert r["orig"] == f"{b.ip}:8080", r
        assert r["uid"] == PROXY_UID

    # the sidecar's own connection (uid 2102) to the same destination is not redirected
    with a.capture("tcp port 8080") as cap:
        r = get(a, b.ip, 8080, path=f"/dial/{b.ip}/8080")
    assert r["name"] == "sidecar" and r["dial"].get("name") == "B", r
    assert r["dial"]["peer"].startswith(f"{a.ip}:"), r
    # and it went over A's eth0 as plaintext HTTP (the capture helper sees it)
    assert cap.plaintext(b"GET / HTTP/1.0", port=8080), cap.segments()
    assert not cap.tls_records()

    # loopback and the pod's own address (both leave through lo) are not redirected
    assert get(a, "127.0.0.1", 7070)["name"] == "A-local"
    assert get(a, a.ip, 7070)["name"] == "A-local"


def test_skipped_ports_and_subnets_and_rerun(net: Netns):
    a, b = net.pods
    serve(b, "B", 8080, 9090)
    serve(a, "sidecar", 4140, uid=PROXY_UID)

    a.tern_init("--skip-outbound-ports", "9090,9500-9600")
    first = nat_rules(a)
    a.tern_init("--skip-outbound-ports", "9090,9500-9600")
    assert nat_rules(a) == first, "a second run changed the rules"
    assert sum(":TERN" not in r and "-j TERN_" in r for r in first) == 2, first
    assert get(a, b.ip, 9090)["name"] == "B"
    assert get(a, b.ip, 8080)["name"] == "sidecar"

    # a new run replaces the chains: 9090 is redirected again, B's subnet is not
    a.tern_init("--skip-subnets", f"10.255.0.0/16,{b.ip}/32")
    assert get(a, b.ip, 9090)["name"] == "B"
    assert get(a, b.ip, 8080)["name"] == "B"
    a.tern_init("--skip-subnets", "10.255.0.0/16")
    assert get(a, b.ip, 9090)["name"] == "sidecar"


def test_inbound_goes_to_the_inbound_port_except_skipped(net: Netns):
    a, b = net.pods
    serve(b, "B", 8080, 4191, 9191)
    serve(b, "inbound", 4143, uid=PROXY_UID)
    b.tern_init("--skip-inbound-ports", "9191")  # the admin port stays skipped

    r = get(a, b.ip, 8080)
    assert r["name"] == "inbound" and r["orig"] == f"{b.ip}:8080", r
    assert r["peer"].startswith(f"{a.ip}:"), r
    assert get(a, b.ip, 4191)["name"] == "B"  # the admin port
    assert get(a, b.ip, 9191)["name"] == "B"
    # B's own outbound is redirected too, to a sidecar port nobody listens on here
    assert "error" in get(b, a.ip, 8080)


def test_default_skips_the_admin_port(net: Netns):
    a, b = net.pods
    serve(b, "B", 4191, 8080)
    serve(b, "inbound", 4143)
    b.tern_init()
    assert get(a, b.ip, 4191)["name"] == "B"
    assert get(a, b.ip, 8080)["name"] == "inbound"


def test_clean_restores_direct_connectivity(net: Netns):
    a, b = net.pods
    serve(b, "B", 8080)
    serve(b, "inbound", 4143)
    serve(a, "sidecar", 4140, uid=PROXY_UID)
    a.tern_init()
    b.tern_init()
    assert get(a, b.ip, 8080)["name"] == "sidecar"
    a.tern_init("--clean")
    assert get(a, b.ip, 8080)["name"] == "inbound"
    b.tern_init("--clean")
    assert get(a, b.ip, 8080)["name"] == "B"
    assert not [r for r in nat_rules(a) + nat_rules(b) if "TERN" in r]
    again = a.tern_init("--clean")  # nothing left: fine
    assert b"no tern rules" in again.stderr


def test_legacy_mode(net: Netns):
    if shutil.which("iptables-legacy-restore") is None:
        pytest.skip("iptables-legacy-restore not installed (Debian's iptables package has it)")
    a, b = net.pods
    serve(b, "B", 8080)
    serve(a, "sidecar", 4140, uid=PROXY_UID)
    a.tern_init("--mode", "legacy")
    assert not [r for r in nat_rules(a, "nft") if "TERN" in r]
    assert any("TERN_OUTPUT" in r for r in nat_rules(a, "legacy"))
    r = get(a, b.ip, 8080, path=f"/dial/{b.ip}/8080")
    assert r["name"] == "sidecar" and r["orig"] == f"{b.ip}:8080" and r["dial"]["name"] == "B", r
    a.tern_init("--mode", "legacy", "--clean")
    assert not [r for r in nat_rules(a, "legacy") if "TERN" in r]
    assert get(a, b.ip, 8080)["name"] == "B"


def test_dry_run_and_errors(net: Netns, tmp_path):
    a, _ = net.pods
    out = a.tern_init("--dry-run", "--skip-subnets", "10.96.0.0/12", "--proxy-uid", "1337").stdout.decode()
    assert out.startswith("# tern-init apply")
    assert "-A TERN_OUTPUT -m owner --uid-owner 1337 -j RETURN" in out
    assert "-A TERN_OUTPUT -d 10.96.0.0/12 -j RETURN" in out
    assert "COMMIT" in out
    assert not [r for r in nat_rules(a) if "TERN" in r], "a dry run changed the table"

    bad = a.tern_init("--skip-subnets", "fd00::/8", check=False)
    assert bad.returncode != 0 and b"bad subnet" in bad.stderr

    # no iptables in PATH: says which binary and what to install
    from conftest import binary

    r = a.run(["env", "PATH=/nonexistent", binary("tern-init")], check=False)
    assert r.returncode != 0
    assert b"iptables-nft-save not found in PATH" in r.stderr, r.stderr

    # a failing restore: its stderr is shown, with the script
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "iptables-nft-restore").write_text("#!/bin/sh\necho 'iptables-restore: line 5 failed' >&2\nexit 1\n")
    (fake / "iptables-nft-restore").chmod(0o755)
    r = a.run(["env", f"PATH={fake}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
               binary("tern-init")], check=False)
    assert r.returncode != 0
    assert b"line 5 failed" in r.stderr and b"*nat" in r.stderr, r.stderr
