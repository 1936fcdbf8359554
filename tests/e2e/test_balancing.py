"""Load balancing in the sidecar: P2C over peak EWMA (the default), RoundRobin,
LeastRequest, consistent hashing (RingHash and Maglev), locality tiers (zone -> region ->
everywhere) with failover and recovery, and the back-off from endpoints that answer 503
with Retry-After.

Real processes on 127.0.0.1: tern-proxy's outbound listener talks straight to
tern-demo-app instances (each with its own --name, so `x-demo-service` says which
endpoint answered) or to a tiny Python upstream. Endpoints of one Service listen on
different ports, so every endpoint gets its own EndpointSlice (which also carries its
zone and region). Assertions count where requests went; every load loop is bounded and
the few timing bounds are generous.
"""

from __future__ import annotations

import collections
import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import (
    NS,
    backend_name,
    backend_policy,
    circuit_backend,
    circuit_endpoint,
    control,
    error_code,
    free_addr,
    http_route,
    request,
    retry_route,
    split_addr,
    wait_until,
)

# --------------------------------------------------------------------------------------
# config helpers


def ep(addr: str, zone: str | None = None, region: str | None = None, ready: bool = True,
       slice_name: str | None = None) -> dict:
    """An endpoint of `zoned_service`. Slices are read in name order, which is the order
    of the backend's endpoints: `slice_name` fixes it (default: `<service>-<port>`)."""
    return {"addr": addr, "zone": zone, "region": region, "ready": ready, "slice": slice_name}


def zoned_service(name: str, endpoints: list, port: int = 80, ns: str = NS) -> list[dict]:
    """A Service with one port (`http`) and one EndpointSlice per endpoint (so endpoints on
    127.0.0.1 may listen on different ports, and each slice carries its own region label).
    `endpoints`: "host:port" strings or `ep(...)` dicts."""
    docs = [{
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
    }]
    for e in endpoints:
        e = ep(e) if isinstance(e, str) else e
        host, ep_port = split_addr(e["addr"])
        endpoint = {"addresses": [host], "conditions": {"ready": e["ready"]}}
        if e["zone"]:
            endpoint["zone"] = e["zone"]
        labels = {"kubernetes.io/service-name": name}
        if e["region"]:
            labels["topology.kubernetes.io/region"] = e["region"]
        docs.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            # Named after the port unless told: removing an endpoint removes exactly its slice.
            "metadata": {"name": e["slice"] or f"{name}-{ep_port}", "namespace": ns, "labels": labels},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": ep_port, "protocol": "TCP"}],
            "endpoints": [endpoint],
        })
    return docs


# --------------------------------------------------------------------------------------
# observation helpers


def served_by(resp) -> str | None:
    return resp.header("x-demo-service")


def tier_counts(proxy, svc: str) -> dict[str, float]:
    m = proxy.metrics()
    return {tier: m.sum("tern_balancer_requests_total", backend_name=backend_name(svc), tier=tier)
            for tier in ("zone", "region", "remote")}


def reload_to(stack, proxy, filename: str, docs, what: str):
    """Writes a config file and waits until the proxy runs the new version."""
    before = proxy.config_version()
    stack.write(filename, docs)
    wait_until(lambda: proxy.config_version() != before, 20, what)


def sequential(proxy, host: str, n: int, path: str = "/", headers: dict | None = None) -> list:
    """`n` GETs one after the other on one keep-alive connection: [(status, served_by)]."""
    conn = http.client.HTTPConnection(*split_addr(proxy.outbound), timeout=15)
    out = []
    try:
        for i in range(n):
            r = request(proxy.outbound, "GET", f"{path}?i={i}", host=host, headers=headers, conn=conn)
            out.append((r.status, served_by(r)))
    finally:
        conn.close()
    return out


