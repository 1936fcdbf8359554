//! Generated configs for the microbenchmarks (shared by the bench targets).
#![allow(dead_code)] // each bench target uses part of these generators

use std::fmt::Write;

/// `n` Services in namespace `bench`, each with 3 endpoints and an HTTPRoute of two
/// rules (a header-matched canary and a default split).
pub fn services(n: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        let (a, b, j) = (i / 250, i % 250, (i + 1) % n);
        let _ = write!(
            y,
            r#"apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: bench}}
spec: {{ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}
addressType: IPv4
endpoints:
- {{addresses: ["10.0.{a}.{b}"], zone: z1}}
- {{addresses: ["10.1.{a}.{b}"], zone: z2}}
- {{addresses: ["10.2.{a}.{b}"], zone: z3}}
ports: [{{name: http, port: 8080}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  parentRefs: [{{group: "", kind: Service, name: svc-{i}, port: 80}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: x-canary, value: "1"}}]}}]
    backendRefs: [{{name: svc-{i}, port: 80}}]
  - backendRefs: [{{name: svc-{i}, port: 80, weight: 90}}, {{name: svc-{j}, port: 80, weight: 10}}]
    timeouts: {{request: 10s, backendRequest: 2s}}
---
"#
        );
    }
    y
}

/// One Service whose HTTPRoute has `n` rules with distinct path prefixes.
pub fn one_service_many_rules(n: usize) -> String {
    let mut y = String::from(
        r#"apiVersion: v1
kind: Service
metadata: {name: big, namespace: bench}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: big-1, namespace: bench, labels: {kubernetes.io/service-name: big}}
addressType: IPv4
endpoints: [{addresses: ["10.0.0.1"]}]
ports: [{name: http, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: big, namespace: bench}
spec:
  parentRefs: [{group: "", kind: Service, name: big, port: 80}]
  rules:
"#,
    );
    for i in 0..n {
        let _ = writeln!(
            y,
            "  - matches: [{{path: {{type: PathPrefix, value: /p{i}}}}}]\n    backendRefs: [{{name: big, port: 80}}]"
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
