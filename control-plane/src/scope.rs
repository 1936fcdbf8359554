//! Which documents a sidecar gets: the Services it calls and its own inbound policy.
//!
//! A scoped set must validate on its own when the whole set does, so it carries along
//! everything its routes name: the Services (and EndpointSlices) of every backendRef and
//! the Services of every parentRef. Policies that target Services or routes outside the
//! set would only be warnings, but they are left out.
//!
//! Inbound (the sidecar's own Service): the Service with its EndpointSlices (so that a
//! connection to a pod address resolves to its Service port), the routes attached to it,
//! and the RateLimitPolicies and AuthorizationPolicies targeting either. Outbound (the
//! Services it calls): every policy kind but AuthorizationPolicy, which only the called
//! side enforces (leaving it out spares every caller a push when it changes).

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};
use tern_api::v1::{ConfigPush, Document};
use tern_config::model::{Kind, PolicyTargetRef, Resource};

use crate::index::Snapshot;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What a sidecar asked for in its Hello. Sidecars with equal scopes share one
/// computation and one push.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Scope {
    /// Services it calls, "namespace/name", sorted and deduplicated; empty: every one.
    pub calls: BTreeSet<String>,
    /// Its own Service, "namespace/name".
    pub service: Option<String>,
}

impl Scope {
    pub fn new<I: IntoIterator<Item = String>>(calls: I, service: &str) -> Scope {
        Scope {
            calls: calls
                .into_iter()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            service: Some(service.trim())
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        }
    }
}

/// Lookups over a snapshot that scoping needs, built once per snapshot.
#[derive(Debug, Default)]
pub struct Lookup {
    /// "ns/name" of each Service -> its document.
    services: BTreeMap<String, String>,
    /// "ns/name" of a Service -> its EndpointSlices' documents.
    slices: BTreeMap<String, Vec<String>>,
    /// "ns/name" of a parent Service -> documents of routes attached to it.
    routes_by_parent: BTreeMap<String, Vec<String>>,
    /// (kind, "ns/name") of a target -> policy documents (kind of policy, document).
    policies_by_target: BTreeMap<(Kind, String), Vec<(Kind, String)>>,
}

impl Lookup {
    pub fn build(snapshot: &Snapshot) -> Lookup {
        let mut l = Lookup::default();
        for (name, doc) in &snapshot.docs {
            let meta = doc.object.resource.meta();
            let ns = &meta.namespace;
            let mut targets = |kind: Kind, refs: &[PolicyTargetRef]| {
                for t in refs {
                    if let Some(tk) = t.target_kind() {
                        l.policies_by_target
                            .entry((tk, format!("{ns}/{}", t.name)))
                            .or_default()
                            .push((kind, name.clone()));
                    }
                }
            };
            match &doc.object.resource {
                Resource::Service(_) => {
                    l.services
                        .insert(format!("{ns}/{}", meta.name), name.clone());
                }
                Resource::EndpointSlice(_) => {
                    if let Some(svc) = meta.labels.get(SERVICE_NAME_LABEL) {
                        l.slices
                            .entry(format!("{ns}/{svc}"))
                            .or_default()
                            .push(name.clone());
                    }
                }
                Resource::HTTPRoute(r) => {
                    for p in r.parent_refs.iter().filter(|p| p.is_service()) {
                        l.routes_by_parent
                            .entry(format!("{}/{}", p.namespace, p.name))
                            .or_default()
                            .push(name.clone());
                    }
                }
                Resource::GRPCRoute(r) => {
                    for p in r.parent_refs.iter().filter(|p| p.is_service()) {
                        l.routes_by_parent
                            .entry(format!("{}/{}", p.namespace, p.name))
                            .or_default()
                            .push(name.clone());
                    }
                }
                Resource::BackendPolicy(p) => targets(Kind::BackendPolicy, &p.target_refs),
                Resource::RateLimitPolicy(p) => targets(Kind::RateLimitPolicy, &p.target_refs),
                Resource::ConcurrencyPolicy(p) => targets(Kind::ConcurrencyPolicy, &p.target_refs),
                Resource::AuthorizationPolicy(p) => {
                    targets(Kind::AuthorizationPolicy, &p.target_refs)
                }
            }
        }
        l
    }
}

/// The documents of `snapshot` that a sidecar with `scope` needs, as a push.
pub fn scoped_push(snapshot: &Snapshot, lookup: &Lookup, scope: &Scope) -> ConfigPush {
    let names: BTreeSet<String> = if scope.calls.is_empty() {
        snapshot.docs.keys().cloned().collect()
    } else {
        scoped_names(snapshot, lookup, scope)
    };
    let documents: Vec<Document> = names
        .iter()
        .filter_map(|n| snapshot.docs.get(n))
        .map(|d| Document {
            name: d.name.clone(),
            yaml: d.yaml.clone(),
        })
        .collect();
    ConfigPush {
        version: version_of(&documents),
        documents,
        trust: None,
    }
}

