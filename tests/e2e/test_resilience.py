"""Resilience of the sidecar: retries (route `retry`, the non-idempotent annotation, the
replay buffer, backoff and Retry-After), retry budgets, per-endpoint circuit breakers
(ejection, half-open probes, maxEjectedPercent, state kept across reloads), timeouts,
backend limits, `/circuits` and the access log.

Everything runs on 127.0.0.1 with real processes: tern-proxy's outbound listener talks
straight to tern-demo-app instances (or to a small scripted Python upstream when a test
needs an upstream that remembers what it received). Endpoints of one Service listen on
different ports, so every endpoint gets its own EndpointSlice. Assertions count requests,
attempts, metrics and circuit states; the few timing assertions are generous bounds.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import (
    NS,
    DemoApp,
    Proc,
    backend_name,
    backend_policy,
    binary,
    circuit_backend,
    circuit_endpoint,
    circuits,
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


def multi_service(name: str, endpoints: list[str], port: int = 80, ns: str = NS,
                  zone: str | None = None) -> list[dict]:
    """A Service with one port (`http`) and one EndpointSlice per endpoint, so that
    endpoints on 127.0.0.1 may listen on different ports."""
    docs = [{
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
    }]
    for i, addr in enumerate(endpoints):
        host, ep_port = split_addr(addr)
        ep = {"addresses": [host], "conditions": {"ready": True}}
        if zone:
            ep["zone"] = zone
        docs.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-{i}",
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": ep_port, "protocol": "TCP"}],
            "endpoints": [ep],
        })
    return docs


def route_name(route: str) -> str:
    return f"{NS}/{route}"


# --------------------------------------------------------------------------------------
# proxy observation helpers


def retries_sent(proxy, route: str) -> float:
    return proxy.metrics().sum("tern_retries_total", route_name=route_name(route))


def fates(proxy, route: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in proxy.metrics().get("tern_retry_fate_total", route_name=route_name(route)):
        out[labels["fate"]] = out.get(labels["fate"], 0) + v
    return out


def attempts_of(resp) -> int:
    """Attempts from `tern-attempts`; a response without the header took one."""
    v = resp.header("tern-attempts")
    return int(v) if v is not None else 1


def budget_bound(requests: int, elapsed: float, percent: int, min_per_s: int, interval_s: int) -> int:
    """The most retries a budget may grant for `requests` requests sent within `elapsed`
    seconds: percent of the requests plus the reserve of every window the run touched."""
    windows = 1 + int(elapsed // interval_s)
    return requests * percent // 100 + min_per_s * interval_s * windows


def demo_at(stack, name: str, addr: str) -> DemoApp:
    """A tern-demo-app on a given address (the conftest helper picks its own port)."""
    app = DemoApp.__new__(DemoApp)
    app.addr = addr
    app.proc = Proc(f"demo-{name}-{split_addr(addr)[1]}",
                    [binary("tern-demo-app"), "--listen", addr, "--name", name], stack.log_dir)
    wait_until(lambda: app.proc.ensure_alive() or f"listening on {addr}" in app.proc.output(),
               15, f"tern-demo-app {name} on {addr}")
    stack.things.append(app)
    return app


# --------------------------------------------------------------------------------------
# a scripted upstream that remembers every request


class Scripted:
    """HTTP/1.1 keep-alive upstream. Paths:
      /fail-once/KEY[?retry_after=N&code=C]  first request for KEY: C (503) with
                                             `Retry-After: N` if given; later ones 200
      /slow-once/KEY?ms=N                    first request for KEY: 200 after N ms;
                                             later ones 200 at once
      /slow/KEY?ms=N                         always 200 after N ms
      /ok/KEY                                always 200
    Every request is recorded under its KEY: (monotonic time, method, body). Several
    instances may share one record (`shared`): then they behave as one upstream with
    several endpoints (the first request for a KEY is the first on any of them)."""

    def __init__(self, shared: "Scripted | None" = None):
        self.hits: dict[str, list[tuple[float, str, bytes]]] = shared.hits if shared else {}
        self.lock = shared.lock if shared else threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # head and body are separate writes

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("content-length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                parts = url.path.strip("/").split("/")
                kind, key = (parts + ["", ""])[:2]
                with scripted.lock:
                    hits = scripted.hits.setdefault(key, [])
                    hits.append((time.monotonic(), self.command, body))
                    n = len(hits)
                status, headers = 200, {}
                if kind == "fail-once" and n == 1:
                    status = int(query.get("code", 503))
                    if "retry_after" in query:
                        headers["Retry-After"] = query["retry_after"]
                elif kind == "slow" or (kind == "slow-once" and n == 1):
                    time.sleep(int(query.get("ms", 1000)) / 1000)
                elif kind not in ("fail-once", "slow-once", "ok"):
                    status = 404
                payload = json.dumps({"key": key, "hit": n, "received": len(body)}).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the proxy gave up on this attempt (timeout)
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, key: str) -> int:
        with self.lock:
            return len(self.hits.get(key, []))

    def get(self, key: str) -> list[tuple[float, str, bytes]]:
        with self.lock:
            return list(self.hits.get(key, []))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    s = Scripted()
    yield s
    s.close()


# --------------------------------------------------------------------------------------
# 1. a flaky upstream: retries turn 30 % failures into > 99.5 % success, within budget

N_FLAKY = 400


def test_flaky_backend_retries_give_over_99_5_percent_success_within_budget(stack):
    """An upstream of three endpoints that fails 30 % of requests (a random 30 % of the
    requests get a 500 on their first attempt, wherever it lands; the failure is
    transient, so a retry can succeed). With `retry: {attempts: 3, codes: [500, 502,
    503]}` and the default budget (20 %, 10/s, 10s), more than 99.5 % of 400 sequential
    GETs succeed, every failed first attempt costs exactly one retry, and the retries
    stay within the budget. The failures follow requests, not endpoints, so this does
    not depend on what the balancer does."""
    first = Scripted()
    ups = [first, Scripted(shared=first), Scripted(shared=first)]
    try:
        stack.write("svc.yaml", multi_service("flaky", [u.addr for u in ups])
                    + [retry_route("flaky", "flaky",
                                   retry={"attempts": 3, "backoff": "10ms", "codes": [500, 502, 503]})])
        p = stack.proxy()

        rng = random.Random(20240501)
        failing = {i for i in range(N_FLAKY) if rng.random() < 0.3}
        assert 0.25 * N_FLAKY < len(failing) < 0.35 * N_FLAKY
        conn = http.client.HTTPConnection(*split_addr(p.outbound), timeout=15)
        ok = 0
        bad = []
        attempts_total = 0
        start = time.monotonic()
        for i in range(N_FLAKY):
            path = f"/fail-once/k{i}?code=500" if i in failing else f"/ok/k{i}"
            r = request(p.outbound, "GET", path, host="flaky", conn=conn)
            assert r.header("tern-attempts") is not None, "a route with retry answers tern-attempts"
            a = attempts_of(r)
            attempts_total += a
            if r.status == 200:
                ok += 1
            else:
                bad.append((i, r.status, r.header("tern-error"), a))
        elapsed = time.monotonic() - start
        conn.close()

        assert ok / N_FLAKY > 0.995, f"{ok}/{N_FLAKY} succeeded; failures: {bad[:10]}"
        # Each failing request was sent twice, the others once.
        counts = [first.count(f"k{i}") for i in range(N_FLAKY)]
        assert [i for i, c in enumerate(counts) if c != (2 if i in failing else 1)] == []

        retries = retries_sent(p, "flaky")
        assert retries == attempts_total - N_FLAKY == len(failing), (retries, attempts_total, len(failing))
        bound = budget_bound(N_FLAKY, elapsed, 20, 10, 10)
        assert retries <= bound, f"{retries} retries for {N_FLAKY} requests, budget allows {bound}"
        f = fates(p, "flaky")
        assert f.get("success_after_retry", 0) == len(failing), f
        assert f.get("success_first_try", 0) == N_FLAKY - len(failing), f
        assert sum(f.values()) == N_FLAKY, f
    finally:
        for u in ups:
            u.close()


def test_single_endpoint_failing_30_percent_is_retried_within_budget(stack):
    """The same route in front of one endpoint told to fail 30 % (`POST /control?fail=0.3`).
    Failures are independent on every attempt, so even unlimited retries leave 0.3^4 = 0.8 %
    failing; and the demand (about 0.43 retries per request) outgrows the default budget
    (20 % + 100) towards the end of the run. So: a lower success bar (95 %), the budget
    bound, and every failure accounted for: 4 attempts (retries_exhausted) or fewer
    because the budget said no (budget_exhausted)."""
    app = stack.demo("app")
    control(app, fail="0.3")
    stack.write("svc.yaml", multi_service("one", [app.addr])
                + [retry_route("one", "one",
                               retry={"attempts": 3, "backoff": "10ms", "codes": [500, 502, 503]})])
    p = stack.proxy()
    conn = http.client.HTTPConnection(*split_addr(p.outbound), timeout=15)
    ok = attempts_total = 0
    failed_attempts = []
    start = time.monotonic()
    for i in range(N_FLAKY):
        r = request(p.outbound, "GET", f"/item/{i}", host="one", conn=conn)
        attempts_total += attempts_of(r)
        if r.status == 200:
            ok += 1
        else:
            assert (r.status, r.header("tern-error")) == (500, None), (r.status, r.headers)
            failed_attempts.append(attempts_of(r))
    elapsed = time.monotonic() - start
    conn.close()
    assert ok / N_FLAKY >= 0.95, f"{ok}/{N_FLAKY}; attempts of the failures: {failed_attempts}"
    retries = retries_sent(p, "one")
    assert retries == attempts_total - N_FLAKY
    assert 0 < retries <= budget_bound(N_FLAKY, elapsed, 20, 10, 10), retries
    f = fates(p, "one")
    assert f.get("retries_exhausted", 0) == failed_attempts.count(4), (f, failed_attempts)
    assert f.get("budget_exhausted", 0) == sum(a < 4 for a in failed_attempts), (f, failed_attempts)
    assert f.get("success_first_try", 0) + f.get("success_after_retry", 0) == ok, f


# --------------------------------------------------------------------------------------
# 2. one endpoint down: ejected within consecutiveFailures, nothing fails, probe closes it


def test_dead_endpoint_is_ejected_then_probed_back(stack):
    a = stack.demo("a")
    b = stack.demo("b")
    dead = free_addr()  # nothing listens here (yet)
    stack.write("svc.yaml", multi_service("inv", [a.addr, b.addr, dead]) + [backend_policy(
        "inv", "inv",
        circuitBreaker={"consecutiveFailures": 3,
                        "ejection": {"base": "1s", "max": "10s", "maxEjectedPercent": 50}})])
    p = stack.proxy()

    # No route: only connect failures are retried (on other endpoints). No GET fails.
    results = []
    for i in range(100):
        r = request(p.outbound, "GET", f"/x/{i}", host="inv")
        results.append((r.status, r.header("tern-error"), attempts_of(r)))
        if i >= 20 and circuit_endpoint(p, "inv", dead)["state"] != "closed":
            break
    assert all(s == 200 for s, _, _ in results), results
    retried = sum(a_ > 1 for _, _, a_ in results)

    back = circuit_backend(p, "inv")
    assert back["policy"] == f"{NS}/inv", back
    assert back["endpoints_total"] == 3 and back["max_ejected"] == 1 and back["ejected"] == 1, back
    ep = circuit_endpoint(p, "inv", dead)
    assert ep["state"] == "open" and ep["reason"] in ("consecutive", "probe_failed"), ep
    assert ep["trips"] >= 1
    # Ejected within consecutiveFailures failures: 3 for the trip, then only (failed)
    # half-open probes, one per later trip (if the loop outlasted the 1 s ejection).
    assert ep["recent"]["failure"] == 3 + (ep["trips"] - 1), ep
    assert ep["recent"]["success"] == 0, ep
    # Every failed attempt at it was a connect failure retried on another endpoint.
    assert retried == ep["recent"]["failure"], (retried, ep)
    ejection_ms = ep["next_probe_unix_ms"] - ep["since_unix_ms"]
    base_ms = 1000 * 2 ** (ep["trips"] - 1)
    assert base_ms <= ejection_ms <= base_ms * 1.1 + 1, ep
    for other in (a.addr, b.addr):
        o = circuit_endpoint(p, "inv", other)
        assert o["state"] == "closed" and o["trips"] == 0, o

    m = p.metrics()
    assert m.sum("tern_circuit_state", endpoint=dead, state="open") == 1
    assert m.sum("tern_circuit_state", endpoint=dead, state="closed") == 0
    assert m.sum("tern_circuit_transitions_total", endpoint=dead, reason="consecutive") == 1
    assert m.sum("tern_circuit_state", endpoint=a.addr, state="closed") == 1

    # Its ejection ends while it is still down: the half-open probe fails (and is
    # retried elsewhere: no GET fails), and it is ejected again for twice as long.
    trips = ep["trips"]
    time.sleep(max(0.0, ep["next_probe_unix_ms"] / 1000 - time.time()) + 0.05)
    for i in range(60):
        r = request(p.outbound, "GET", f"/probe/{i}", host="inv")
        assert r.status == 200, (r.status, r.headers)
        ep = circuit_endpoint(p, "inv", dead)
        if ep["trips"] > trips:
            break
    assert ep["trips"] == trips + 1, f"no probe went to the endpoint after its ejection: {ep}"
    assert ep["state"] == "open" and ep["reason"] == "probe_failed", ep
    base_ms = 1000 * 2 ** (ep["trips"] - 1)
    assert base_ms <= ep["next_probe_unix_ms"] - ep["since_unix_ms"] <= base_ms * 1.1 + 1, ep
    assert p.metrics().sum("tern_circuit_transitions_total", endpoint=dead, reason="probe_failed") >= 1

    # It comes back. After its ejection a half-open probe reaches it and closes it.
    demo_at(stack, "c", dead)
    served = set()
    deadline = time.monotonic() + 15
    closed = None
    while time.monotonic() < deadline:
        r = request(p.outbound, "GET", "/after", host="inv")
        assert r.status == 200, (r.status, r.headers)
        served.add(r.header("x-demo-service"))
        ep = circuit_endpoint(p, "inv", dead)
        if ep["state"] == "closed":
            closed = ep
            break
        time.sleep(0.05)
    assert closed is not None, f"the revived endpoint was never closed again: {ep}"
    assert closed["reason"] == "probe_succeeded", closed
    assert closed["next_probe_unix_ms"] is None, closed
    assert "c" in served, "the probe request is served by the revived endpoint"
    m = p.metrics()
    assert m.sum("tern_circuit_transitions_total", endpoint=dead, reason="probe_succeeded") == 1
    assert m.sum("tern_circuit_state", endpoint=dead, state="closed") == 1
    assert m.sum("tern_circuit_state", endpoint=dead, state="open") == 0
    assert circuit_backend(p, "inv")["ejected"] == 0


def test_all_endpoints_ejected_only_with_max_ejected_100(stack):
    """maxEjectedPercent 100: once every endpoint is ejected, 503 circuit-open. With the
    default 50 %, three failing endpoints never lose more than one."""
    dead1, dead2 = free_addr(), free_addr()
    d1, d2, d3 = free_addr(), free_addr(), free_addr()
    stack.write("svc.yaml",
                multi_service("all", [dead1, dead2])
                + [backend_policy("all", "all", circuitBreaker={
                    "consecutiveFailures": 2,
                    "ejection": {"base": "30s", "maxEjectedPercent": 100}})]
                + multi_service("half", [d1, d2, d3])
                + [backend_policy("half", "half", circuitBreaker={
                    "consecutiveFailures": 2, "ejection": {"base": "30s"}})])
    p = stack.proxy()

    codes = []
    for _ in range(10):
        r = request(p.outbound, "GET", "/", host="all")
        codes.append((r.status, error_code(r)))
    assert codes[-1] == (503, "circuit-open"), codes
    assert set(codes) <= {(502, "connect-failed"), (503, "circuit-open")}, codes
    back = circuit_backend(p, "all")
    assert back["ejected"] == 2 and back["max_ejected"] == 2, back

    for _ in range(10):
        r = request(p.outbound, "GET", "/", host="half")
        assert (r.status, error_code(r)) == (502, "connect-failed"), r
    back = circuit_backend(p, "half")
    assert back["max_ejected"] == 1 and back["ejected"] == 1, back
    assert sorted(e["state"] for e in back["endpoints"]) == ["closed", "closed", "open"], back


def test_failure_rate_trips_with_reason_rate(stack):
    """consecutiveFailures 0 (off) and failureRate {percent: 50, minRequests: 10}: an
    endpoint that answers 500 to everything is ejected at its 10th request, no earlier.
    One endpoint and maxEjectedPercent 100, so that what the balancer prefers does not
    matter: once it is ejected, requests get 503 circuit-open."""
    bad = stack.demo("bad", fail_rate=1.0)
    stack.write("svc.yaml", multi_service("rated", [bad.addr]) + [
        backend_policy("rated", "rated", circuitBreaker={
            "consecutiveFailures": 0,
            "failureRate": {"percent": 50, "minRequests": 10, "interval": "10s"},
            "ejection": {"base": "30s", "maxEjectedPercent": 100},
            "failureStatusCodes": [500]})])
    p = stack.proxy()

    got = [(r.status, error_code(r)) for r in
           (request(p.outbound, "GET", f"/{i}", host="rated") for i in range(15))]
    # No route retry: the 500s go back to the client; exactly minRequests of them.
    assert got == [(500, "")] * 10 + [(503, "circuit-open")] * 5, got
    ep = circuit_endpoint(p, "rated", bad.addr)
    assert (ep["state"], ep["reason"], ep["trips"]) == ("open", "rate", 1), ep
    assert ep["recent"]["success"] == 0 and ep["recent"]["failure"] == 10, ep
    assert ep["recent"]["interval_seconds"] == 10, ep
    m = p.metrics()
    assert m.sum("tern_circuit_transitions_total", endpoint=bad.addr, reason="rate") == 1
    assert m.sum("tern_circuit_transitions_total", endpoint=bad.addr, reason="consecutive") == 0


# --------------------------------------------------------------------------------------
# 3. total outage: retries bounded by the budget, fates say budget_exhausted

OUTAGE_REQUESTS = 100
OUTAGE_BUDGET = {"percent": 10, "minRetriesPerSecond": 1, "interval": "10s"}


@pytest.mark.parametrize("kind", ["status-503", "connect-refused"])
def test_total_outage_retries_stay_within_budget(stack, kind):
    if kind == "status-503":
        apps = [stack.demo("o1"), stack.demo("o2")]
        endpoints = [x.addr for x in apps]
        path, want = "/status/503", (503, "")
    else:
        endpoints = [free_addr(), free_addr()]
        path, want = "/", (502, "connect-failed")
    stack.write("svc.yaml", multi_service("down", endpoints) + [
        retry_route("down", "down", retry={"attempts": 3, "backoff": "10ms", "codes": [503]}),
        # Breakers off, so that every request reaches an endpoint and only the budget
        # limits the retries.
        backend_policy("down", "down", retryBudget=OUTAGE_BUDGET,
                       circuitBreaker={"consecutiveFailures": 0, "failureStatusCodes": []}),
    ])
    p = stack.proxy()

    attempts_total = 0
    start = time.monotonic()
    for i in range(OUTAGE_REQUESTS):
        r = request(p.outbound, "GET", path, host="down")
        assert (r.status, error_code(r)) == want, (i, r.status, r.headers)
        attempts_total += attempts_of(r)
    elapsed = time.monotonic() - start

    retries = retries_sent(p, "down")
    assert retries == attempts_total - OUTAGE_REQUESTS, (retries, attempts_total)
    bound = budget_bound(OUTAGE_REQUESTS, elapsed, 10, 1, 10)
    assert retries <= bound, f"{retries} retries in a total outage; the budget allows {bound}"
    # Without a budget this would be 3 per request; the reserve alone allows 10.
    assert retries >= 10, retries
    f = fates(p, "down")
    assert f.get("budget_exhausted", 0) >= OUTAGE_REQUESTS - retries, f
    assert f.get("success_first_try", 0) == 0 and f.get("success_after_retry", 0) == 0, f
    assert sum(f.values()) == OUTAGE_REQUESTS, f


# --------------------------------------------------------------------------------------
# 4. POST: retried only with the annotation; large bodies are not retried


def test_post_retried_only_with_annotation_and_small_body(stack, scripted):
    retry = {"attempts": 2, "backoff": "10ms", "codes": [503]}
    stack.write("svc.yaml",
                multi_service("plain", [scripted.addr])
                + [retry_route("plain", "plain", retry=retry)]
                + multi_service("anno", [scripted.addr])
                + [retry_route("anno", "anno", retry=retry, non_idempotent=True)])
    p = stack.proxy(extra=["--retry-buffer", "1024"])

    # Without the annotation: a POST that got a 503 is not sent again.
    r = request(p.outbound, "POST", "/fail-once/p1", host="plain", body=b"hello")
    assert r.status == 503 and attempts_of(r) == 1, (r.status, r.headers)
    assert scripted.count("p1") == 1
    # ... while a GET (and a PUT) on the same route is.
    r = request(p.outbound, "GET", "/fail-once/g1", host="plain")
    assert r.status == 200 and attempts_of(r) == 2, (r.status, r.headers)
    assert scripted.count("g1") == 2
    r = request(p.outbound, "PUT", "/fail-once/u1", host="plain", body=b"put-body")
    assert r.status == 200 and attempts_of(r) == 2, (r.status, r.headers)
    assert [h[2] for h in scripted.get("u1")] == [b"put-body", b"put-body"]
    r = request(p.outbound, "DELETE", "/fail-once/d1", host="plain")
    assert r.status == 200 and attempts_of(r) == 2, (r.status, r.headers)
    r = request(p.outbound, "PATCH", "/fail-once/x1", host="plain", body=b"patch")
    assert r.status == 503 and attempts_of(r) == 1, (r.status, r.headers)
    assert scripted.count("x1") == 1
    assert fates(p, "plain").get("not_retryable", 0) == 2

    # With the annotation: retried, the body replayed byte for byte.
    body = bytes(range(256)) * 3  # 768 bytes, under --retry-buffer 1024
    r = request(p.outbound, "POST", "/fail-once/p2", host="anno", body=body)
    assert r.status == 200 and attempts_of(r) == 2, (r.status, r.headers)
    hits = scripted.get("p2")
    assert [(m, b) for _, m, b in hits] == [("POST", body), ("POST", body)]
    r = request(p.outbound, "PATCH", "/fail-once/p3", host="anno", body=b"patch")
    assert r.status == 200 and attempts_of(r) == 2, (r.status, r.headers)

    # A body over --retry-buffer (Content-Length 4096) is streamed once, not retried,
    # and counted.
    before = p.metrics().sum("tern_retry_body_too_large_total", route_name=route_name("anno"))
    big = b"b" * 4096
    r = request(p.outbound, "POST", "/fail-once/p4", host="anno", body=big)
    assert r.status == 503 and attempts_of(r) == 1, (r.status, r.headers)
    assert [b for _, _, b in scripted.get("p4")] == [big]
    after = p.metrics().sum("tern_retry_body_too_large_total", route_name=route_name("anno"))
    assert after == before + 1, (before, after)
    # The same large body on a request that succeeds at once goes through intact.
    r = request(p.outbound, "POST", "/ok/p5", host="anno", body=big)
    assert r.status == 200 and json.loads(r.body)["received"] == len(big)

    # Chunked bodies (no Content-Length): a small one is replayed ...
    chunks = [bytes([65 + i]) * 100 for i in range(3)]
    r = request(p.outbound, "POST", "/fail-once/p6", host="anno", body=iter(chunks))
    assert r.status == 200 and attempts_of(r) == 2, (r.status, r.headers)
    assert [b for _, _, b in scripted.get("p6")] == [b"".join(chunks)] * 2
    # ... one that outgrows the buffer while streaming is sent once, whole, and counted.
    chunks = [bytes([97 + i]) * 1000 for i in range(5)]
    r = request(p.outbound, "POST", "/fail-once/p7", host="anno", body=iter(chunks))
    assert r.status == 503 and attempts_of(r) == 1, (r.status, r.headers)
    assert [b for _, _, b in scripted.get("p7")] == [b"".join(chunks)]
    # Counted per request whose body outgrew the buffer (p4, p5 and p7), whether or not
    # it would have needed a retry.
    final = p.metrics().sum("tern_retry_body_too_large_total", route_name=route_name("anno"))
    assert final == before + 3, (before, final)


def test_without_retry_only_connect_failures_are_retried(stack, scripted):
    """No `retry` on the route: a 500 goes back to the client as it is, but a POST whose
    first attempt could not connect is sent (with its body) to another endpoint."""
    dead = free_addr()
    stack.write("svc.yaml", multi_service("noretry", [dead, scripted.addr]) + [
        # Breakers off: the dead endpoint keeps getting first attempts.
        backend_policy("noretry", "noretry", circuitBreaker={"consecutiveFailures": 0}),
    ])
    p = stack.proxy()

    for i in range(4):
        r = request(p.outbound, "GET", f"/fail-once/n{i}?code=500", host="noretry")
        assert (r.status, error_code(r)) == (500, ""), (i, r.status, r.headers)
        assert scripted.count(f"n{i}") == 1

    attempts = []
    for i in range(20):
        body = f"order-{i}".encode() * 100
        r = request(p.outbound, "POST", f"/ok/c{i}", host="noretry", body=body)
        assert r.status == 200, (i, r.status, r.headers)
        assert [(m, b) for _, m, b in scripted.get(f"c{i}")] == [("POST", body)]
        attempts.append(attempts_of(r))
        if 2 in attempts and i >= 3:
            break
    assert 2 in attempts and set(attempts) <= {1, 2}, attempts


def test_connect_failure_is_retried_on_the_live_endpoint_after_a_503(stack, scripted):
    """Endpoints [dead, live], no route `retry`, breakers off. The live endpoint answers
    one request 503 (so the balancer passes it over for a while); the next GETs pick the
    dead endpoint first, cannot connect, and must be retried on the live one ("on other
    endpoints"): the dead endpoint cannot take them at all, the live one can."""
    dead = free_addr()
    stack.write("svc.yaml", multi_service("after503", [dead, scripted.addr]) + [
        backend_policy("after503", "after503", circuitBreaker={"consecutiveFailures": 0}),
    ])
    p = stack.proxy()
    # Make sure the live endpoint is the one that answers the 503.
    for i in range(20):
        r = request(p.outbound, "GET", "/fail-once/first", host="after503")
        if scripted.count("first") == 1:
            break
    assert (r.status, error_code(r)) == (503, ""), (r.status, r.headers)
    got = []
    for i in range(5):
        r = request(p.outbound, "GET", f"/ok/a{i}", host="after503")
        got.append((r.status, r.header("tern-error"), attempts_of(r)))
    assert all(s == 200 for s, _, _ in got), got


# --------------------------------------------------------------------------------------
# 5. timeouts, Retry-After, limits


def test_per_try_timeout_is_retried_for_idempotent_requests(stack, scripted):
    """backendRequest 300ms: an attempt that hangs is cut and, for an idempotent request
    on a route with retry, sent again (here the upstream hangs on the first request for a
    key only); a POST is not; when every attempt hangs, 504 backend-timeout."""
    stack.write("svc.yaml", multi_service("st", [scripted.addr]) + [
        retry_route("st", "st", retry={"attempts": 2, "backoff": "10ms", "codes": [503]},
                    timeouts={"request": "10s", "backendRequest": "300ms"}),
    ])
    p = stack.proxy()

    for i in range(3):
        t0 = time.monotonic()
        r = request(p.outbound, "GET", f"/slow-once/g{i}?ms=3000", host="st")
        took = time.monotonic() - t0
        assert r.status == 200 and attempts_of(r) == 2, (i, r.status, r.headers)
        assert scripted.count(f"g{i}") == 2
        assert took < 2.5, f"GET {i} took {took:.2f}s: the 300ms per-try timeout did not cut it"

    # A POST (no annotation) that times out is not retried: 504 backend-timeout.
    r = request(p.outbound, "POST", "/slow-once/p1?ms=3000", host="st", body=b"x")
    assert (r.status, error_code(r), attempts_of(r)) == (504, "backend-timeout", 1), (r.status, r.headers)
    assert scripted.count("p1") == 1

    # Every attempt hangs: 3 attempts, then 504 backend-timeout.
    t0 = time.monotonic()
    r = request(p.outbound, "GET", "/slow/all?ms=3000", host="st")
    took = time.monotonic() - t0
    assert (r.status, error_code(r), attempts_of(r)) == (504, "backend-timeout", 3), (r.status, r.headers)
    assert scripted.count("all") == 3
    assert took < 2.9, took
    f = fates(p, "st")
    assert f.get("success_after_retry", 0) == 3, f
    assert f.get("retries_exhausted", 0) == 1, f
    assert f.get("not_retryable", 0) == 1, f


def test_request_timeout_caps_all_attempts(stack):
    app = stack.demo("app")
    stack.write("svc.yaml", multi_service("capped", [app.addr]) + [
        retry_route("capped", "capped", retry={"attempts": 5, "backoff": "10ms", "codes": [503]},
                    timeouts={"request": "1s", "backendRequest": "600ms"}),
    ])
    p = stack.proxy()
    t0 = time.monotonic()
    r = request(p.outbound, "GET", "/sleep/5000", host="capped")
    took = time.monotonic() - t0
    # Uncapped, 6 attempts of 600 ms would take 3.6 s.
    assert (r.status, error_code(r)) == (504, "request-timeout"), (r.status, r.headers)
    assert attempts_of(r) == 2, r.headers
    assert took < 2.5, took
    assert fates(p, "capped").get("timed_out", 0) == 1
    # Within the timeouts all is well.
    r = request(p.outbound, "GET", "/sleep/10", host="capped")
    assert r.status == 200 and attempts_of(r) == 1


def test_retry_after_is_honoured(stack, scripted):
    retry = {"attempts": 2, "backoff": "10ms", "codes": [503]}
    stack.write("svc.yaml",
                multi_service("ra", [scripted.addr])
                + [retry_route("ra", "ra", retry=retry)]
                + multi_service("rashort", [scripted.addr])
                + [retry_route("rashort", "rashort", retry=retry, timeouts={"request": "2s"})])
    p = stack.proxy()

    # 503 + Retry-After: 1, then 200: the retry waits the second.
    r = request(p.outbound, "GET", "/fail-once/ra1?retry_after=1", host="ra")
    assert r.status == 200 and attempts_of(r) == 2, (r.status, r.headers)
    (t1, _, _), (t2, _, _) = scripted.get("ra1")
    assert t2 - t1 >= 0.95, f"the retry came {t2 - t1:.3f}s after a Retry-After: 1"

    # Retry-After over 10 s: not waited for; the 503 goes to the client.
    t0 = time.monotonic()
    r = request(p.outbound, "GET", "/fail-once/ra2?retry_after=30", host="ra")
    assert r.status == 503 and attempts_of(r) == 1, (r.status, r.headers)
    assert time.monotonic() - t0 < 5
    assert scripted.count("ra2") == 1

    # Retry-After longer than what is left of the request timeout (2 s): not waited for.
    r = request(p.outbound, "GET", "/fail-once/ra3?retry_after=5", host="rashort")
    assert (r.status, error_code(r)) == (503, ""), (r.status, r.headers)
    assert attempts_of(r) == 1
    assert scripted.count("ra3") == 1


def test_limits_overflow_is_503_at_once(stack):
    app = stack.demo("app")
    stack.write("svc.yaml", multi_service("lim", [app.addr])
                + [backend_policy("lim", "lim", limits={"maxRequests": 2})])
    p = stack.proxy()

    results = []
    lock = threading.Lock()
    go = threading.Barrier(6)

    def one():
        go.wait(10)
        t0 = time.monotonic()
        r = request(p.outbound, "GET", "/sleep/2000", host="lim", timeout=20)
        with lock:
            results.append((r.status, error_code(r), time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    ok = [x for x in results if x[0] == 200]
    over = [x for x in results if x[:2] == (503, "overflow")]
    assert len(ok) == 2 and len(over) == 4, results
    assert all(took < 1.5 for _, _, took in over), f"overflow answers should not wait: {over}"
    assert p.metrics().sum("tern_overflow_total", backend_name=backend_name("lim"), limit="requests") == 4
    # The slots come back: the next request is served.
    assert request(p.outbound, "GET", "/", host="lim").status == 200


def test_connection_limit_does_not_refuse_a_client_with_one_request_in_flight(stack):
    """maxConnections: 1 on a backend with two endpoints, and a client that sends one
    request at a time. Nothing is ever in flight beside the current request, so the
    limit is never really exceeded: an idle pooled connection must not hold the only
    connection slot and make every other request (the ones for the other endpoint) a
    503 overflow."""
    a = stack.demo("a")
    b = stack.demo("b")
    stack.write("svc.yaml", multi_service("onecx", [a.addr, b.addr])
                + [backend_policy("onecx", "onecx", limits={"maxConnections": 1})])
    p = stack.proxy(extra=["--workers", "1"])
    conn = http.client.HTTPConnection(*split_addr(p.outbound), timeout=15)
    got = []
    for i in range(10):
        r = request(p.outbound, "GET", f"/{i}", host="onecx", conn=conn)
        got.append((r.status, r.header("tern-error"), r.header("x-demo-service")))
    conn.close()
    assert all(s == 200 for s, _, _ in got), got
    assert {svc for _, _, svc in got} == {"a", "b"}, got


# --------------------------------------------------------------------------------------
# 6. a reload keeps the breaker state of unchanged endpoints


def test_reload_keeps_breaker_state_of_unchanged_endpoints(stack):
    a = stack.demo("a")
    b = stack.demo("b")
    dead = free_addr()
    policy = {"circuitBreaker": {"consecutiveFailures": 3,
                                 "ejection": {"base": "60s", "maxEjectedPercent": 50}}}
    stack.write("svc.yaml", multi_service("kept", [a.addr, b.addr, dead])
                + [backend_policy("kept", "kept", **policy)])
    p = stack.proxy()

    for i in range(100):
        assert request(p.outbound, "GET", f"/{i}", host="kept").status == 200
        if circuit_endpoint(p, "kept", dead)["state"] != "closed":
            break
    before = circuit_endpoint(p, "kept", dead)
    assert before["state"] == "open" and before["trips"] == 1, before
    v1 = p.config_version()
    assert circuits(p)["version"] == v1

    # An unrelated change: one more Service file.
    stack.write("other.yaml", multi_service("other", [a.addr]))
    wait_until(lambda: p.config_version() != v1, 20, "the new config version")
    assert p.admin_get("/ready")[0] == 200
    doc = circuits(p)
    assert doc["version"] == p.config_version() != v1
    after = circuit_endpoint(p, "kept", dead)
    for k in ("state", "reason", "since_unix_ms", "next_probe_unix_ms", "trips"):
        assert after[k] == before[k], (k, before, after)
    assert circuit_backend(p, "kept")["ejected"] == 1
    assert p.metrics().sum("tern_circuit_state", endpoint=dead, state="open") == 1
    # Still ejected in fact: no request goes to it, none fails.
    for i in range(15):
        r = request(p.outbound, "GET", f"/after/{i}", host="kept")
        assert r.status == 200 and attempts_of(r) == 1, (r.status, r.headers)
    assert circuit_endpoint(p, "kept", dead)["recent"]["failure"] == before["recent"]["failure"]

    # A change of the breaker settings is not "unchanged": those circuits start afresh.
    policy["circuitBreaker"]["consecutiveFailures"] = 4
    v2 = p.config_version()
    stack.write("svc.yaml", multi_service("kept", [a.addr, b.addr, dead])
                + [backend_policy("kept", "kept", **policy)])
    wait_until(lambda: p.config_version() != v2, 20, "the changed policy to apply")
    fresh = circuit_endpoint(p, "kept", dead)
    assert fresh["state"] == "closed" and fresh["trips"] == 0, fresh


# --------------------------------------------------------------------------------------
# 7. the access log


def access_lines(proxy) -> list[dict]:
    out = []
    for line in proxy.proc.output().splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_access_log_lines(stack, scripted):
    dead = free_addr()
    stack.write("svc.yaml",
                multi_service("logged", [scripted.addr])
                + [retry_route("logged", "logged",
                               retry={"attempts": 2, "backoff": "10ms", "codes": [503]})]
                + multi_service("gone", [dead]))
    p = stack.proxy(extra=["--access-log"])

    r1 = request(p.outbound, "GET", "/fail-once/log1", host="logged")
    assert r1.status == 200 and attempts_of(r1) == 2
    r2 = request(p.outbound, "GET", "/nowhere", host="gone")
    assert (r2.status, error_code(r2)) == (502, "connect-failed")

    wait_until(lambda: len(access_lines(p)) >= 2, 10, "two access log lines")
    lines = access_lines(p)
    assert len(lines) == 2, lines
    for line in lines:
        for key in ("route", "backend", "endpoint", "status", "attempts", "duration_ms", "error"):
            assert key in line, (key, line)
        assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0, line

    ok = next(x for x in lines if x["status"] == 200)
    assert ok["route"] == route_name("logged"), ok
    assert ok["backend"] == backend_name("logged"), ok
    assert ok["endpoint"] == scripted.addr, ok
    assert ok["attempts"] == 2, ok
    assert ok["error"] is None, ok
    # The retry honoured no Retry-After, only a 10 ms backoff.
    assert ok["duration_ms"] < 5000, ok

    failed = next(x for x in lines if x["status"] == 502)
    assert failed["route"] == f"{NS}/gone", failed
    assert failed["backend"] == backend_name("gone"), failed
    assert failed["endpoint"] == dead, failed
    assert failed["attempts"] == attempts_of(r2), (failed, r2.headers)
    assert failed["error"] == r2.header("tern-error"), failed
    assert failed["error"].startswith("connect-failed"), failed