def concurrent(proxy, host: str, clients: int, per_client: int) -> list:
    """`clients` threads, each with its own connection, each sending `per_client` GETs
    (to /c<client>)."""
    results: list = []
    lock = threading.Lock()
    errors: list = []

    def client(k: int):
        try:
            got = sequential(proxy, host, per_client, path=f"/c{k}")
            with lock:
                results.extend(got)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "client threads hung"
    assert not errors, errors
    return results


# --------------------------------------------------------------------------------------
# 1. P2C over peak EWMA steers away from a slow endpoint


def test_p2c_ewma_prefers_fast_endpoints(stack):
    """Three endpoints, one ten times slower (20 ms vs 2 ms). With the default algorithm,
    after a warm-up, at least 80 % of 300 requests from 4 concurrent clients go to the
    fast ones."""
    fast1 = stack.demo("fast1", latency_ms=2)
    fast2 = stack.demo("fast2", latency_ms=2)
    slow = stack.demo("slow", latency_ms=20)
    stack.write("svc.yaml", zoned_service("p2c", [fast1.addr, fast2.addr, slow.addr]))
    p = stack.proxy()

    warm = sequential(p, "p2c", 30)
    assert all(s == 200 for s, _ in warm), warm
    assert {who for _, who in warm} == {"fast1", "fast2", "slow"}, \
        f"every endpoint should be measured during the warm-up: {collections.Counter(warm)}"

    results = concurrent(p, "p2c", clients=4, per_client=75)
    assert len(results) == 300 and all(s == 200 for s, _ in results), collections.Counter(results)
    by = collections.Counter(who for _, who in results)
    fast_share = (by["fast1"] + by["fast2"]) / len(results)
    assert fast_share >= 0.80, f"only {fast_share:.0%} to the fast endpoints: {dict(by)}"

    b = circuit_backend(p, "p2c")
    assert b["algorithm"] == "P2CPeakEWMA", b
    ewma = {e["address"]: e["ewma_ms"] for e in b["endpoints"]}
    assert ewma[slow.addr] > ewma[fast1.addr] and ewma[slow.addr] > ewma[fast2.addr], ewma
    assert all(e["pending"] == 0 for e in b["endpoints"]), b


# --------------------------------------------------------------------------------------
# 2. RoundRobin and LeastRequest


def test_round_robin_spreads_evenly(stack):
    apps = [stack.demo(f"rr{i}") for i in range(3)]
    stack.write("svc.yaml", zoned_service("rr", [a.addr for a in apps])
                + [backend_policy("rr", "rr", loadBalancer={"algorithm": "RoundRobin"})])
    p = stack.proxy()

    results = sequential(p, "rr", 300)
    assert all(s == 200 for s, _ in results), collections.Counter(results)
    by = collections.Counter(who for _, who in results)
    assert set(by) == {"rr0", "rr1", "rr2"}, by
    assert all(95 <= n <= 105 for n in by.values()), f"uneven round robin: {dict(by)}"
    # Strict rotation: each window of three consecutive requests hits three endpoints.
    order = [who for _, who in results]
    rotations = sum(len(set(order[i:i + 3])) == 3 for i in range(0, 297))
    assert rotations >= 290, f"not a rotation: {order[:30]}"
    assert circuit_backend(p, "rr")["algorithm"] == "RoundRobin"


