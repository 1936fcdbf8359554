"""HTTP/1.1 and HTTP/2 (prior knowledge) through outbound -> inbound -> tern-demo-app."""

import http.client

import httpx
import pytest

from conftest import request, split_addr


def h2_client(addr: str) -> httpx.Client:
    # http1=False + http2=True on http:// = HTTP/2 with prior knowledge (h2c).
    return httpx.Client(base_url=f"http://{addr}", http1=False, http2=True, timeout=15)


@pytest.mark.parametrize("svc,upstream_version", [("web", "HTTP/1.1"), ("web-h2", "HTTP/2.0")])
def test_http1_client(mesh, svc, upstream_version):
    r = request(mesh.a.outbound, "GET", "/hello/world?x=1&y=two", host=svc,
                headers={"X-Custom": "abc", "User-Agent": "e2e"})
    assert r.status == 200, r
    assert r.header("x-demo-service") == "app"
    echo = r.json()
    assert echo["service"] == "app"
    assert echo["method"] == "GET"
    assert echo["path"] == "/hello/world"
    assert echo["query"] == "x=1&y=two"
    assert echo["version"] == upstream_version
    assert echo["headers"]["x-custom"] == "abc"
    assert echo["headers"]["user-agent"] == "e2e"


@pytest.mark.parametrize("svc,upstream_version", [("web", "HTTP/1.1"), ("web-h2", "HTTP/2.0")])
def test_http2_prior_knowledge_client(mesh, svc, upstream_version):
    with h2_client(mesh.a.outbound) as c:
        for i in range(5):  # several streams on one connection
            r = c.get(f"/h2/{i}", params={"n": str(i)}, headers={"host": svc, "x-custom": f"v{i}"})
            assert r.http_version == "HTTP/2"
            assert r.status_code == 200, r.text
            assert r.headers["x-demo-service"] == "app"
            echo = r.json()
            assert echo["path"] == f"/h2/{i}"
            assert echo["query"] == f"n={i}"
            assert echo["version"] == upstream_version
            assert echo["headers"]["x-custom"] == f"v{i}"
        r = c.post("/echo", content=b"h2 body " * 1000, headers={"host": svc, "content-type": "text/x-e2e"})
        assert r.status_code == 200
        assert r.content == b"h2 body " * 1000
        assert r.headers["content-type"] == "text/x-e2e"


def test_http2_client_direct_to_inbound(mesh):
    """The inbound listener accepts h2 prior knowledge and keeps the protocol to the app."""
    with h2_client(mesh.b.inbound) as c:
        r = c.get("/in", headers={"host": "web"})
        assert r.status_code == 200
        assert r.json()["version"] == "HTTP/2.0"
    r = request(mesh.b.inbound, "GET", "/in", host="web")
    assert r.status == 200 and r.json()["version"] == "HTTP/1.1"


def test_hop_by_hop_headers_not_forwarded(mesh):
    conn = http.client.HTTPConnection(*split_addr(mesh.a.outbound), timeout=15)
    try:
        conn.putrequest("GET", "/hop", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "web")
        conn.putheader("Connection", "keep-alive, X-Hop-Secret, x-other-hop")
        conn.putheader("X-Hop-Secret", "must-not-pass")
        conn.putheader("X-Other-Hop", "must-not-pass")
        conn.putheader("Keep-Alive", "timeout=30")
        conn.putheader("Proxy-Connection", "keep-alive")
        conn.putheader("X-End-To-End", "kept")
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, body
        headers = __import__("json").loads(body)["headers"]
        for h in ("x-hop-secret", "x-other-hop", "keep-alive", "proxy-connection"):
            assert h not in headers, f"hop-by-hop header {h} was forwarded: {headers}"
        assert "x-hop-secret" not in headers.get("connection", "").lower()
        assert headers["x-end-to-end"] == "kept"
        # the connection is still usable (keep-alive)
        conn.request("GET", "/again", headers={"Host": "web"})
        r = conn.getresponse()
        assert r.status == 200
        r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("host", ["checkout", "checkout.shop", "checkout.shop.svc.cluster.local",
                                  "checkout.shop.svc.cluster.local:80", "checkout:80", "CHECKOUT.Shop"])
def test_authority_forms(mesh, host):
    r = request(mesh.a.outbound, "GET", "/full", host=host)
    assert r.status == 200, (r.status, r.headers, r.body)
    assert r.json()["service"] == "v1"


def test_absolute_form_request_target(mesh):
    conn = http.client.HTTPConnection(*split_addr(mesh.a.outbound), timeout=15)
    try:
        conn.putrequest("GET", "http://web.default.svc.cluster.local/abs/path?q=1", skip_host=True)
        conn.putheader("Host", "web.default.svc.cluster.local")
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, body
        echo = __import__("json").loads(body)
        assert echo["service"] == "app"
        assert echo["path"] == "/abs/path"
        assert echo["query"] == "q=1"
    finally:
        conn.close()


def test_large_response_headers_and_status_codes(mesh):
    for code in (201, 204, 301, 404, 418, 500, 503):
        r = request(mesh.a.outbound, "GET", f"/status/{code}", host="web")
        assert r.status == code
        assert r.header("tern-error") is None, "an app's own error is not a proxy error"
