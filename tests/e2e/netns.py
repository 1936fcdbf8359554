"""Several hosts on one machine: network namespaces ("pods") on a bridge.

    from netns import netns_fixture  # in a test module: `mesh_net = netns_fixture(n_pods=2)`

    def test_x(mesh_net):
        a, b = mesh_net.pods
        srv = b.popen([sys.executable, "-c", CODE], name="server")
        a.run(["curl", f"http://{b.ip}:8080/"])
        a.popen([str(binary("tern-proxy")), ...], uid=PROXY_UID)   # the sidecar as 2102
        mesh_net.popen([binary("tern-control"), ...])  # root namespace, on mesh_net.host_ip

Layout: a bridge in the root namespace with `host_ip` (10.X.Y.1/24), and per pod a
namespace with `lo` up, `eth0` (a veth whose other end is on the bridge) at 10.X.Y.2.., and
a default route via the bridge. Names carry a per-run id (`tern` + pid + a counter), so
parallel runs do not collide; what a run whose process is gone left behind is swept before
a new one starts, and `close()` (a fixture finalizer) always removes what it made. Needs
root and `ip netns`; otherwise the fixture skips with the reason. Every wait is bounded.
Processes run as another uid (`uid=`) must be able to read their binary and script: pass
code with `-c`, not a file in pytest's root-only tmp_path.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Proc, binary

PROXY_UID = 2102  # tern-init's default --proxy-uid
PREFIX = "tern"  # + run id (7 chars) + br / p<i> / v<i>: every name this module makes
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_counter = itertools.count()


def _b36(n: int, width: int) -> str:
    s = ""
    for _ in range(width):
        n, r = divmod(n, 36)
        s = _B36[r] + s
    return s


def sh(argv: list[str], timeout: float = 20, check: bool = True, input: bytes | None = None):
    """Runs a command in the root namespace; output captured, bounded in time."""
    r = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} failed ({r.returncode}): {r.stderr.decode(errors='replace').strip()}"
        )
    return r


def require_tools(*tools: str):
    """Fails (not skips) when a tool is missing: tests/run.sh installs them."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: tests/run.sh installs them (apt-get)")