def test_least_request_avoids_a_busy_endpoint(stack):
    """Six long requests (/sleep/5000) keep endpoint `busy` occupied (it is the only one
    at first). Then `idle1` and `idle2` join the Service (a reload, which keeps the
    in-flight counts). Short requests now never go to `busy`: with LeastRequest any pair
    P2C draws contains an idle endpoint."""
    busy = stack.demo("busy")
    idle1 = stack.demo("idle1")
    idle2 = stack.demo("idle2")
    policy = backend_policy("lr", "lr", loadBalancer={"algorithm": "LeastRequest"})
    stack.write("svc.yaml", zoned_service("lr", [busy.addr]) + [policy])
    p = stack.proxy()

    long_results = []
    lock = threading.Lock()

    def long_request(k: int):
        r = request(p.outbound, "GET", f"/sleep/5000?k={k}", host="lr", timeout=30)
        with lock:
            long_results.append((r.status, served_by(r)))

    threads = [threading.Thread(target=long_request, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: circuit_endpoint(p, "lr", busy.addr)["pending"] == 6, 10,
                   "six long requests in flight at the busy endpoint")
        reload_to(stack, p, "svc.yaml", zoned_service("lr", [busy.addr, idle1.addr, idle2.addr]) + [policy],
                  "the two idle endpoints to join")
        assert circuit_endpoint(p, "lr", busy.addr)["pending"] == 6, \
            f"the reload lost the in-flight count: {circuit_backend(p, 'lr')}"
        assert circuit_backend(p, "lr")["algorithm"] == "LeastRequest"

        short = sequential(p, "lr", 60)
        # Still in flight: the test measured what it meant to.
        assert circuit_endpoint(p, "lr", busy.addr)["pending"] == 6
    finally:
        for t in threads:
            t.join(30)
    assert all(s == 200 for s, _ in short), short
    by = collections.Counter(who for _, who in short)
    assert by["busy"] == 0, f"LeastRequest sent short requests to the busy endpoint: {dict(by)}"
    assert by["idle1"] >= 10 and by["idle2"] >= 10, dict(by)
    assert sorted(long_results) == [(200, "busy")] * 6, long_results


# --------------------------------------------------------------------------------------
# 3. consistent hashing


N_KEYS = 200


def key_owners(proxy, svc: str, keys: list[str]) -> dict[str, str]:
    conn = http.client.HTTPConnection(*split_addr(proxy.outbound), timeout=15)
    out = {}
    try:
        for k in keys:
            r = request(proxy.outbound, "GET", "/", host=svc, headers={"x-user": k}, conn=conn)
            assert r.status == 200, (k, r.status, r.headers)
            out[k] = served_by(r)
    finally:
        conn.close()
    return out


@pytest.mark.parametrize("algorithm", ["RingHash", "Maglev"])
def test_consistent_hashing_keeps_keys_and_moves_few(stack, algorithm):
    """The same x-user always reaches the same endpoint (also from another sidecar);
    removing one of five endpoints moves the keys it owned and (for the ring) nothing
    else, for Maglev almost nothing else; in all at most 35 % of the keys."""
    apps = [stack.demo(f"h{i}") for i in range(5)]
    name_of = {a.addr: f"h{i}" for i, a in enumerate(apps)}
    policy = backend_policy("aff", "aff", loadBalancer={"algorithm": algorithm,
                                                        "hash": {"header": "x-user"}})
    stack.write("svc.yaml", zoned_service("aff", [a.addr for a in apps]) + [policy])
    p = stack.proxy()
    assert circuit_backend(p, "aff")["algorithm"] == algorithm

    keys = [f"user-{i}" for i in range(N_KEYS)]
    first = key_owners(p, "aff", keys)
    again = key_owners(p, "aff", keys)
    assert first == again, {k: (first[k], again[k]) for k in keys if first[k] != again[k]}
    spread = collections.Counter(first.values())
    assert set(spread) == set(name_of.values()), spread
    assert min(spread.values()) >= 10, f"uneven key spread: {dict(spread)}"

    # Requests without the header are spread without affinity.
    unkeyed = collections.Counter(who for s, who in sequential(p, "aff", 50))
    assert len(unkeyed) >= 3, f"requests without x-user all went to {dict(unkeyed)}"

    # Another sidecar with the same config maps every key the same way.
    other = stack.proxy(name="proxy-2")
    assert key_owners(other, "aff", keys) == first

    removed = apps[2]
    removed_name = name_of[removed.addr]
    rest = [a.addr for a in apps if a is not removed]
    reload_to(stack, p, "svc.yaml", zoned_service("aff", rest) + [policy],
              "the EndpointSlice without one endpoint")
    assert len(circuit_backend(p, "aff")["endpoints"]) == 4

    after = key_owners(p, "aff", keys)
    assert removed_name not in after.values()
    moved = [k for k in keys if after[k] != first[k]]
    owned_by_removed = [k for k in keys if first[k] == removed_name]
    strays = [k for k in moved if first[k] != removed_name]
    assert set(owned_by_removed) <= set(moved)
    share = len(moved) / N_KEYS
    print(f"{algorithm}: removed endpoint owned {len(owned_by_removed)} keys; "
          f"{len(moved)} moved ({share:.1%}), {len(strays)} of them from other endpoints")
    assert share <= 0.35, f"{share:.0%} of the keys moved"
    if algorithm == "RingHash":
        # The ring is rebuilt from the same addresses: the others' points do not move.
        assert strays == [], f"keys of remaining endpoints moved: {[(k, first[k], after[k]) for k in strays]}"
    else:
        # Maglev refills its table; a little disruption beyond the removed endpoint's keys
        # is in its nature (the paper's trade-off), but only a little.
        assert len(strays) <= 0.05 * N_KEYS, f"{len(strays)} keys of remaining endpoints moved"
    # Stable again after the change.
    assert key_owners(p, "aff", keys) == after


# --------------------------------------------------------------------------------------
# 4. locality: zone -> region -> everywhere, and back


def test_locality_failover_and_recovery(stack):
    """Sidecar in zone a1 of region a; endpoints in a1, a2 (region a) and b1 (region b).
    Traffic stays in a1; when a1 fails (answers 500 to everything) its breaker trips and
    traffic moves to a2; when a2 fails too, to b1. With a route retry no request fails
    once the breaker tripped. When a1 and a2 recover, traffic returns to a1 after the
    (short) ejection."""
    a1 = stack.demo("a1")
    a2 = stack.demo("a2")
    b1 = stack.demo("b1")
    stack.write("svc.yaml", zoned_service("geo", [
        ep(a1.addr, "a1", "a", slice_name="geo-1-a1"),
        ep(a2.addr, "a2", "a", slice_name="geo-2-a2"),
        ep(b1.addr, "b1", "b", slice_name="geo-3-b1"),
    ]) + [
        retry_route("geo", "geo", {"attempts": 3, "backoff": "10ms", "codes": [500, 502, 503]}),
        backend_policy("geo", "geo",
                       retryBudget={"percent": 100, "minRetriesPerSecond": 100, "interval": "10s"},
                       circuitBreaker={"consecutiveFailures": 2,
                                       "ejection": {"base": "1s", "max": "2s", "maxEjectedPercent": 100},
                                       "failureStatusCodes": [500, 502, 503, 504]}),
    ])
    p = stack.proxy(extra=["--zone", "a1", "--region", "a"])

    b = circuit_backend(p, "geo")
    tiers = {e["address"]: e["tier"] for e in b["endpoints"]}
    assert tiers == {a1.addr: "zone", a2.addr: "region", b1.addr: "remote"}, b
    assert b["tier"] == "zone", b

    # Healthy: everything stays in the zone.
    got = sequential(p, "geo", 30)
    assert got == [(200, "a1")] * 30, collections.Counter(got)
    assert tier_counts(p, "geo") == {"zone": 30, "region": 0, "remote": 0}

    def drive(until_open: str, after: int, limit: int = 200):
        """Requests until `until_open`'s circuit is not closed, then `after` more:
        (results before the trip, results after it)."""
        conn = http.client.HTTPConnection(*split_addr(p.outbound), timeout=15)
        before, since = [], []
        try:
            for i in range(limit):
                tripped = circuit_endpoint(p, "geo", until_open)["state"] != "closed"
                r = request(p.outbound, "GET", f"/drive/{i}", host="geo", conn=conn)
                (since if tripped else before).append((r.status, served_by(r), r.header("tern-error")))
                if len(since) >= after:
                    break
        finally:
            conn.close()
        return before, since

    # a1 fails: its breaker trips, traffic moves to the region (a2), none to b1.
    control(a1, fail=1)
    before, since = drive(a1.addr, after=40)
    assert len(since) == 40, f"a1's breaker never tripped: {circuit_endpoint(p, 'geo', a1.addr)}"
    assert all(s == 200 for s, _, _ in since), f"requests failed after a1 was ejected: {since}"
    assert collections.Counter(who for _, who, _ in since) == {"a2": 40}, collections.Counter(since)
    early_failures = [x for x in before if x[0] != 200]
    # The tier choice is cached for 100 ms.
    wait_until(lambda: circuit_backend(p, "geo")["tier"] == "region", 2, "/circuits to show tier region")
    counts = tier_counts(p, "geo")
    assert counts["region"] >= 40 and counts["remote"] == 0, counts

    # a2 fails too: everywhere, which means b1 (a1 and a2 are ejected or probing).
    control(a2, fail=1)
    before, since = drive(a2.addr, after=40)
    assert len(since) == 40, f"a2's breaker never tripped: {circuit_endpoint(p, 'geo', a2.addr)}"
    assert all(s == 200 for s, _, _ in since), f"requests failed after a2 was ejected: {since}"
    assert collections.Counter(who for _, who, _ in since) == {"b1": 40}, collections.Counter(since)
    early_failures += [x for x in before if x[0] != 200]
    wait_until(lambda: circuit_backend(p, "geo")["tier"] == "remote", 2, "/circuits to show tier remote")
    counts = tier_counts(p, "geo")
    assert counts["remote"] >= 40, counts
    print(f"requests that failed before a breaker tripped: {early_failures}")

    # Both recover: after the ejection (at most 2 s + jitter) a probe closes a1's
    # circuit and the traffic comes home.
    control(a1, fail=0)
    control(a2, fail=0)
    zone_before = tier_counts(p, "geo")["zone"]
    conn = http.client.HTTPConnection(*split_addr(p.outbound), timeout=15)
    recent: collections.deque = collections.deque(maxlen=20)
    failures = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            r = request(p.outbound, "GET", "/home", host="geo", conn=conn)
            if r.status != 200:
                failures.append((r.status, r.header("tern-error")))
            recent.append(served_by(r))
            if len(recent) == 20 and set(recent) == {"a1"}:
                break
            time.sleep(0.01)
    finally:
        conn.close()
    assert failures == [], failures
    assert list(recent) == ["a1"] * 20, \
        f"traffic did not return to zone a1: last {list(recent)}; {circuit_backend(p, 'geo')}"
    assert circuit_endpoint(p, "geo", a1.addr)["state"] == "closed"
    wait_until(lambda: circuit_backend(p, "geo")["tier"] == "zone", 2, "/circuits to show tier zone")
    assert tier_counts(p, "geo")["zone"] >= zone_before + 20


def test_min_healthy_percent_and_disabled_locality(stack):
    """Zone a1 has two endpoints, one of them not ready (50 % healthy); a2 is in the same
    region. minHealthyPercent 50: the zone still serves (only a1-ready). The default (70):
    it spills to zone + region, and the healthy zone endpoint stays in use. Locality
    disabled: one tier, every endpoint takes traffic."""
    a1 = stack.demo("a1-ready")
    a2 = stack.demo("a2")
    b1 = stack.demo("b1")
    endpoints = [ep(a1.addr, "a1", "a"), ep(free_addr(), "a1", "a", ready=False),
                 ep(a2.addr, "a2", "a"), ep(b1.addr, "b1", "b")]

    def docs(load_balancer: dict | None):
        spec = {"loadBalancer": load_balancer} if load_balancer is not None else {}
        return zoned_service("mhp", endpoints) + [backend_policy("mhp", "mhp", **spec)]

    stack.write("svc.yaml", docs({"algorithm": "RoundRobin", "locality": {"minHealthyPercent": 50}}))
    p = stack.proxy(extra=["--zone", "a1", "--region", "a"])
    got = collections.Counter(who for _, who in sequential(p, "mhp", 30))
    assert got == {"a1-ready": 30}, got
    assert circuit_backend(p, "mhp")["tier"] == "zone"

    reload_to(stack, p, "svc.yaml", docs({"algorithm": "RoundRobin"}), "the default minHealthyPercent")
    got = collections.Counter(who for _, who in sequential(p, "mhp", 30))
    assert got == {"a1-ready": 15, "a2": 15}, got
    wait_until(lambda: circuit_backend(p, "mhp")["tier"] == "region", 2, "/circuits to show tier region")

    reload_to(stack, p, "svc.yaml", docs({"algorithm": "RoundRobin", "locality": {"enabled": False}}),
              "locality off")
    got = collections.Counter(who for _, who in sequential(p, "mhp", 30))
    assert got == {"a1-ready": 10, "a2": 10, "b1": 10}, got
    b = circuit_backend(p, "mhp")
    assert {e["tier"] for e in b["endpoints"]} == {"remote"} and b["tier"] == "remote", b


def test_failed_zone_spills_to_its_region_before_remote(stack):
    """The same three tiers, but the remote endpoint's EndpointSlice sorts first (slices,
    and so the backend's endpoints, are in name order). When a1 fails, its retries and
    the requests after its trip belong in the region, which is healthy: a2. None should
    cross to region b, whatever the order of the slices."""
    a1 = stack.demo("a1")
    a2 = stack.demo("a2")
    b1 = stack.demo("b1")
    stack.write("svc.yaml", zoned_service("geo", [
        ep(b1.addr, "b1", "b", slice_name="geo-1-b1"),
        ep(a1.addr, "a1", "a", slice_name="geo-2-a1"),
        ep(a2.addr, "a2", "a", slice_name="geo-3-a2"),
    ]) + [
        retry_route("geo", "geo", {"attempts": 3, "backoff": "10ms", "codes": [500, 502, 503]}),
        backend_policy("geo", "geo",
                       circuitBreaker={"consecutiveFailures": 2,
                                       "ejection": {"base": "30s", "maxEjectedPercent": 100},
                                       "failureStatusCodes": [500, 502, 503, 504]}),
    ])
    p = stack.proxy(extra=["--zone", "a1", "--region", "a"])
    assert sequential(p, "geo", 10) == [(200, "a1")] * 10

    control(a1, fail=1)
    got = []
    conn = http.client.HTTPConnection(*split_addr(p.outbound), timeout=15)
    try:
        for i in range(40):
            r = request(p.outbound, "GET", f"/spill/{i}", host="geo", conn=conn)
            got.append((i, r.status, served_by(r), r.header("tern-attempts")))
            time.sleep(0.01)  # 40 requests over more than the 100 ms the tier choice is cached
    finally:
        conn.close()
    assert circuit_endpoint(p, "geo", a1.addr)["state"] == "open"
    assert all(s == 200 for _, s, _, _ in got), got
    to_b1 = [(i, who, attempts) for i, _, who, attempts in got if who == "b1"]
    counts = tier_counts(p, "geo")
    assert not to_b1 and counts["remote"] == 0, (
        f"region a has a healthy endpoint (a2), yet {len(to_b1)} of 40 requests went to b1 "
        f"in region b: (request, served by, attempts) {to_b1}; attempts by tier {counts}")
    assert [who for _, _, who, _ in got][-10:] == ["a2"] * 10


# --------------------------------------------------------------------------------------
# 5. back-off from an endpoint that says "not now"


class Busy:
    """An upstream that answers every request 503, with `Retry-After: <retry_after>` when
    that is set, and records when each request came."""

    def __init__(self):
        self.retry_after: str | None = None
        self.hits: list[float] = []
        self.lock = threading.Lock()
        busy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with busy.lock:
                    busy.hits.append(time.monotonic())
                payload = b'{"busy": true}'
                self.send_response(503)
                if busy.retry_after is not None:
                    self.send_header("Retry-After", busy.retry_after)
                self.send_header("x-demo-service", "busy")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.hits)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def busy():
    b = Busy()
    yield b
    b.close()


