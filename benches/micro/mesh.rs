//! Generated configs for the microbenchmarks (shared by the bench targets).
#![allow(dead_code)] // each bench target uses part of these generators

use std::fmt::Write;

/// `n` Services in namespace `bench`, each with 3 endpoints and an HTTPRoute of two
/// rules (a header-matched canary and a default split).
pub fn services(n: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
spec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
addressType: IPv4\nendpoints:\n\
- {{addresses: [\"10.0.{a}.{b}\"], zone: z1}}\n- {{addresses: [\"10.1.{a}.{b}\"], zone: z2}}\n- {{addresses: [\"10.2.{a}.{b}\"], zone: z3}}\n\
ports: [{{name: http, port: 8080}}]\n---\n\
apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
spec:\n  parentRefs: [{{group: \"\", kind: Service, name: svc-{i}, port: 80}}]\n  rules:\n\
  - matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: x-canary, value: \"1\"}}]}}]\n\
    backendRefs: [{{name: svc-{i}, port: 80}}]\n\
  - backendRefs: [{{name: svc-{i}, port: 80, weight: 90}}, {{name: svc-{j}, port: 80, weight: 10}}]\n\
    timeouts: {{request: 10s, backendRequest: 2s}}\n---\n",
            a = i / 250,
            b = i % 250,
            j = (i + 1) % n,
        );
    }
    y
}

/// One Service whose HTTPRoute has `n` rules with distinct path prefixes.
pub fn one_service_many_rules(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: bench}\n\
spec: {ports: [{name: http, port: 80}]}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {name: big-1, namespace: bench, labels: {kubernetes.io/service-name: big}}\n\
addressType: IPv4\nendpoints: [{addresses: [\"10.0.0.1\"]}]\nports: [{name: http, port: 8080}]\n---\n\
apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: big, namespace: bench}\n\
spec:\n  parentRefs: [{group: \"\", kind: Service, name: big, port: 80}]\n  rules:\n",
    );
    for i in 0..n {
        let _ = write!(
            y,
            "  - matches: [{{path: {{type: PathPrefix, value: /p{i}}}}}]\n    backendRefs: [{{name: big, port: 80}}]\n"
        );
    }
    y
}

pub fn compile(yaml: String) -> tern_config::Snapshot {
    match tern_config::load_sources(&[("bench.yaml".to_string(), yaml)]) {
        Ok(c) => c.snapshot,
        Err(e) => panic!("benchmark config is invalid: {e}"),
    }
}
