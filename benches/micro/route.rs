//! Route lookup: authority -> Service port -> rule, as the proxy does per request.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tern_proxy::policy::breaker::Clock;
use tern_proxy::state::Active;

mod mesh;

fn activate(snapshot: tern_config::Snapshot) -> Active {
    let metrics = tern_proxy::metrics::Metrics::new();
    Active::new(snapshot, None, &metrics, Clock::new(), &Default::default())
}

fn route(c: &mut Criterion) {
    let active = activate(mesh::compile(mesh::services(1000)));
    let req = http::Request::builder()
        .uri("/api/items?id=7")
        .header("host", "svc-517.bench:80")
        .header("user-agent", "bench")
        .body(())
        .unwrap();
    c.bench_function("route: 1,000 services, second rule", |b| {
        b.iter(|| {
            let r = tern_proxy::route::route(&active, black_box(&req), "default", None).unwrap();
            tern_proxy::route::pick_backend(r.matched.rule).map(|b| b.index)
        })
    });

    let active = activate(mesh::compile(mesh::one_service_many_rules(1000)));
    let worst = http::Request::builder()
        .uri("/p999/x")
        .header("host", "big.bench")
        .body(())
        .unwrap();
    c.bench_function(
        "route: one service, 1,000 rules, last rule (worst case)",
        |b| {
            b.iter(|| {
                tern_proxy::route::route(&active, black_box(&worst), "default", None)
                    .unwrap()
                    .matched
                    .rule
                    .rule_index
            })
        },
    );
}

criterion_group!(benches, route);
criterion_main!(benches);