/// Content version of a set of documents: the first 16 hex chars of the SHA-256 of their
/// sorted names and texts.
pub fn version_of(documents: &[Document]) -> String {
    let mut sorted: Vec<&Document> = documents.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for d in sorted {
        h.update((d.name.len() as u64).to_le_bytes());
        h.update(d.name.as_bytes());
        h.update((d.yaml.len() as u64).to_le_bytes());
        h.update(d.yaml.as_bytes());
    }
    tern_config::hex(&h.finalize()[..8])
}

type Targets = BTreeSet<(Kind, String)>;

fn add_service(
    l: &Lookup,
    out: &mut BTreeSet<String>,
    targets: &mut Targets,
    svc: &str,
    slices: bool,
) {
    if let Some(doc) = l.services.get(svc) {
        out.insert(doc.clone());
        targets.insert((Kind::Service, svc.to_string()));
    }
    if slices {
        out.extend(l.slices.get(svc).into_iter().flatten().cloned());
    }
}

fn service_refs<'a>(
    parents: impl Iterator<Item = &'a tern_config::model::ParentRef>,
    backends: impl Iterator<Item = &'a tern_config::model::BackendRef>,
) -> (Vec<String>, Vec<String>) {
    (
        parents
            .filter(|p| p.is_service())
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect(),
        backends
            .filter(|b| b.group.is_empty() && b.kind == "Service")
            .map(|b| format!("{}/{}", b.namespace, b.name))
            .collect(),
    )
}

/// Routes attached to `svc`, with the Services of their parentRefs and the Services and
/// EndpointSlices of their backendRefs.
fn add_routes(
    snapshot: &Snapshot,
    l: &Lookup,
    out: &mut BTreeSet<String>,
    targets: &mut Targets,
    svc: &str,
) {
    for route in l.routes_by_parent.get(svc).into_iter().flatten() {
        let Some(doc) = snapshot.docs.get(route) else {
            continue;
        };
        out.insert(route.clone());
        let meta = doc.object.resource.meta();
        let id = format!("{}/{}", meta.namespace, meta.name);
        let (parents, backends) = match &doc.object.resource {
            Resource::HTTPRoute(r) => {
                targets.insert((Kind::HTTPRoute, id));
                service_refs(
                    r.parent_refs.iter(),
                    r.rules.iter().flat_map(|r| &r.backend_refs),
                )
            }
            Resource::GRPCRoute(r) => {
                targets.insert((Kind::GRPCRoute, id));
                service_refs(
                    r.parent_refs.iter(),
                    r.rules.iter().flat_map(|r| &r.backend_refs),
                )
            }
            _ => continue,
        };
        for p in parents {
            add_service(l, out, targets, &p, false);
        }
        for b in backends {
            add_service(l, out, targets, &b, true);
        }
    }
}