def test_endpoint_answering_503_is_passed_over_for_its_retry_after(stack, busy):
    """`busy` answers 503 at once (so P2C, by latency alone, would love it). With its
    breaker out of the way, only the back-off keeps requests away: after a 503 with
    `Retry-After: 3` it gets nothing for 3 s, then one request (which re-arms it);
    without Retry-After it is passed over for 1 s. Alone, it still gets every request."""
    # 5 ms: `good` is always costlier than `busy` for P2C.
    good = stack.demo("good", latency_ms=5)
    no_breaker = {"circuitBreaker": {"consecutiveFailures": 0, "failureStatusCodes": []}}
    stack.write("svc.yaml",
                zoned_service("bo", [good.addr, busy.addr]) + [backend_policy("bo", "bo", **no_breaker)]
                + zoned_service("alone", [busy.addr]) + [backend_policy("alone", "alone", **no_breaker)])
    p = stack.proxy()

    busy.retry_after = "3"
    conn = http.client.HTTPConnection(*split_addr(p.outbound), timeout=15)
    statuses = collections.Counter()

    def run(seconds: float, limit: int = 3000):
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end and n < limit:
            r = request(p.outbound, "GET", f"/bo/{n}", host="bo", conn=conn)
            statuses[(r.status, served_by(r), error_code(r))] += 1
            n += 1
            time.sleep(0.005)
        return n

    try:
        # Until busy has been hit once (it is unmeasured, so P2C tries it early).
        for i in range(100):
            request(p.outbound, "GET", f"/first/{i}", host="bo", conn=conn)
            if busy.count():
                break
        assert busy.count() == 1, busy.count()
        first_hit = busy.hits[0]
        assert circuit_endpoint(p, "bo", busy.addr)["backing_off"] is True

        # Inside its 3 s window (with a margin): nothing more for busy.
        sent = run(max(0.0, first_hit + 2.5 - time.monotonic()))
        assert sent >= 50, sent
        assert busy.count() == 1, f"busy got {busy.count() - 1} requests during its Retry-After"
        assert statuses[(200, "good", "")] == sent, statuses

        # After the window it is tried again (its latency is still the best).
        time.sleep(max(0.0, first_hit + 3.2 - time.monotonic()))
        run(1.0)
        assert busy.count() == 2, f"{busy.count()} hits: expected exactly one after the window"
        assert busy.hits[1] - first_hit >= 2.9, busy.hits

        # Without Retry-After: 1 s. Over 3.5 s, about one request per second.
        busy.retry_after = None
        time.sleep(max(0.0, busy.hits[1] + 3.1 - time.monotonic()))
        start_count = busy.count()
        run(3.5)
        extra = busy.count() - start_count
        gaps = [b - a for a, b in zip(busy.hits[start_count:], busy.hits[start_count + 1:])]
        assert 2 <= extra <= 5, f"{extra} hits in 3.5 s with a 1 s back-off; gaps {gaps}"
        assert all(g >= 0.9 for g in gaps), f"busy was hit again within its 1 s back-off: {gaps}"
    finally:
        conn.close()

    # Alone, it is still used: the back-off never turns into a local error.
    before = busy.count()
    for i in range(5):
        r = request(p.outbound, "GET", f"/alone/{i}", host="alone")
        assert (r.status, served_by(r), r.header("tern-error")) == (503, "busy", None), (r.status, r.headers)
    assert busy.count() == before + 5
