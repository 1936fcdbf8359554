"""gRPC unary and server streaming through outbound -> inbound -> a Python gRPC server,
with trailers (status, details, trailing metadata) arriving intact.

Uses generic handlers with bytes in and out: no code generation, no protobuf."""

from concurrent import futures

import grpc
import pytest

from conftest import free_addr, service, split_addr

SVC = "tern.e2e.Echo"
DETAILS = "precondition failed: ünïcödé details, with: punctuation; and more"


def unary(request: bytes, context):
    if request.startswith(b"fail"):
        context.set_trailing_metadata((("x-fail-reason", "asked"), ("x-bin-bin", b"\x00\x01\xff")))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, DETAILS)
    context.set_trailing_metadata((("x-trailer", "unary-done"),))
    md = dict(context.invocation_metadata())
    return b"echo:" + request + b"|authority=" + md.get(":authority", "").encode()


def stream(request: bytes, context):
    n = int(request.decode())
    for i in range(n):
        yield f"msg-{i}".encode() * 100
    if n == 7:  # stream ends with an error after data
        context.set_trailing_metadata((("x-after-stream", "boom"),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "stopped after 7")
    context.set_trailing_metadata((("x-trailer", "stream-done"), ("x-count", str(n))))


@pytest.fixture(scope="module")
def grpc_mesh(module_stack):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(SVC, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    })
    server.add_generic_rpc_handlers((handler,))
    app = free_addr()
    server.add_insecure_port(app)
    server.start()
    b_in = free_addr()
    module_stack.write("grpc.yaml", service("greeter", port=50051, endpoints=[b_in], app_protocol="grpc")
                       + service("greeter-h2c", port=50052, endpoints=[b_in], app_protocol="kubernetes.io/h2c")
                       + service("grpc-front", port=50051, endpoints=[b_in], app_protocol="grpc")
                       + [{
                           "apiVersion": "gateway.networking.k8s.io/v1",
                           "kind": "GRPCRoute",
                           "metadata": {"name": "grpc-front", "namespace": "default"},
                           "spec": {
                               "parentRefs": [{"group": "", "kind": "Service", "name": "grpc-front", "port": 50051}],
                               "rules": [{
                                   "matches": [{"method": {"type": "Exact", "service": SVC}}],
                                   "backendRefs": [{"name": "greeter", "port": 50051}],
                               }],
                           },
                       }])
    b = module_stack.proxy(app=app, name="proxy-b", inbound=b_in)
    a = module_stack.proxy(name="proxy-a")
    yield a
    server.stop(grace=None)


def channel(a, authority):
    return grpc.insecure_channel(a.outbound, options=[("grpc.default_authority", authority)])


AUTHORITIES = ["greeter:50051", "greeter", "greeter-h2c:50052", "grpc-front:50051"]


@pytest.mark.parametrize("authority", AUTHORITIES)
def test_unary_ok_with_trailers(grpc_mesh, authority):
    with channel(grpc_mesh, authority) as ch:
        call = ch.unary_unary(f"/{SVC}/Unary")
        for i in range(20):
            resp, c = call.with_call(f"hello-{i}".encode(), timeout=15, metadata=(("x-req", "1"),))
            assert resp.startswith(f"echo:hello-{i}|".encode())
            assert c.code() == grpc.StatusCode.OK
            assert ("x-trailer", "unary-done") in c.trailing_metadata()


@pytest.mark.parametrize("authority", AUTHORITIES[:1] + AUTHORITIES[2:])
def test_unary_error_status_and_details_intact(grpc_mesh, authority):
    with channel(grpc_mesh, authority) as ch:
        call = ch.unary_unary(f"/{SVC}/Unary")
        with pytest.raises(grpc.RpcError) as ei:
            call(b"fail please", timeout=15)
        e = ei.value
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
        assert e.details() == DETAILS
        md = dict(e.trailing_metadata())
        assert md.get("x-fail-reason") == "asked"
        assert md.get("x-bin-bin") == b"\x00\x01\xff"


@pytest.mark.parametrize("authority", AUTHORITIES[:1] + AUTHORITIES[2:])
def test_server_streaming(grpc_mesh, authority):
    with channel(grpc_mesh, authority) as ch:
        call = ch.unary_stream(f"/{SVC}/Stream")
        it = call(b"50", timeout=30)
        msgs = list(it)
        assert msgs == [f"msg-{i}".encode() * 100 for i in range(50)]
        assert it.code() == grpc.StatusCode.OK
        md = dict(it.trailing_metadata())
        assert md.get("x-trailer") == "stream-done"
        assert md.get("x-count") == "50"

        it = call(b"7", timeout=30)
        got = []
        with pytest.raises(grpc.RpcError) as ei:
            for m in it:
                got.append(m)
        assert len(got) == 7
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ei.value.details() == "stopped after 7"
        assert dict(ei.value.trailing_metadata()).get("x-after-stream") == "boom"


def test_grpc_unknown_service_is_an_error_not_a_hang(grpc_mesh):
    with channel(grpc_mesh, "no-such-grpc-service:50051") as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(f"/{SVC}/Unary")(b"x", timeout=15)
        assert ei.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED
