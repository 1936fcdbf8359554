"""Hot reload under load: 50 valid config changes while 20,000 requests run over keep-alive
connections (no failure, no dropped connection), then an invalid change is refused and the
last good config keeps serving."""

import http.client
import threading
import time

import pytest
import yaml

from conftest import checkout_docs, split_addr, wait_until

REQUESTS = 20_000
THREADS = 8
CHANGES = 50


@pytest.fixture
def shop(stack):
    v1 = stack.demo("v1")
    v2 = stack.demo("v2")
    stack.write("checkout.yaml", checkout_docs(v1.addr, v2.addr, legacy_value="gen-0"))
    a = stack.proxy(name="proxy-a")
    return a, v1, v2


def refused(a) -> float:
    return a.metrics().sum("tern_config_reloads_total", result="refused")


def test_reload_under_load(stack, shop):
    a, v1, v2 = shop
    stats = {"ok": 0, "bad": [], "errors": [], "reconnects": 0, "gens": set()}
    lock = threading.Lock()
    done_loading = threading.Event()

    def client(n):
        conn = http.client.HTTPConnection(*split_addr(a.outbound), timeout=30)
        conn.connect()
        sock = conn.sock
        ok = 0
        try:
            for i in range(n):
                path = "/legacy/x" if i % 2 else "/api/x"
                conn.request("GET", path, headers={"Host": "checkout.shop"})
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    with lock:
                        stats["bad"].append((r.status, r.getheader("tern-error"), body[:200]))
                    continue
                if r.getheader("connection", "").lower() == "close" or conn.sock is not sock:
                    with lock:
                        stats["reconnects"] += 1
                    sock = conn.sock
                if path.startswith("/legacy"):
                    gen = yaml.safe_load(body)["headers"].get("x-route")
                    with lock:
                        stats["gens"].add(gen)
                ok += 1
        except Exception as e:  # noqa: BLE001 - a reset or closed connection is a failure
            with lock:
                stats["errors"].append(repr(e))
        finally:
            conn.close()
            with lock:
                stats["ok"] += ok

    threads = [threading.Thread(target=client, args=(REQUESTS // THREADS,)) for _ in range(THREADS)]
    for t in threads:
        t.start()

    versions = [a.config_version()]
    for gen in range(1, CHANGES + 1):
        weights = (90, 10) if gen % 2 else (50, 50)
        stack.write("checkout.yaml", checkout_docs(v1.addr, v2.addr, weights=weights, legacy_value=f"gen-{gen}"))
        prev = versions[-1]
        versions.append(wait_until(lambda: (v := a.config_version()) != prev and v, 20,
                                   f"config change {gen} to be applied"))
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "clients did not finish"

    assert not stats["errors"], stats["errors"][:5]
    assert not stats["bad"], stats["bad"][:5]
    assert stats["reconnects"] == 0
    assert stats["ok"] == REQUESTS
    assert len(set(versions)) == CHANGES + 1, "every valid change gives a new version"
    assert len(stats["gens"]) > 1, f"the load never saw a reload: {stats['gens']}"
    m = a.metrics()
    assert m.sum("tern_config_reloads_total", result="applied") >= CHANGES
    assert any(l.get("version") == versions[-1] and v == 1 for l, v in m.get("tern_config_info"))

    # an invalid change (a weight of the wrong type) is refused; the last good config serves
    good = versions[-1]
    refused_before = refused(a)
    bad = checkout_docs(v1.addr, v2.addr, legacy_value="bad-gen")
    bad[-1]["spec"]["rules"][1]["backendRefs"][0]["weight"] = "ninety"
    stack.write("checkout.yaml", bad)
    wait_until(lambda: refused(a) > refused_before, 20, "the invalid config to be refused")
    assert a.config_version() == good
    a.proc.ensure_alive()
    conn = http.client.HTTPConnection(*split_addr(a.outbound), timeout=15)
    for _ in range(20):
        conn.request("GET", "/legacy/y", headers={"Host": "checkout.shop"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200
        assert yaml.safe_load(body)["headers"]["x-route"] == f"gen-{CHANGES}"
    conn.close()
    assert a.admin_get("/ready")[0] == 200

    # and a good change after the bad one applies again
    stack.write("checkout.yaml", checkout_docs(v1.addr, v2.addr, legacy_value="final"))
    wait_until(lambda: a.config_version() != good, 20, "the fixed config to be applied")


def test_reload_of_unrelated_file_keeps_connections(stack, shop):
    """Adding a file with a new Service makes it routable without restarting anything."""
    a, v1, _ = shop
    from conftest import request, service
    assert request(a.outbound, "GET", "/", host="late").status == 404
    stack.write("late.yaml", service("late", endpoints=[v1.addr]))
    wait_until(lambda: request(a.outbound, "GET", "/", host="late").status == 200, 20,
               "service late to become routable")
    (stack.config_dir / "late.yaml").unlink()
    wait_until(lambda: request(a.outbound, "GET", "/", host="late").status == 404, 20,
               "service late to disappear after its file is removed")



def test_a_keep_alive_connection_counts_under_the_new_route_after_a_reload(stack, shop):
    """An HTTP/1.1 connection keeps its last route's metric handles between requests:
    after a reload renames the route, its next request counts under the new name."""
    from conftest import NS, backend, http_route, request, service
    a, v1, _ = shop

    def docs(route):
        return service("kept", endpoints=[v1.addr]) + [
            http_route(route, "kept", rules=[{"backendRefs": [backend("kept")]}])]

    def count(route):
        return a.metrics().sum("tern_requests_total", route_name=f"{NS}/{route}")

    stack.write("kept.yaml", docs("first"))
    wait_until(lambda: request(a.outbound, "GET", "/", host="kept").status == 200, 20,
               "service kept to become routable")
    conn = http.client.HTTPConnection(*split_addr(a.outbound), timeout=15)

    def five():
        for _ in range(5):
            conn.request("GET", "/", headers={"Host": "kept"})
            r = conn.getresponse()
            r.read()
            assert r.status == 200

    five()
    sock = conn.sock
    first = count("first")
    before = a.config_version()
    stack.write("kept.yaml", docs("second"))
    wait_until(lambda: a.config_version() != before, 20, "the renamed route to be applied")
    five()
    assert conn.sock is sock, "the connection was kept"
    conn.close()
    assert count("second") == 5
    assert count("first") == first
