"""Admin endpoints: /ready, /live, /config, /metrics."""

import json

from conftest import request


def test_ready_live_config(mesh):
    for p in (mesh.a, mesh.b):
        assert p.admin_get("/ready")[0] == 200
        assert p.admin_get("/live")[0] == 200
        status, body = p.admin_get("/config")
        assert status == 200
        cfg = json.loads(body)
        assert isinstance(cfg["version"], str) and cfg["version"]
    # same directory, same content: same version
    assert mesh.a.config_version() == mesh.b.config_version()


def test_metrics_after_traffic(mesh):
    before = mesh.a.metrics()
    n = 25
    for _ in range(n):
        assert request(mesh.a.outbound, "GET", "/metrics-test", host="web").status == 200
    for _ in range(3):
        assert request(mesh.a.outbound, "GET", "/status/503", host="web").status == 503
    assert request(mesh.a.outbound, "GET", "/", host="no-such-service").status == 404
    m = mesh.a.metrics()

    for fam in ("tern_requests_total", "tern_request_duration_seconds", "tern_open_connections",
                "tern_config_reloads_total", "tern_config_info"):
        assert m.has_family(fam), f"{fam} missing from /metrics:\n{m.text[:3000]}"

    def ok(mm):
        return mm.sum("tern_requests_total", direction="outbound", status_code="200")

    assert ok(m) - ok(before) >= n
    samples = m.get("tern_requests_total", direction="outbound", status_code="200")
    labels = samples[0][0]
    for k in ("direction", "parent_name", "route_name", "route_rule", "backend_name", "status_code"):
        assert k in labels, f"label {k} missing: {labels}"
    web = [l for l, v in samples if "web" in l["parent_name"]]
    assert web, samples
    assert any("web" in l["backend_name"] for l in web)
    assert m.sum("tern_requests_total", direction="outbound", status_code="503") >= 3
    assert m.sum("tern_requests_total", direction="outbound", status_code="404") >= 1

    # the inbound side of proxy B counted them too
    assert mesh.b.metrics().sum("tern_requests_total", direction="inbound", status_code="200") >= n

    # histogram: buckets, sum, count consistent with the counter
    count = m.sum("tern_request_duration_seconds_count", direction="outbound")
    assert count >= n + 4
    assert m.sum("tern_request_duration_seconds_sum", direction="outbound") > 0
    inf = [v for l, v in m.get("tern_request_duration_seconds_bucket", direction="outbound") if l.get("le") == "+Inf"]
    assert inf and sum(inf) == count

    opens = m.get("tern_open_connections")
    assert {l.get("direction") for l, _ in opens} >= {"outbound"}
    assert all(v >= 0 for _, v in opens)

    info = m.get("tern_config_info")
    assert any(l.get("version") == mesh.a.config_version() and v == 1 for l, v in info), info
    for l, v in m.get("tern_config_reloads_total"):
        assert l.get("result") in ("applied", "refused"), l


def test_flags_from_environment(stack):
    """Every flag can come from the environment (TERN_*)."""
    from conftest import Proc, binary, free_addr, http_get, request, service, wait_until

    app = stack.demo("envapp")
    stack.write("env.yaml", service("envsvc", endpoints=[app.addr]))
    outbound, inbound, admin = free_addr(), free_addr(), free_addr()
    p = Proc("proxy-env", [binary("tern-proxy")], stack.log_dir, env={
        "TERN_CONFIG_DIR": str(stack.config_dir),
        "TERN_OUTBOUND": outbound,
        "TERN_INBOUND": inbound,
        "TERN_APP": app.addr,
        "TERN_ADMIN": admin,
        "TERN_NAMESPACE": "default",
        "TERN_WORKERS": "1",
        "TERN_DRAIN_TIMEOUT": "5s",
    })
    try:
        wait_until(lambda: p.ensure_alive() or http_get(admin, "/ready")[0] == 200, 30, "env-configured proxy ready")
        assert request(outbound, "GET", "/o", host="envsvc").json()["service"] == "envapp"
        assert request(inbound, "GET", "/i", host="anything").json()["service"] == "envapp"
    finally:
        p.stop()
    assert p.returncode() == 0