def skip_unless_netns():
    """Skips when namespaces cannot be made here (not root, or no `ip netns`)."""
    if os.geteuid() != 0:
        pytest.skip("network-namespace tests need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    probe = f"{PREFIX}-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10)
    if r.returncode != 0:
        pytest.skip(f"`ip netns add` does not work here: {r.stderr.decode(errors='replace').strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale():
    """Deletes namespaces and bridges of ours whose creating process is gone."""
    name_re = re.compile(rf"^{PREFIX}([0-9a-z]{{5}})[0-9a-z]{{2}}(br|p[0-9]+|v[0-9]+)$")
    stale = lambda name: (m := name_re.match(name)) and not _pid_alive(int(m.group(1), 36))  # noqa: E731
    r = sh(["ip", "netns", "list"], check=False)
    for line in r.stdout.decode().splitlines():
        name = line.split()[0] if line.split() else ""
        if stale(name):
            _kill_netns_pids(name)
            sh(["ip", "netns", "del", name], check=False)
    r = sh(["ip", "-o", "link", "show"], check=False)
    for line in r.stdout.decode().splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            link = parts[1].strip().split("@")[0]
            if stale(link):
                sh(["ip", "link", "del", link], check=False)


def _kill_netns_pids(ns: str):
    r = sh(["ip", "netns", "pids", ns], check=False)
    for pid in r.stdout.decode().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _pick_subnet(run_id: int) -> str:
    """A 10.X.Y.0/24 no address or route of the root namespace is in."""
    used = sh(["ip", "-4", "-o", "addr"], check=False).stdout.decode() + sh(
        ["ip", "-4", "route"], check=False
    ).stdout.decode()
    for i in range(200):
        x = 200 + (run_id + i) % 50
        y = (run_id // 50 + i * 7) % 256
        prefix = f"10.{x}.{y}."
        if prefix not in used and f"10.{x}.0.0/16" not in used:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet")


class Pod:
    """One network namespace with an address on the bridge."""

    def __init__(self, net: "Netns", index: int, ns: str, ip: str, host_veth: str):
        self.net = net
        self.index = index
        self.ns = ns  # namespace name, for `ip netns exec`
        self.ip = ip
        self.host_veth = host_veth  # the bridge side of the pod's eth0
        self.iface = "eth0"
        self.procs: list[Proc] = []

    def __repr__(self):
        return f"Pod({self.ns}, {self.ip})"

    def argv(self, argv: list, uid: int | None = None) -> list[str]:
        """`argv` run in this pod (and as `uid`, no groups, when given)."""
        out = ["ip", "netns", "exec", self.ns]
        if uid is not None:
            out += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return out + [str(a) for a in argv]

    def run(self, argv: list, uid: int | None = None, timeout: float = 20, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Runs to completion in the pod; stdout/stderr captured (bytes)."""
        return sh(self.argv(argv, uid), timeout=timeout, check=check, input=input)

    def popen(self, argv: list, uid: int | None = None, name: str | None = None,
              env: dict | None = None) -> Proc:
        """Starts a long-running process in the pod (a conftest `Proc`: logs in the
        failure report, stopped at teardown). `ip netns exec` and `setpriv` exec the
        command, so the Proc's pid is the command's own."""
        name = name or f"{self.ns}-{Path(str(argv[0])).name}-{len(self.procs)}"
        p = Proc(name, self.argv(argv, uid), self.net.log_dir, env=env)
        self.procs.append(p)
        return p

    def capture(self, bpf: str = "tcp", name: str | None = None) -> "Capture":
        """Starts tcpdump on this pod's eth0 (see `Capture`)."""
        return Capture(self, bpf, name)

    def wait_listening(self, port: int, timeout: float = 10):
        """Waits until something in this pod listens on TCP `port`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
                return
            time.sleep(0.05)
        pytest.fail(f"nothing listens on {self.ns}:{port} after {timeout}s")

    def tern_init(self, *args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
        """Runs tern-init (target/debug, like the other binaries) in this pod."""
        return self.run([binary("tern-init"), *args], check=check, timeout=timeout)


class Netns:
    """A bridge and `n_pods` pods; `close()` removes everything (always call it)."""

    def __init__(self, n_pods: int = 2, log_dir: Path | None = None):
        if not 1 <= n_pods <= 99:  # veth names stay within 15 characters
            raise ValueError("1..99 pods")
        k = next(_counter)
        self.run_id = f"{_b36(os.getpid(), 5)}{_b36(k, 2)}"  # 7 chars: link names <= 15
        self.log_dir = Path(log_dir) if log_dir else Path(f"/tmp/{PREFIX}{self.run_id}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.bridge = f"{PREFIX}{self.run_id}br"
        self.prefix = _pick_subnet(os.getpid() * 3 + k)
        self.host_ip = self.prefix + "1"
        self.subnet = self.prefix + "0/24"
        self.pods: list[Pod] = []
        self.host_procs: list[Proc] = []
        self._made_bridge = False
        try:
            sh(["ip", "link", "add", self.bridge, "type", "bridge"])
            self._made_bridge = True
            sh(["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge])
            sh(["ip", "link", "set", self.bridge, "up"])
            for i in range(n_pods):
                self._add_pod(i)
        except BaseException:
            self.close()
            raise

    def _add_pod(self, i: int):
        ns = f"{PREFIX}{self.run_id}p{i}"
        host_veth = f"{PREFIX}{self.run_id}v{i}"
        ip = f"{self.prefix}{i + 2}"
        sh(["ip", "netns", "add", ns])
        pod = Pod(self, i, ns, ip, host_veth)
        self.pods.append(pod)
        sh(["ip", "link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        sh(["ip", "link", "set", host_veth, "master", self.bridge, "up"])
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "route", "add", "default", "via", self.host_ip]):
            sh(pod.argv(cmd))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stops the pods' processes, deletes the namespaces (their veths go with them) and
        the bridge. Never raises."""
        for pod in self.pods:
            for p in pod.procs:
                try:
                    p.stop(timeout=5)
                except Exception:  # noqa: BLE001 - teardown goes on
                    pass
            _kill_netns_pids(pod.ns)
            sh(["ip", "netns", "del", pod.ns], check=False)
        if self._made_bridge:
            sh(["ip", "link", "del", self.bridge], check=False)
        self.pods = []
        self._made_bridge = False

    def popen(self, argv: list, name: str | None = None, env: dict | None = None) -> Proc:
        """Starts a process in the root namespace (e.g. tern-control on `host_ip`), stopped
        by `close()` with the pods' processes."""
        p = Proc(name or f"{self.bridge}-{Path(str(argv[0])).name}-{len(self.host_procs)}", argv, self.log_dir, env=env)
        self.host_procs.append(p)
        return p


def netns_fixture(n_pods: int = 2, scope: str = "function"):
    """A pytest fixture making a `Netns` (skips when namespaces are impossible here)."""

    @pytest.fixture(scope=scope)
    def _fixture(tmp_path_factory):
        skip_unless_netns()
        sweep_stale()
        net = Netns(n_pods=n_pods, log_dir=tmp_path_factory.mktemp("netns"))
        try:
            yield net
        finally:
            net.close()

    return _fixture


# --------------------------------------------------------------------------------------
# packet capture


@dataclass
class Segment:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


class Capture:
    """tcpdump on a pod's eth0 into a pcap; `stop()` then read TCP payloads.

        with a.capture(f"tcp port {port}") as cap:
            ... traffic ...
        assert cap.plaintext(b"GET /") ; assert not cap.tls_records()
    """

    def __init__(self, pod: Pod, bpf: str = "tcp", name: str | None = None):
        require_tools("tcpdump")
        self.pod = pod
        self.name = name or f"{pod.ns}-tcpdump-{len(pod.procs)}"
        self.path = pod.net.log_dir / f"{self.name}.pcap"
        # --immediate-mode -U: deliver and write each packet as it arrives (else a stop within
        # a second loses them); -s 0: whole packets; -n: no DNS; -Z root: do
        # not drop to the tcpdump user (the pcap goes into a root-only temp dir).
        self.proc = pod.popen(["tcpdump", "-i", pod.iface, "-n", "--immediate-mode", "-U", "-s", "0", "-Z", "root", "-w", str(self.path), bpf],
                              name=self.name)
        deadline = time.monotonic() + 10
        while "listening on" not in self.proc.stderr_path.read_text(errors="replace"):
            if not self.proc.alive() or time.monotonic() > deadline:
                pytest.fail(f"tcpdump did not start:\n{self.proc.logs()}")
            time.sleep(0.05)
        self._segments: list[Segment] | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> "Capture":
        """Stops tcpdump (SIGINT: it flushes the file); idempotent."""
        if self.proc.alive():
            time.sleep(0.2)  # the last packets of the exchange
            self.proc.signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.stop()
        return self

    def segments(self) -> list[Segment]:
        """TCP segments with a payload, in capture order."""
        self.stop()
        if self._segments is None:
            self._segments = list(read_pcap_tcp(self.path))
        return self._segments

    def payload(self, port: int | None = None) -> bytes:
        """All captured TCP payload bytes (to or from `port`, if given), concatenated."""
        return b"".join(s.payload for s in self.segments() if port is None or port in (s.sport, s.dport))

    def plaintext(self, needle: bytes, port: int | None = None) -> bool:
        return needle in self.payload(port)

    def tls_records(self, port: int | None = None) -> list[Segment]:
        """Segments that start with a TLS record header (handshake/data, version 3.x)."""
        return [s for s in self.segments() if (port is None or port in (s.sport, s.dport)) and looks_like_tls(s.payload)]


def looks_like_tls(payload: bytes) -> bool:
    """A TLS record header: content type 20-23, version 0x0301-0x0304."""
    return len(payload) >= 5 and payload[0] in (20, 21, 22, 23) and payload[1] == 3 and payload[2] <= 4


def read_pcap_tcp(path: Path):
    """Yields the TCP segments with a payload of a classic pcap file (Ethernet, Linux
    cooked v1/v2 or raw IPv4 link types)."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (pcapng is not read)")
    linktype = struct.unpack(end + "I", data[20:24])[0] & 0xFFFF
    link_len = {1: 14, 113: 16, 276: 20, 101: 0, 228: 0}.get(linktype)
    if link_len is None:
        raise ValueError(f"{path}: link type {linktype} not read")
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack(end + "I", data[off + 8:off + 12])[0]
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if linktype == 1:
            ethertype = struct.unpack(">H", pkt[12:14])[0]
            if ethertype == 0x8100:  # VLAN tag
                ethertype, link = struct.unpack(">H", pkt[16:18])[0], 18
            else:
                link = 14
            if ethertype != 0x0800:
                continue
        else:
            link = link_len
        ip = pkt[link:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:total]
        if len(tcp) < 20:
            continue
        doff = (tcp[12] >> 4) * 4
        payload = tcp[doff:]
        if payload:
            sport, dport = struct.unpack(">HH", tcp[:4])
            yield Segment(".".join(map(str, ip[12:16])), sport, ".".join(map(str, ip[16:20])), dport, payload)
