"""Large streamed bodies through the pair without buffering: the proxies' peak RSS stays
bounded while 200 MB go up and 200 MB come down."""

import hashlib
import http.client
import json

import httpx
import pytest

from conftest import service, split_addr, free_addr

MB = 1024 * 1024
SIZE = 200 * MB
RSS_LIMIT_KIB = 100 * 1024


@pytest.fixture
def pair(stack):
    app = stack.demo("bulk")
    b_in = free_addr()
    stack.write("bulk.yaml", service("bulk", endpoints=[b_in])
                + service("bulk-h2", endpoints=[b_in], app_protocol="kubernetes.io/h2c"))
    b = stack.proxy(app=app.addr, name="proxy-b", inbound=b_in)
    a = stack.proxy(name="proxy-a")
    return a, b


def chunks(total, size=256 * 1024):
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield block[:n]
        sent += n


def check_rss(*proxies):
    for p in proxies:
        hwm = p.proc.vm_hwm_kib()
        assert hwm < RSS_LIMIT_KIB, f"{p.proc.name} peak RSS {hwm} KiB >= {RSS_LIMIT_KIB} KiB"


def test_200mb_upload_and_download(pair):
    a, b = pair
    conn = http.client.HTTPConnection(*split_addr(a.outbound), timeout=120)
    try:
        # upload, fixed length
        conn.request("POST", "/sink", body=chunks(SIZE),
                     headers={"Host": "bulk", "Content-Length": str(SIZE)})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, body
        assert json.loads(body)["received"] == SIZE

        # download
        conn.request("GET", f"/bytes/{SIZE}", headers={"Host": "bulk"})
        r = conn.getresponse()
        assert r.status == 200
        got = 0
        while True:
            data = r.read(1024 * 1024)
            if not data:
                break
            got += len(data)
        assert got == SIZE

        # chunked upload echoed back while it is being sent, content verified
        n = 32 * MB
        conn.request("POST", "/echo", body=chunks(n), encode_chunked=True,
                     headers={"Host": "bulk", "Content-Type": "application/x-e2e"})
        r = conn.getresponse()
        assert r.status == 200
        assert r.getheader("content-type") == "application/x-e2e"
        h = hashlib.sha256()
        while True:
            data = r.read(1024 * 1024)
            if not data:
                break
            h.update(data)
        want = hashlib.sha256()
        for c in chunks(n):
            want.update(c)
        assert h.hexdigest() == want.hexdigest()
    finally:
        conn.close()
    a.proc.ensure_alive()
    b.proc.ensure_alive()
    check_rss(a, b)


def test_h2_streams_large_bodies(pair):
    """HTTP/2 end to end (client h2c, upstream h2c): flow control must move 64 MB each way."""
    a, b = pair
    n = 64 * MB
    with httpx.Client(base_url=f"http://{a.outbound}", http1=False, http2=True, timeout=120) as c:
        with c.stream("GET", f"/bytes/{n}", headers={"host": "bulk-h2"}) as r:
            assert r.status_code == 200
            assert sum(len(x) for x in r.iter_bytes()) == n
        r = c.post("/sink", content=chunks(n), headers={"host": "bulk-h2"})
        assert r.status_code == 200
        assert r.json()["received"] == n
    check_rss(a, b)
