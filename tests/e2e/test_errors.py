"""Proxy errors are responses with a `tern-error` header naming the cause."""

import httpx
import pytest

from conftest import error_code, request


def check(resp, status, codes):
    assert resp.status == status, (resp.status, resp.headers, resp.body[:500])
    assert error_code(resp) in codes, f"tern-error {resp.header('tern-error')!r}, want one of {codes}"


def test_unknown_service_404(mesh):
    check(request(mesh.a.outbound, "GET", "/", host="no-such-service"), 404, ("unknown-service",))
    check(request(mesh.a.outbound, "GET", "/", host="web.no-such-namespace"), 404, ("unknown-service",))


def test_no_ready_endpoints_503(mesh):
    check(request(mesh.a.outbound, "GET", "/", host="empty"), 503, ("no-endpoints",))


def test_connect_failed_502(mesh):
    check(request(mesh.a.outbound, "GET", "/", host="dead"), 502, ("connect-failed",))


def test_backend_request_timeout_504(mesh):
    r = request(mesh.a.outbound, "GET", "/sleep/3000", host="slow", timeout=20)
    check(r, 504, ("backend-timeout", "request-timeout"))
    # a request within the timeout on the same route is fine
    r = request(mesh.a.outbound, "GET", "/sleep/10", host="slow")
    assert r.status == 200


def test_no_route_404(mesh):
    check(request(mesh.a.outbound, "GET", "/not-routed", host="checkout.shop"), 404, ("no-route",))


def test_missing_host_400(mesh):
    import socket
    from conftest import split_addr
    with socket.create_connection(split_addr(mesh.a.outbound), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"tern-error: bad-request" in data.lower(), data[:500]


def test_errors_over_h2(mesh):
    with httpx.Client(base_url=f"http://{mesh.a.outbound}", http1=False, http2=True, timeout=15) as c:
        r = c.get("/", headers={"host": "no-such-service"})
        assert r.status_code == 404
        assert r.headers["tern-error"].startswith("unknown-service")
        r = c.get("/", headers={"host": "empty"})
        assert r.status_code == 503
        assert r.headers["tern-error"].startswith("no-endpoints")
        # the connection still serves
        r = c.get("/", headers={"host": "web"})
        assert r.status_code == 200


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_app_errors_pass_through_without_tern_error(mesh, code):
    r = request(mesh.a.outbound, "GET", f"/status/{code}", host="web")
    assert r.status == code
    assert r.header("tern-error") is None
