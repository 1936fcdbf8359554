"""The checkout HTTPRoute (namespace shop): canary header, 90/10 split, header filters and
URL rewrites. checkout-v1/-v2 endpoints are two tern-demo-app instances named v1/v2."""

import collections
import http.client
import threading

from conftest import request, split_addr

TOTAL = 10_000
THREADS = 8


def load(addr, host, path, n, headers=None, threads=THREADS):
    """Sends n requests over `threads` keep-alive connections; returns (Counter of
    x-demo-service by status, list of errors)."""
    counts = collections.Counter()
    errors = []
    lock = threading.Lock()

    def worker(k):
        conn = http.client.HTTPConnection(*split_addr(addr), timeout=30)
        local = collections.Counter()
        try:
            for _ in range(k):
                conn.request("GET", path, headers=dict(headers or {}, Host=host))
                r = conn.getresponse()
                r.read()
                local[(r.status, r.getheader("x-demo-service"))] += 1
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(repr(e))
        finally:
            conn.close()
            with lock:
                counts.update(local)

    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    ts = [threading.Thread(target=worker, args=(k,)) for k in per]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in ts), "load threads did not finish"
    return counts, errors


def test_canary_header_always_goes_to_v2(mesh):
    counts, errors = load(mesh.a.outbound, "checkout.shop", "/api/cart", 1000, {"x-canary": "1"}, threads=4)
    assert not errors
    assert counts == {(200, "v2"): 1000}


def test_canary_header_other_value_is_split(mesh):
    counts, errors = load(mesh.a.outbound, "checkout", "/api/cart", 400, {"x-canary": "0"}, threads=4)
    assert not errors
    assert counts[(200, "v1")] > 0 and counts[(200, "v1")] + counts[(200, "v2")] == 400


def test_weighted_split_90_10(mesh):
    counts, errors = load(mesh.a.outbound, "checkout.shop", "/api/items?page=2", TOTAL)
    assert not errors, errors[:5]
    assert sum(counts.values()) == TOTAL
    assert set(counts) <= {(200, "v1"), (200, "v2")}, counts
    v2_share = counts[(200, "v2")] / TOTAL
    assert 0.07 <= v2_share <= 0.13, f"v2 got {v2_share:.3%} of {TOTAL}, want 10% +- 3%"


def test_prefix_matches_whole_segments_only(mesh):
    r = request(mesh.a.outbound, "GET", "/apix", host="checkout.shop")
    assert r.status == 404
    assert (r.header("tern-error") or "").startswith("no-route")


def test_header_filters_and_prefix_rewrite(mesh):
    r = request(mesh.a.outbound, "GET", "/legacy/items/7?q=1", host="checkout.shop",
                headers={"x-remove-me": "secret", "x-route": "client-value", "x-added": "client"})
    assert r.status == 200, r
    assert r.header("x-resp-filter") == "applied"
    echo = r.json()
    assert echo["service"] == "v1"
    # The filter acts on the upstream's own headers too: `set` replaces the upstream's
    # value (once), the others arrive as sent.
    assert [v for k, v in r.raw_headers if k.lower() == "x-demo-service"] == ["filtered"]
    assert r.header("content-type") == "application/json"
    assert echo["path"] == "/v2/items/7"
    assert echo["query"] == "q=1"
    h = echo["headers"]
    assert "x-remove-me" not in h
    assert h["x-route"] == "legacy"  # set replaces
    assert h["x-added"] in ("client, yes", "client,yes")  # add appends
    assert h["host"] == "rewritten.shop" or echo["authority"] == "rewritten.shop"

    r = request(mesh.a.outbound, "GET", "/legacy", host="checkout.shop")
    assert r.status == 200
    assert r.json()["path"] in ("/v2", "/v2/")


def test_full_path_rewrite(mesh):
    r = request(mesh.a.outbound, "GET", "/full?keep=yes", host="checkout.shop")
    assert r.status == 200
    echo = r.json()
    assert echo["path"] == "/replaced"
    assert echo["query"] == "keep=yes"
    assert r.header("x-resp-filter") is None
