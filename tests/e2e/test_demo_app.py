"""tern-demo-app on its own: the upstream every other test relies on."""

import signal

import httpx

from conftest import request


def test_echo_h1_and_h2(stack):
    d = stack.demo("solo")
    r = request(d.addr, "GET", "/x/y?z=1", host="solo", headers={"X-A": "1"})
    assert r.status == 200 and r.header("x-demo-service") == "solo"
    e = r.json()
    assert (e["service"], e["method"], e["path"], e["query"], e["version"]) == ("solo", "GET", "/x/y", "z=1", "HTTP/1.1")
    assert e["headers"]["x-a"] == "1"
    with httpx.Client(base_url=f"http://{d.addr}", http1=False, http2=True, timeout=10) as c:
        r = c.post("/echo", content=b"abc" * 10000, headers={"content-type": "text/x"})
        assert r.http_version == "HTTP/2" and r.content == b"abc" * 10000
        assert r.headers["content-type"] == "text/x"
        assert c.get("/v").json()["version"] == "HTTP/2.0"
        assert len(c.get("/bytes/1000000").content) == 1_000_000
        assert c.post("/sink", content=b"x" * 300_000).json()["received"] == 300_000


def test_status_sleep_control_and_sigterm(stack):
    d = stack.demo("ctl")
    assert request(d.addr, "GET", "/status/418").status == 418
    assert request(d.addr, "GET", "/sleep/50").status == 200
    r = request(d.addr, "POST", "/control?fail=1&latency_ms=0")
    assert r.status == 200 and r.json()["fail_rate"] == 1.0
    assert request(d.addr, "GET", "/anything").status == 500
    assert request(d.addr, "GET", "/control").json()["fail_rate"] == 1.0  # /control is exempt
    assert request(d.addr, "POST", "/control?fail=0").json()["fail_rate"] == 0.0
    assert request(d.addr, "GET", "/anything").status == 200
    assert request(d.addr, "POST", "/control?fail=7").status == 400
    d.proc.signal(signal.SIGTERM)
    assert d.proc.wait(timeout=10) == 0
