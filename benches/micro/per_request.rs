//! The per-request work of the pipeline besides I/O: parsing an HTTP/1.1 head, hop-by-hop
//! stripping, request filters, metrics recording.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tern_proxy::metrics::{Direction, Metrics, RouteLabels};

fn per_request(c: &mut Criterion) {
    let head: &[u8] = b"GET /api/items?id=7 HTTP/1.1\r\nHost: checkout.shop:8080\r\nUser-Agent: wrk/4.2\r\nAccept: */*\r\nConnection: keep-alive\r\nX-Request-Id: 2f1c9a3e-4b7d-11ee-be56-0242ac120002\r\n\r\n";
    c.bench_function("HTTP/1.1 head parse: one 190-byte GET head", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(black_box(head));
            tern_proxy::h1::head::parse_request(&mut buf, 64 * 1024, 100)
                .ok()
                .flatten()
                .map(|p| p.parts.headers.len())
        })
    });

    let mut headers = http::HeaderMap::new();
    headers.insert("host", "checkout.shop:8080".parse().unwrap());
    headers.insert("user-agent", "wrk/4.2".parse().unwrap());
    headers.insert("accept", "*/*".parse().unwrap());
    headers.insert("connection", "keep-alive".parse().unwrap());
    c.bench_function("hop-by-hop strip (clone + strip)", |b| {
        b.iter(|| {
            let mut h = headers.clone();
            tern_proxy::headers::strip_hop_by_hop(&mut h, false);
            h.len()
        })
    });
    c.bench_function("hop-by-hop baseline (clone only)", |b| {
        b.iter(|| headers.clone().len())
    });

    let metrics = Metrics::new();
    let labels = RouteLabels {
        direction: Direction::Outbound,
        parent_name: Arc::from("shop/checkout:8080"),
        route_name: Arc::from("shop/checkout-split"),
        route_rule: 1,
        backend_name: Arc::from("shop/checkout-v1:8080"),
    };
    c.bench_function("metrics: record one request", |b| {
        b.iter(|| metrics.record_request(black_box(&labels), 200, Duration::from_micros(250)))
    });
}

criterion_group!(benches, per_request);
criterion_main!(benches);
