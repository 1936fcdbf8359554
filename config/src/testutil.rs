//! Shared helpers for unit tests.

use crate::{Compiled, check_sources, load_sources};

/// Services and EndpointSlices for checkout, checkout-v1 and checkout-v2 in `shop`.
pub const SHOP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: shop}
spec:
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: checkout-v1, namespace: shop}
spec:
  ports: [{name: http, port: 8080, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: checkout-v2, namespace: shop}
spec:
  ports: [{name: http, port: 8080, appProtocol: kubernetes.io/h2c}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: checkout-v1-abc
  namespace: shop
  labels: {kubernetes.io/service-name: checkout-v1, topology.kubernetes.io/region: eu}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  zone: eu-a
- addresses: [10.0.0.2]
  conditions: {ready: false}
ports: [{name: http, port: 9000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: checkout-v2-abc
  namespace: shop
  labels: {kubernetes.io/service-name: checkout-v2}
addressType: IPv4
endpoints: [{addresses: [10.0.1.1]}]
ports: [{port: 9001}]
"#;

pub const SPLIT: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: checkout-split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: checkout, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: checkout-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs:
    - {name: checkout-v1, port: 8080, weight: 90}
    - {name: checkout-v2, port: 8080, weight: 10}
    timeouts: {request: 10s, backendRequest: 2s}
"#;

fn sources(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

/// Every diagnostic of `routes.yaml` (with the shop services in `svc.yaml`), displayed.
pub fn diags(routes: &str) -> Vec<String> {
    check_sources(&sources(&[("svc.yaml", SHOP), ("routes.yaml", routes)]))
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Compiles `routes.yaml` with the shop services; panics on errors.
pub fn compile(routes: &str) -> Compiled {
    match load_sources(&sources(&[("svc.yaml", SHOP), ("routes.yaml", routes)])) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// A one-document HTTPRoute on checkout:8080 with the given `rules:` YAML (indented 2).
pub fn route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: checkout, port: 8080}}]\n  rules:\n{rules}"
    )
}

/// A one-document GRPCRoute on checkout:8080 with the given `rules:` YAML (indented 2);
/// rules start on line 7, as with [`route`].
pub fn grpc_route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: checkout, port: 8080}}]\n  rules:\n{rules}"
    )
}

/// A BackendPolicy `shop/{name}` with the given `spec:` YAML (indented 2, starting on
/// line 5). `meta` is added to the metadata mapping, e.g. `", creationTimestamp: ..."`.
pub fn policy(name: &str, meta: &str, spec: &str) -> String {
    policy_of("BackendPolicy", name, meta, spec)
}

/// Like [`policy`], for any policy kind (`RateLimitPolicy`, `ConcurrencyPolicy`).
pub fn policy_of(kind: &str, name: &str, meta: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.tern.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop{meta}}}\nspec:\n{spec}"
    )
}

/// A Service `shop/multi` with ports `http` (80) and `grpc` (90), as a document to append.
pub const MULTI: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: multi, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}, {name: grpc, port: 90, appProtocol: grpc}]\n";