fn scoped_names(snapshot: &Snapshot, l: &Lookup, scope: &Scope) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // (kind, "ns/name") of the Services and routes included for calls, for policies.
    let mut targets = Targets::new();
    for svc in &scope.calls {
        add_service(l, &mut out, &mut targets, svc, true);
        add_routes(snapshot, l, &mut out, &mut targets, svc);
    }
    for target in &targets {
        out.extend(
            l.policies_by_target
                .get(target)
                .into_iter()
                .flatten()
                .filter(|(kind, _)| *kind != Kind::AuthorizationPolicy)
                .map(|(_, d)| d.clone()),
        );
    }
    if let Some(own) = &scope.service {
        // Inbound: the Service and its slices, its routes, and rate limits and
        // authorization on either.
        let mut inbound = Targets::new();
        add_service(l, &mut out, &mut inbound, own, true);
        let mut route_targets = Targets::new();
        add_routes(snapshot, l, &mut out, &mut route_targets, own);
        inbound.extend(
            route_targets
                .into_iter()
                .filter(|(k, _)| matches!(k, Kind::HTTPRoute | Kind::GRPCRoute)),
        );
        for target in &inbound {
            for (kind, doc) in l.policies_by_target.get(target).into_iter().flatten() {
                if matches!(kind, Kind::RateLimitPolicy | Kind::AuthorizationPolicy) {
                    out.insert(doc.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;

    pub const MESH: &str = include_str!("../tests/data/mesh.yaml");

    pub fn index_of(text: &str) -> Index {
        let mut index = Index::new();
        for (n, doc) in tern_config::split_documents(text) {
            index.apply(&format!("mesh.yaml#{n}"), doc).unwrap();
        }
        index.publish().unwrap();
        index
    }

    fn validates(push: &ConfigPush) {
        if let Err(e) = tern_config::load_sources(&push.sources()) {
            panic!("scoped set does not validate: {e}");
        }
    }

    fn kinds(snapshot: &Snapshot, push: &ConfigPush) -> Vec<String> {
        push.documents
            .iter()
            .map(|d| snapshot.docs[&d.name].key().to_string())
            .collect()
    }

    #[test]
    fn scoped_sets_validate_and_hold_what_the_sidecar_needs() {
        let index = index_of(MESH);
        let snap = index.current();
        let lookup = Lookup::build(&snap);

        let all = scoped_push(&snap, &lookup, &Scope::default());
        assert_eq!(all.documents.len(), snap.docs.len());
        validates(&all);

        let web = Scope::new(["shop/checkout".to_string()], "shop/web");
        let push = scoped_push(&snap, &lookup, &web);
        validates(&push);
        let k = kinds(&snap, &push);
        for want in [
            "Service shop/checkout",
            "Service shop/checkout-v1",
            "Service shop/checkout-v2",
            "EndpointSlice shop/checkout-v1",
            "EndpointSlice shop/checkout-v2",
            "HTTPRoute shop/checkout",
            "BackendPolicy shop/checkout",
            "Service shop/web",
            "RateLimitPolicy shop/web",
        ] {
            assert!(k.contains(&want.to_string()), "{want} missing from {k:?}");
        }
        for unwanted in ["Service shop/catalog", "EndpointSlice shop/catalog"] {
            assert!(!k.contains(&unwanted.to_string()), "{unwanted} in {k:?}");
        }

        let catalog = Scope::new(["shop/catalog".to_string()], "");
        let push = scoped_push(&snap, &lookup, &catalog);
        validates(&push);
        assert_eq!(
            kinds(&snap, &push),
            vec!["Service shop/catalog", "EndpointSlice shop/catalog"]
        );
    }

    #[test]
    fn a_change_to_one_service_leaves_other_scopes_alone() {
        let before = index_of(MESH);
        let changed = MESH.replace("weight: 90", "weight: 80");
        assert_ne!(changed, MESH);
        let after = index_of(&changed);
        let (s1, s2) = (before.current(), after.current());
        let (l1, l2) = (Lookup::build(&s1), Lookup::build(&s2));
        let checkout = Scope::new(["shop/checkout".to_string()], "");
        let catalog = Scope::new(["shop/catalog".to_string()], "");
        assert_ne!(
            scoped_push(&s1, &l1, &checkout).version,
            scoped_push(&s2, &l2, &checkout).version
        );
        assert_eq!(
            scoped_push(&s1, &l1, &catalog).version,
            scoped_push(&s2, &l2, &catalog).version
        );
        assert_ne!(
            scoped_push(&s1, &l1, &Scope::default()).version,
            scoped_push(&s2, &l2, &Scope::default()).version
        );
    }

    #[test]
    fn authorization_policies_go_to_the_called_side_only() {
        let authz = |name: &str, target: &str, allow: &str| {
            format!(
                "---\napiVersion: policy.tern.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRefs: [{target}]\n  allow: {allow}\n"
            )
        };
        let mesh = format!(
            "{MESH}\n{}{}{}",
            authz(
                "checkout-svc",
                "{group: \"\", kind: Service, name: checkout}",
                "[{namespaces: [shop]}]"
            ),
            authz(
                "checkout-route",
                "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: checkout}",
                "[{meshed: true}]"
            ),
            authz(
                "catalog",
                "{group: \"\", kind: Service, name: catalog}",
                "[]"
            ),
        );
        let index = index_of(&mesh);
        let snap = index.current();
        let lookup = Lookup::build(&snap);
        let scoped = |scope: Scope| {
            let push = scoped_push(&snap, &lookup, &scope);
            validates(&push);
            kinds(&snap, &push)
        };
        // (A scope that calls nothing gets everything: these call web.)
        let own = |svc: &str| Scope::new(["shop/web".to_string()], svc);
        // Checkout's own sidecar: policies on its Service and on its route.
        let k = scoped(own("shop/checkout"));
        for want in [
            "Service shop/checkout",
            "HTTPRoute shop/checkout",
            "AuthorizationPolicy shop/checkout-svc",
            "AuthorizationPolicy shop/checkout-route",
        ] {
            assert!(k.contains(&want.to_string()), "{want} missing from {k:?}");
        }
        assert!(
            !k.contains(&"AuthorizationPolicy shop/catalog".to_string()),
            "{k:?}"
        );
        // Catalog's own sidecar: its policy and its own EndpointSlice (pod addresses
        // resolve to its Service port), nothing of checkout's.
        let mut k = scoped(own("shop/catalog"));
        k.sort();
        assert_eq!(
            k,
            [
                "AuthorizationPolicy shop/catalog",
                "EndpointSlice shop/catalog",
                "RateLimitPolicy shop/web",
                "Service shop/catalog",
                "Service shop/web",
            ]
        );
        // A caller of checkout does not enforce checkout's policies: left out.
        let k = scoped(Scope::new(["shop/checkout".to_string()], "shop/web"));
        assert!(k.contains(&"HTTPRoute shop/checkout".to_string()), "{k:?}");
        assert!(
            !k.iter().any(|d| d.starts_with("AuthorizationPolicy")),
            "{k:?}"
        );
    }
}
