//! A validated [`Resources`] set to a [`Snapshot`].
//!
//! Precedence (one entry per route match, across every route attached to a Service port):
//! HTTP: Exact path, then PathPrefix (longer prefix first), then RegularExpression (our
//! implementation-specific choice: after every prefix); then a method match first; then more
//! header matches; then more query matches; then the oldest route (creationTimestamp,
//! absent = newest); then namespace/name; then rule order; then match order.
//! gRPC: service+method, then service only, then method only, then neither; Exact before
//! RegularExpression; more header matches first; then the same route tie-breakers.
//!
//! Policies (BackendPolicy, RateLimitPolicy, ConcurrencyPolicy): each Service port, or
//! route rule, gets the policy of a kind naming it by `sectionName` (port name, rule
//! name), else one targeting the whole Service or route; between equals the oldest, then
//! namespace/name (validation warns about the losers); see `rank_policies`. BackendPolicy
//! goes to backends; a RateLimitPolicy to Service ports (Service targets) and route rules
//! (route targets); a ConcurrencyPolicy to route rules. One `Arc` per policy.
//!
//! AuthorizationPolicies are the exception: they never conflict. A Service port, or a
//! route rule, gets every one that targets it (the whole object or that section), and
//! an [`Authorization`] is shared by everything with the same set of policies.
//!
//! Compilation assumes [`crate::validate`] passed; anything that still does not parse is
//! skipped rather than panicking.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use rustc_hash::FxHashMap;
use serde_json::{Value, json};

use crate::identity::SpiffeId;
use crate::model::{self, Filter, Kind, MatchType, PathType, Resource};
use crate::resources::Resources;
use crate::snapshot::*;
use crate::validate::{
    GRPC_CODES, MTLS_MODE_ANNOTATION, NON_IDEMPOTENT_ANNOTATION, REGION_LABEL,
    SERVICE_ACCOUNT_ANNOTATION, SERVICE_NAME_LABEL, cluster_ip, full_regex, grpc_code,
    is_dns_subdomain, parse_duration, timestamp_key,
};

/// Retries after the first attempt when `retry.attempts` is omitted.
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// `retry.backoff` when omitted.
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// `queueTimeout` of a concurrency limit when omitted.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
/// `rate.per` of a RateLimitPolicy when omitted.
pub const DEFAULT_RATE_PER: Duration = Duration::from_secs(1);
/// `adaptive.minLimit` when omitted (`maxLimit` defaults to `maxConcurrent`).
pub const DEFAULT_MIN_LIMIT: u32 = 1;
/// HTTP statuses retried when `retry.codes` is omitted.
const DEFAULT_RETRY_CODES: [u16; 3] = [502, 503, 504];
/// gRPC codes retried when `retry.codes` is omitted: UNAVAILABLE.
const DEFAULT_GRPC_RETRY_CODES: [u8; 1] = [14];

/// Builds the snapshot of a resource set that passed validation.
pub fn compile(res: &Resources) -> Snapshot {
    let mut c = Compiler::new(res);
    let mut services = HashMap::new();
    let mut by_name: FxHashMap<String, Vec<Arc<Service>>> = FxHashMap::default();
    let mut json_services = Vec::new();
    // Each Service (in namespace/name order) with its compiled ports, for `by_addr`.
    let mut addressed: Vec<Addressed> = Vec::new();
    for obj in res.of_kind(Kind::Service) {
        let Resource::Service(svc) = &obj.resource else {
            continue;
        };
        let id = ObjectRef {
            namespace: svc.meta.namespace.clone(),
            name: svc.meta.name.clone(),
        };
        let mut ports = Vec::new();
        let mut json_ports = Vec::new();
        let mut port_specs = Vec::new();
        let mtls = mtls_mode(&svc.meta);
        for p in &svc.ports {
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let sp = Arc::new(c.service_port(&id, port, p, mtls));
            json_ports.push(port_json(&sp));
            port_specs.push((p, sp.clone()));
            ports.push(sp);
        }
        addressed.push((svc, port_specs));
        json_services.push(json!({"service": id.to_string(), "ports": json_ports}));
        let service = Arc::new(Service {
            id: id.clone(),
            ports,
        });
        by_name
            .entry(id.name.clone())
            .or_default()
            .push(service.clone());
        services.insert(id, service);
    }
    for same_name in by_name.values_mut() {
        same_name.sort_by(|a, b| a.id.namespace.cmp(&b.id.namespace));
    }
    let by_addr = c.by_addr(&mut addressed);
    let version = res.version();
    let json = json!({
        "version": version,
        "services": json_services,
        "backends": c.backends.iter().map(|b| backend_json(b)).collect::<Vec<_>>(),
    });
    let mut backend_ids: FxHashMap<ObjectRef, Vec<(u16, usize)>> = FxHashMap::default();
    for b in &c.backends {
        let ids = backend_ids.entry(b.service.clone()).or_default();
        ids.push((b.port, b.index));
    }
    Snapshot {
        version,
        services,
        by_name,
        backends: c.backends,
        backend_ids,
        by_addr,
        json,
    }
}

/// A Service with its compiled ports, each beside its spec (for [`Snapshot::by_addr`]).
type Addressed<'a> = (
    &'a model::Service,
    Vec<(&'a model::ServicePort, Arc<ServicePort>)>,
);

struct Compiler<'a> {
    res: &'a Resources,
    backends: Vec<Arc<Backend>>,
    backend_ids: HashMap<(ObjectRef, u16), usize>,
    /// Routes by the Service (namespace, name) they attach to, in resource order.
    routes: HashMap<(&'a str, &'a str), Vec<&'a model::Object>>,
    /// EndpointSlices by the Service (namespace, name) they label, in resource order.
    slices: HashMap<(&'a str, &'a str), Vec<&'a model::Object>>,
    /// Policies by the object they target.
    policies: Policies<'a>,
    /// Compiled policies by policy (one Arc per policy, shared by everything it governs).
    compiled_policies: HashMap<ObjectRef, Arc<BackendPolicy>>,
    compiled_rate_limits: HashMap<ObjectRef, Arc<RateLimit>>,
    compiled_concurrency: HashMap<ObjectRef, Arc<ConcurrencyLimit>>,
    compiled_authorization_policies: HashMap<ObjectRef, Arc<AuthorizationPolicy>>,
    /// By the policies they hold, in order: one `Arc` per distinct set.
    authorizations: HashMap<Vec<ObjectRef>, Arc<Authorization>>,
    /// Shared by every backend no policy targets.
    default_policy: Arc<BackendPolicy>,
}

impl<'a> Compiler<'a> {
    /// Indexes routes and slices once, so that compiling is linear in the number of
    /// resources rather than Services x resources.
    fn new(res: &'a Resources) -> Self {
        let mut routes: HashMap<(&str, &str), Vec<&model::Object>> = HashMap::new();
        let mut slices: HashMap<(&str, &str), Vec<&model::Object>> = HashMap::new();
        for obj in res.iter() {
            let parents = match &obj.resource {
                Resource::HTTPRoute(r) => &r.parent_refs,
                Resource::GRPCRoute(r) => &r.parent_refs,
                Resource::EndpointSlice(s) => {
                    if let Some(svc) = s.meta.labels.get(SERVICE_NAME_LABEL) {
                        slices
                            .entry((s.meta.namespace.as_str(), svc.as_str()))
                            .or_default()
                            .push(obj);
                    }
                    continue;
                }
                _ => continue,
            };
            let mut seen: Vec<(&str, &str)> = Vec::new();
            for p in parents.iter().filter(|p| p.is_service()) {
                let key = (p.namespace.as_str(), p.name.as_str());
                if !seen.contains(&key) {
                    seen.push(key);
                    routes.entry(key).or_default().push(obj);
                }
            }
        }
        Compiler {
            res,
            backends: Vec::new(),
            backend_ids: HashMap::new(),
            routes,
            slices,
            policies: Policies::new(res),
            compiled_policies: HashMap::new(),
            compiled_rate_limits: HashMap::new(),
            compiled_concurrency: HashMap::new(),
            compiled_authorization_policies: HashMap::new(),
            authorizations: HashMap::new(),
            default_policy: Arc::new(BackendPolicy::default()),
        }
    }
}

/// A Tern policy kind: attaches to objects through `spec.targetRefs`.
pub(crate) trait Policy: Sized + 'static {
    const KIND: Kind;
    /// The kinds its targetRefs may name.
    const TARGETS: &'static [Kind];
    /// One policy of the kind applies per port or rule (the others conflict with it);
    /// `false`: every policy targeting it applies.
    const EXCLUSIVE: bool = true;
    fn meta(&self) -> &model::Meta;
    fn target_refs(&self) -> &[model::PolicyTargetRef];
    fn of(r: &Resource) -> Option<&Self>;
    /// This kind's index in `p`.
    fn index<'p, 'a>(p: &'p Policies<'a>) -> &'p PolicyIndex<'a, Self>;

    /// Whether targetRef `t` names something this kind attaches to, and what.
    fn target_of(t: &model::PolicyTargetRef) -> Option<Kind> {
        t.target_kind().filter(|k| Self::TARGETS.contains(k))
    }
}

/// Implements [`Policy`] for the model type, `Kind` and `Resource` variant named `$kind`.
macro_rules! policy_kind {
    ($kind:ident, targets: $targets:expr, index: $index:ident $(, exclusive: $exclusive:expr)?) => {
        impl Policy for model::$kind {
            const KIND: Kind = Kind::$kind;
            const TARGETS: &'static [Kind] = $targets;
            $(const EXCLUSIVE: bool = $exclusive;)?
            fn meta(&self) -> &model::Meta {
                &self.meta
            }
            fn target_refs(&self) -> &[model::PolicyTargetRef] {
                &self.target_refs
            }
            fn of(r: &Resource) -> Option<&Self> {
                match r {
                    Resource::$kind(p) => Some(p),
                    _ => None,
                }
            }
            fn index<'p, 'a>(p: &'p Policies<'a>) -> &'p PolicyIndex<'a, Self> {
                &p.$index
            }
        }
    };
}

const SERVICES_AND_ROUTES: &[Kind] = &[Kind::Service, Kind::HTTPRoute, Kind::GRPCRoute];

policy_kind!(BackendPolicy, targets: &[Kind::Service], index: backend);
policy_kind!(RateLimitPolicy, targets: SERVICES_AND_ROUTES, index: rate_limit);
policy_kind!(ConcurrencyPolicy, targets: &[Kind::HTTPRoute, Kind::GRPCRoute], index: concurrency);
// Every AuthorizationPolicy targeting a port or rule applies: they add up.
policy_kind!(AuthorizationPolicy, targets: SERVICES_AND_ROUTES, index: authorization, exclusive: false);

/// Policies of one kind by the object (kind, namespace, name) they target, each once per
/// object, in resource order.
pub(crate) type PolicyIndex<'a, P> = HashMap<(Kind, &'a str, &'a str), Vec<&'a P>>;

/// Every policy kind's index, built once and shared by validation and compilation.
pub(crate) struct Policies<'a> {
    pub backend: PolicyIndex<'a, model::BackendPolicy>,
    pub rate_limit: PolicyIndex<'a, model::RateLimitPolicy>,
    pub concurrency: PolicyIndex<'a, model::ConcurrencyPolicy>,
    pub authorization: PolicyIndex<'a, model::AuthorizationPolicy>,
}

impl<'a> Policies<'a> {
    pub fn new(res: &'a Resources) -> Self {
        Policies {
            backend: policy_index(res),
            rate_limit: policy_index(res),
            concurrency: policy_index(res),
            authorization: policy_index(res),
        }
    }

    /// The policies of kind `P` targeting object `target`/`name` (in the policy's own
    /// namespace `ns`).
    pub fn targeting<'s, P: Policy>(
        &'s self,
        target: Kind,
        ns: &'s str,
        name: &'s str,
    ) -> &'s [&'a P] {
        P::index(self)
            .get(&(target, ns, name))
            .map_or(&[][..], Vec::as_slice)
    }

    /// The policy of kind `P` that applies to section `section` (port or rule name) of
    /// `target` `ns/name`: see [`rank_policies`].
    pub fn applying<P: Policy>(
        &self,
        target: Kind,
        ns: &str,
        name: &str,
        section: Option<&str>,
    ) -> Option<&'a P> {
        let candidates = self.targeting::<P>(target, ns, name);
        rank_policies(candidates, target, name, section)
            .first()
            .map(|&(_, _, p)| p)
    }
}

fn policy_index<P: Policy>(res: &Resources) -> PolicyIndex<'_, P> {
    let mut index: PolicyIndex<P> = HashMap::new();
    for obj in res.of_kind(P::KIND) {
        let Some(p) = P::of(&obj.resource) else {
            continue;
        };
        let mut seen: Vec<(Kind, &str)> = Vec::new();
        for t in p.target_refs() {
            let Some(kind) = P::target_of(t) else {
                continue;
            };
            if !seen.contains(&(kind, t.name.as_str())) {
                seen.push((kind, &t.name));
                index
                    .entry((kind, p.meta().namespace.as_str(), t.name.as_str()))
                    .or_default()
                    .push(p);
            }
        }
    }
    index
}

/// The policies of `candidates` (all targeting object `target`/`name`) that apply to its
/// section (Service port or route rule) named `section`, best first, as (specificity,
/// targetRef index, policy): specificity 0 targets the section by `sectionName`, 1 the
/// whole object; ties go to the oldest policy, then namespace/name (as for routes). The
/// first one applies.
pub(crate) fn rank_policies<'a, P: Policy>(
    candidates: &[&'a P],
    target: Kind,
    name: &str,
    section: Option<&str>,
) -> Vec<(u8, usize, &'a P)> {
    let section = section.filter(|n| !n.is_empty());
    let mut ranked: Vec<(u8, usize, &P)> = candidates
        .iter()
        .filter_map(|p| {
            p.target_refs()
                .iter()
                .enumerate()
                .filter(|(_, t)| P::target_of(t) == Some(target) && t.name == name)
                .filter_map(|(i, t)| match t.section_name.as_deref() {
                    None => Some((1, i)),
                    Some(s) if Some(s) == section => Some((0, i)),
                    Some(_) => None,
                })
                .min()
                .map(|(rank, i)| (rank, i, *p))
        })
        .collect();
    ranked.sort_by_cached_key(|(rank, i, p)| (*rank, age_key(p.meta()), *i));
    ranked
}

/// Sort key of an HTTP match entry; see the module doc.
type HttpKey = (
    u8,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
    AgeKey,
    usize,
    usize,
);
/// Sort key of a gRPC match entry; see the module doc.
type GrpcKey = (u8, usize, Reverse<usize>, AgeKey, usize, usize);
/// Route tie-breakers: age (absent = newest), then namespace/name.
pub(crate) type AgeKey = (bool, (String, u32), String, String);

pub(crate) fn age_key(meta: &model::Meta) -> AgeKey {
    let ts = meta.creation_timestamp.as_deref().and_then(timestamp_key);
    (
        ts.is_none(),
        ts.unwrap_or_default(),
        meta.namespace.clone(),
        meta.name.clone(),
    )
}

impl Compiler<'_> {
    fn service_port(
        &mut self,
        id: &ObjectRef,
        port: u16,
        spec: &model::ServicePort,
        mtls: MtlsMode,
    ) -> ServicePort {
        let mut http: Vec<(HttpKey, HttpRuleMatch)> = Vec::new();
        let mut grpc: Vec<(GrpcKey, GrpcRuleMatch)> = Vec::new();
        let mut attached = false;
        // A copy of the (short) list: compiling rules needs `&mut self`.
        let attached_here: Vec<&model::Object> = self
            .routes
            .get(&(id.namespace.as_str(), id.name.as_str()))
            .cloned()
            .unwrap_or_default();
        for obj in attached_here {
            match &obj.resource {
                Resource::HTTPRoute(r) if attaches(&r.parent_refs, id, port) => {
                    attached = true;
                    let label: Arc<str> = format!("{}/{}", r.meta.namespace, r.meta.name).into();
                    let non_idempotent = r
                        .meta
                        .annotations
                        .get(NON_IDEMPOTENT_ANNOTATION)
                        .is_some_and(|v| v == "true");
                    for (ri, rule) in r.rules.iter().enumerate() {
                        let mut compiled = self.rule(
                            &label,
                            ri,
                            RouteKind::HTTPRoute,
                            &rule.backend_refs,
                            &rule.filters,
                            &rule.timeouts,
                            rule.retry
                                .as_ref()
                                .map(|rt| retry_policy(rt, false, non_idempotent)),
                        );
                        self.route_policies(
                            &mut compiled,
                            Kind::HTTPRoute,
                            &r.meta,
                            rule.name.as_deref(),
                        );
                        let compiled = Arc::new(compiled);
                        for (mi, m) in rule.matches.iter().enumerate() {
                            let Some(hm) = http_match(m) else { continue };
                            let (class, len) = match m.path_type {
                                PathType::Exact => (0, m.path.len()),
                                PathType::PathPrefix => (1, prefix_of(&m.path).len()),
                                PathType::RegularExpression => (2, 0),
                            };
                            let key = (
                                class,
                                Reverse(len),
                                m.method.is_none(),
                                Reverse(m.headers.len()),
                                Reverse(m.query_params.len()),
                                age_key(&r.meta),
                                ri,
                                mi,
                            );
                            http.push((
                                key,
                                HttpRuleMatch {
                                    m: hm,
                                    rule: compiled.clone(),
                                },
                            ));
                        }
                    }
                }
                Resource::GRPCRoute(r) if attaches(&r.parent_refs, id, port) => {
                    attached = true;
                    let label: Arc<str> = format!("{}/{}", r.meta.namespace, r.meta.name).into();
                    for (ri, rule) in r.rules.iter().enumerate() {
                        let mut compiled = self.rule(
                            &label,
                            ri,
                            RouteKind::GRPCRoute,
                            &rule.backend_refs,
                            &rule.filters,
                            &model::Timeouts::default(),
                            rule.retry.as_ref().map(|rt| retry_policy(rt, true, true)),
                        );
                        self.route_policies(
                            &mut compiled,
                            Kind::GRPCRoute,
                            &r.meta,
                            rule.name.as_deref(),
                        );
                        let compiled = Arc::new(compiled);
                        for (mi, m) in rule.matches.iter().enumerate() {
                            let Some(gm) = grpc_match(m) else { continue };
                            let (class, regexes) = match &m.method {
                                None => (3, 0),
                                Some(mm) => (
                                    match (&mm.service, &mm.method) {
                                        (Some(_), Some(_)) => 0,
                                        (Some(_), None) => 1,
                                        (None, Some(_)) => 2,
                                        (None, None) => 3,
                                    },
                                    usize::from(mm.match_type == MatchType::RegularExpression),
                                ),
                            };
                            let key = (
                                class,
                                regexes,
                                Reverse(m.headers.len()),
                                age_key(&r.meta),
                                ri,
                                mi,
                            );
                            grpc.push((
                                key,
                                GrpcRuleMatch {
                                    m: gm,
                                    rule: compiled.clone(),
                                },
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        http.sort_by(|a, b| a.0.cmp(&b.0));
        grpc.sort_by(|a, b| a.0.cmp(&b.0));
        let default_rule = (!attached).then(|| {
            let backend = self.backend(id, port);
            Arc::new(Rule {
                route: id.to_string().into(),
                rule_index: 0,
                kind: RouteKind::Default,
                backends: WeightedBackends {
                    total: backend.as_ref().map_or(0, |_| 1),
                    entries: backend.into_iter().map(|b| (1, b)).collect(),
                },
                request_headers: HeaderModifier::default(),
                response_headers: HeaderModifier::default(),
                url_rewrite: None,
                timeouts: Timeouts::default(),
                retry: None,
                rate_limit: None,
                concurrency: None,
                authorization: None,
            })
        });
        let http: Vec<HttpRuleMatch> = http.into_iter().map(|(_, m)| m).collect();
        ServicePort {
            service: id.clone(),
            port,
            name: spec.name.clone().filter(|n| !n.is_empty()),
            protocol: protocol(spec.app_protocol.as_deref()),
            http_index: HttpIndex::build(&http),
            http,
            grpc: grpc.into_iter().map(|(_, m)| m).collect(),
            default_rule,
            rate_limit: self
                .policies
                .applying(Kind::Service, &id.namespace, &id.name, spec.name.as_deref())
                .map(|p| self.rate_limit(p)),
            authorization: self.authorization(
                Kind::Service,
                &id.namespace,
                &id.name,
                spec.name.as_deref(),
            ),
            mtls,
        }
    }

    /// The RateLimitPolicy, ConcurrencyPolicy and AuthorizationPolicies of a route rule (`rule_name`: its
    /// `name`, what a targetRef's `sectionName` names).
    fn route_policies(
        &mut self,
        rule: &mut Rule,
        kind: Kind,
        route: &model::Meta,
        rule_name: Option<&str>,
    ) {
        let (ns, name) = (route.namespace.as_str(), route.name.as_str());
        rule.rate_limit = self
            .policies
            .applying(kind, ns, name, rule_name)
            .map(|p| self.rate_limit(p));
        rule.concurrency = self
            .policies
            .applying::<model::ConcurrencyPolicy>(kind, ns, name, rule_name)
            .and_then(|p| {
                let compiled = concurrency_limit(&p.limit)?;
                Some(
                    self.compiled_concurrency
                        .entry(source_of(&p.meta))
                        .or_insert_with(|| Arc::new(compiled))
                        .clone(),
                )
            });
        rule.authorization = self.authorization(kind, ns, name, rule_name);
    }

    /// Every AuthorizationPolicy targeting `target` `ns/name` or its section `section`
    /// (port or rule name), oldest first; `None` when there is none.
    fn authorization(
        &mut self,
        target: Kind,
        ns: &str,
        name: &str,
        section: Option<&str>,
    ) -> Option<Arc<Authorization>> {
        let candidates = self
            .policies
            .targeting::<model::AuthorizationPolicy>(target, ns, name);
        let mut applying: Vec<&model::AuthorizationPolicy> =
            rank_policies(candidates, target, name, section)
                .into_iter()
                .map(|(_, _, p)| p)
                .collect();
        if applying.is_empty() {
            return None;
        }
        applying.sort_by_cached_key(|p| age_key(&p.meta));
        let key: Vec<ObjectRef> = applying.iter().map(|p| source_of(&p.meta)).collect();
        if let Some(shared) = self.authorizations.get(&key) {
            return Some(shared.clone());
        }
        let policies = applying
            .iter()
            .map(|p| {
                self.compiled_authorization_policies
                    .entry(source_of(&p.meta))
                    .or_insert_with_key(|source| Arc::new(authorization_policy(source, p)))
                    .clone()
            })
            .collect();
        let shared = Arc::new(Authorization { policies });
        self.authorizations.insert(key, shared.clone());
        Some(shared)
    }

    /// [`Snapshot::by_addr`]: clusterIP:port of every Service port, then every endpoint
    /// address not already taken, Services in namespace/name order, ports by number.
    fn by_addr(&self, services: &mut [Addressed]) -> FxHashMap<SocketAddr, Arc<ServicePort>> {
        let mut by_addr = FxHashMap::default();
        services.sort_by(|a, b| {
            (&a.0.meta.namespace, &a.0.meta.name).cmp(&(&b.0.meta.namespace, &b.0.meta.name))
        });
        for (svc, ports) in services.iter_mut() {
            ports.sort_by_key(|(_, sp)| sp.port);
            if let Some(ip) = cluster_ip(svc.cluster_ip.as_deref()).ok().flatten() {
                for (_, sp) in ports.iter() {
                    by_addr
                        .entry(SocketAddr::new(ip, sp.port))
                        .or_insert_with(|| sp.clone());
                }
            }
        }
        for (svc, ports) in services.iter() {
            for (spec, sp) in ports {
                for ep in self.endpoints(svc, spec) {
                    by_addr.entry(ep.addr).or_insert_with(|| sp.clone());
                }
            }
        }
        by_addr
    }

    /// The compiled RateLimitPolicy `p`, one `Arc` per policy.
    fn rate_limit(&mut self, p: &model::RateLimitPolicy) -> Arc<RateLimit> {
        self.compiled_rate_limits
            .entry(source_of(&p.meta))
            .or_insert_with_key(|source| Arc::new(rate_limit(source.clone(), p)))
            .clone()
    }

    #[allow(clippy::too_many_arguments)]
    fn rule(
        &mut self,
        route: &Arc<str>,
        rule_index: usize,
        kind: RouteKind,
        refs: &[model::BackendRef],
        filters: &[Filter],
        timeouts: &model::Timeouts,
        retry: Option<RetryPolicy>,
    ) -> Rule {
        let mut entries = Vec::new();
        let mut total: u32 = 0;
        for b in refs {
            let (Some(port), Ok(weight)) = (
                b.port.and_then(|p| u16::try_from(p).ok()),
                u32::try_from(b.weight),
            ) else {
                continue;
            };
            if weight == 0 {
                continue;
            }
            let id = ObjectRef {
                namespace: b.namespace.clone(),
                name: b.name.clone(),
            };
            if let Some(backend) = self.backend(&id, port) {
                total = total.saturating_add(weight);
                entries.push((total, backend));
            }
        }
        let mut rule = Rule {
            route: route.clone(),
            rule_index,
            kind,
            backends: WeightedBackends { entries, total },
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
            url_rewrite: None,
            timeouts: Timeouts {
                request: timeout(&timeouts.request),
                backend_request: timeout(&timeouts.backend_request),
            },
            retry,
            rate_limit: None,
            concurrency: None,
            authorization: None,
        };
        for f in filters {
            match f {
                Filter::RequestHeaderModifier(m) => rule.request_headers = header_modifier(m),
                Filter::ResponseHeaderModifier(m) => rule.response_headers = header_modifier(m),
                Filter::URLRewrite(u) => {
                    rule.url_rewrite = Some(UrlRewrite {
                        hostname: u
                            .hostname
                            .as_deref()
                            .and_then(|h| HeaderValue::from_str(h).ok()),
                        path: u.path.as_ref().map(|p| match p {
                            model::PathModifier::ReplaceFullPath(v) => {
                                PathRewrite::ReplaceFullPath(v.clone())
                            }
                            model::PathModifier::ReplacePrefixMatch(v) => {
                                PathRewrite::ReplacePrefixMatch(v.clone())
                            }
                        }),
                    })
                }
                Filter::Unsupported(_) => {}
            }
        }
        rule
    }

    /// The backend for a Service port, created on first use; `None` if the Service or the
    /// port does not exist (validation reports that).
    fn backend(&mut self, id: &ObjectRef, port: u16) -> Option<Arc<Backend>> {
        if let Some(&i) = self.backend_ids.get(&(id.clone(), port)) {
            return Some(self.backends[i].clone());
        }
        let svc = self.res.service(&id.namespace, &id.name)?;
        let sp = svc.ports.iter().find(|p| p.port == i64::from(port))?;
        let index = self.backends.len();
        let backend = Arc::new(Backend {
            index,
            name: format!("{id}:{port}").into(),
            service: id.clone(),
            port,
            protocol: protocol(sp.app_protocol.as_deref()),
            endpoints: self.endpoints(svc, sp),
            policy: self.policy(id, sp.name.as_deref()),
        });
        self.backends.push(backend.clone());
        self.backend_ids.insert((id.clone(), port), index);
        Some(backend)
    }

    /// The policy for a Service port: see [`rank_policies`].
    fn policy(&mut self, id: &ObjectRef, port_name: Option<&str>) -> Arc<BackendPolicy> {
        let Some(p) = self.policies.applying::<model::BackendPolicy>(
            Kind::Service,
            &id.namespace,
            &id.name,
            port_name,
        ) else {
            return self.default_policy.clone();
        };
        self.compiled_policies
            .entry(source_of(&p.meta))
            .or_insert_with_key(|source| Arc::new(backend_policy(source.clone(), p)))
            .clone()
    }

    /// Every endpoint of a Service port, from the EndpointSlices labelled with its name.
    fn endpoints(&self, svc: &model::Service, sp: &model::ServicePort) -> Vec<Endpoint> {
        let mut out = Vec::new();
        let labelled: &[&model::Object] = self
            .slices
            .get(&(svc.meta.namespace.as_str(), svc.meta.name.as_str()))
            .map_or(&[], Vec::as_slice);
        for obj in labelled.iter().copied() {
            let Resource::EndpointSlice(slice) = &obj.resource else {
                continue;
            };
            if slice.meta.namespace != svc.meta.namespace
                || slice.meta.labels.get(SERVICE_NAME_LABEL) != Some(&svc.meta.name)
                || !matches!(slice.address_type.as_str(), "IPv4" | "IPv6")
            {
                continue;
            }
            let name = |n: &Option<String>| n.clone().unwrap_or_default();
            let slice_port = slice
                .ports
                .iter()
                .find(|p| name(&p.name) == name(&sp.name))
                .or_else(|| {
                    (svc.ports.len() == 1 && slice.ports.len() == 1).then(|| &slice.ports[0])
                });
            let Some(port) = slice_port
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            let region: Option<Arc<str>> = slice
                .meta
                .labels
                .get(REGION_LABEL)
                .map(|r| r.as_str().into());
            let identity = slice
                .meta
                .annotations
                .get(SERVICE_ACCOUNT_ANNOTATION)
                .filter(|sa| is_dns_subdomain(sa))
                .map(|sa| {
                    Arc::new(EndpointIdentity {
                        namespace: slice.meta.namespace.clone(),
                        service_account: sa.clone(),
                    })
                });
            for ep in &slice.endpoints {
                let zone: Option<Arc<str>> = ep.zone.as_deref().map(Into::into);
                for a in &ep.addresses {
                    let Ok(ip) = a.parse::<IpAddr>() else {
                        continue;
                    };
                    out.push(Endpoint {
                        addr: SocketAddr::new(ip, port),
                        ready: ep.ready,
                        zone: zone.clone(),
                        region: region.clone(),
                        identity: identity.clone(),
                    });
                }
            }
        }
        out
    }
}

fn attaches(refs: &[model::ParentRef], id: &ObjectRef, port: u16) -> bool {
    refs.iter().any(|p| {
        p.is_service()
            && p.namespace == id.namespace
            && p.name == id.name
            && p.port.is_none_or(|pp| pp == i64::from(port))
    })
}

/// A rule's `retry` with defaults filled in. HTTP codes and gRPC codes are sorted and
/// deduplicated.
fn retry_policy(r: &model::Retry, grpc: bool, non_idempotent: bool) -> RetryPolicy {
    let mut codes: Vec<u16> = Vec::new();
    let mut grpc_codes: Vec<u8> = Vec::new();
    match (&r.codes, grpc) {
        (None, false) => codes = DEFAULT_RETRY_CODES.to_vec(),
        (None, true) => grpc_codes = DEFAULT_GRPC_RETRY_CODES.to_vec(),
        (Some(cs), false) => {
            codes = cs
                .iter()
                .filter_map(|c| match c {
                    model::RetryCode::Number(n) => u16::try_from(*n).ok(),
                    _ => None,
                })
                .collect()
        }
        (Some(cs), true) => grpc_codes = cs.iter().filter_map(grpc_code).collect(),
    }
    codes.sort_unstable();
    codes.dedup();
    grpc_codes.sort_unstable();
    grpc_codes.dedup();
    RetryPolicy {
        attempts: r
            .attempts
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(DEFAULT_RETRY_ATTEMPTS),
        backoff: positive(&r.backoff).unwrap_or(DEFAULT_RETRY_BACKOFF),
        codes,
        grpc_codes,
        non_idempotent,
    }
}

/// A BackendPolicy as applied to a backend: every setting not given takes its default.
fn backend_policy(source: ObjectRef, p: &model::BackendPolicy) -> BackendPolicy {
    let n = |v: Option<i64>, default: u32| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(default);
    let d = |v: &Option<String>, default: Duration| positive(v).unwrap_or(default);
    let mut policy = BackendPolicy {
        source: Some(source),
        ..BackendPolicy::default()
    };
    if let Some(b) = &p.retry_budget {
        let r = &mut policy.retry_budget;
        r.percent = n(b.percent, r.percent);
        r.min_retries_per_second = n(b.min_retries_per_second, r.min_retries_per_second);
        r.interval = d(&b.interval, r.interval);
    }
    if let Some(cb) = &p.circuit_breaker {
        let c = &mut policy.circuit_breaker;
        if let Some(v) = cb.consecutive_failures {
            c.consecutive_failures = u32::try_from(v).ok().filter(|v| *v > 0);
        }
        c.failure_rate = cb.failure_rate.as_ref().map(|r| {
            let f = FailureRate::default();
            FailureRate {
                percent: n(r.percent, f.percent),
                min_requests: n(r.min_requests, f.min_requests),
                interval: d(&r.interval, f.interval),
            }
        });
        if let Some(e) = &cb.ejection {
            let j = &mut c.ejection;
            j.base = d(&e.base, j.base);
            j.max = d(&e.max, j.max).max(j.base);
            j.max_ejected_percent = n(e.max_ejected_percent, j.max_ejected_percent);
        }
        if let Some(codes) = &cb.failure_status_codes {
            let mut codes: Vec<u16> = codes
                .iter()
                .flatten()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect();
            codes.sort_unstable();
            codes.dedup();
            c.failure_status_codes = codes;
        }
    }
    if let Some(l) = &p.limits {
        let m = &mut policy.limits;
        m.max_connections = n(l.max_connections, m.max_connections);
        m.max_pending_requests = n(l.max_pending_requests, m.max_pending_requests);
        m.max_requests = n(l.max_requests, m.max_requests);
    }
    if let Some(lb) = &p.load_balancer {
        let b = &mut policy.load_balancer;
        b.algorithm = lb.algorithm.unwrap_or_default();
        // The hash only matters to consistent hashing (validation warns otherwise).
        if matches!(b.algorithm, Algorithm::RingHash | Algorithm::Maglev) {
            b.hash = match &lb.hash {
                Some(model::HashSpec::Header(h)) => HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(HashKey::Header),
                Some(model::HashSpec::Cookie(c)) => Some(HashKey::Cookie(c.clone())),
                Some(model::HashSpec::SourceIP(true)) => Some(HashKey::SourceIP),
                _ => None,
            };
        }
        if let Some(l) = &lb.locality {
            let loc = &mut b.locality;
            loc.enabled = l.enabled.unwrap_or(loc.enabled);
            loc.min_healthy_percent = n(l.min_healthy_percent, loc.min_healthy_percent);
        }
    }
    policy.concurrency = p.concurrency.as_ref().and_then(concurrency_limit);
    policy
}

/// A Service's `tern.dev/mtls-mode` (validation refuses values other than these).
fn mtls_mode(meta: &model::Meta) -> MtlsMode {
    match meta
        .annotations
        .get(MTLS_MODE_ANNOTATION)
        .map(String::as_str)
    {
        Some("strict") => MtlsMode::Strict,
        _ => MtlsMode::Permissive,
    }
}

/// An AuthorizationPolicy's clauses as one list of principals (a clause matches if any of
/// its fields does, a policy if any clause does), duplicates removed.
fn authorization_policy(source: &ObjectRef, p: &model::AuthorizationPolicy) -> AuthorizationPolicy {
    let mut allow: Vec<Principal> = Vec::new();
    for clause in &p.allow {
        let identities = clause
            .identities
            .iter()
            .flatten()
            .filter_map(|id| SpiffeId::parse(id).ok())
            .map(Principal::Identity);
        let namespaces = clause
            .namespaces
            .iter()
            .flatten()
            .map(|ns| Principal::Namespace(ns.clone()));
        let flags = [
            clause.meshed.then_some(Principal::Meshed),
            clause.unauthenticated.then_some(Principal::Unauthenticated),
        ];
        for principal in identities
            .chain(namespaces)
            .chain(flags.into_iter().flatten())
        {
            if !allow.contains(&principal) {
                allow.push(principal);
            }
        }
    }
    AuthorizationPolicy {
        name: source.to_string().into(),
        allow,
    }
}

/// `namespace/name` of a policy.
fn source_of(meta: &model::Meta) -> ObjectRef {
    ObjectRef {
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
    }
}

/// A concurrency limit with its defaults; `None` without a valid `maxConcurrent`.
fn concurrency_limit(c: &model::ConcurrencySpec) -> Option<ConcurrencyLimit> {
    let max_concurrent = c
        .max_concurrent
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0)?;
    Some(ConcurrencyLimit {
        max_concurrent,
        max_queue: c.max_queue.and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
        queue_timeout: positive(&c.queue_timeout).unwrap_or(DEFAULT_QUEUE_TIMEOUT),
        adaptive: c.adaptive.as_ref().map(|a| {
            let n = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0);
            let min_limit = n(a.min_limit)
                .unwrap_or(DEFAULT_MIN_LIMIT)
                .min(max_concurrent);
            Adaptive {
                algorithm: a.algorithm.unwrap_or_default(),
                min_limit,
                max_limit: n(a.max_limit).unwrap_or(max_concurrent).max(max_concurrent),
            }
        }),
    })
}

/// A RateLimitPolicy with its defaults.
fn rate_limit(source: ObjectRef, p: &model::RateLimitPolicy) -> RateLimit {
    let rate = p.rate.clone().unwrap_or_default();
    let n = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
    RateLimit {
        source,
        requests: n(rate.requests).filter(|v| *v > 0).unwrap_or(1),
        per: positive(&rate.per).unwrap_or(DEFAULT_RATE_PER),
        burst: n(rate.burst).unwrap_or(0),
        key: match &p.key {
            None | Some(model::RateLimitKeySpec::All) => RateLimitKey::All,
            Some(model::RateLimitKeySpec::Route) => RateLimitKey::Route,
            Some(model::RateLimitKeySpec::Caller) => RateLimitKey::Caller,
            Some(model::RateLimitKeySpec::Header(h)) => {
                HeaderName::from_bytes(h.as_bytes()).map_or(RateLimitKey::All, RateLimitKey::Header)
            }
        },
    }
}

/// A duration that parses and is longer than zero.
fn positive(v: &Option<String>) -> Option<Duration> {
    v.as_deref()
        .and_then(|v| parse_duration(v).ok())
        .filter(|d| !d.is_zero())
}

fn protocol(app_protocol: Option<&str>) -> Protocol {
    match app_protocol {
        Some("kubernetes.io/h2c" | "grpc") => Protocol::H2c,
        _ => Protocol::Http1,
    }
}

fn timeout(v: &Option<String>) -> Option<Duration> {
    v.as_deref()
        .and_then(|v| parse_duration(v).ok())
        .filter(|d| !d.is_zero())
}

/// A PathPrefix value as stored: without a trailing slash, except `/` itself.
fn prefix_of(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() { "/".into() } else { t.into() }
}

fn string_match(t: MatchType, v: &str) -> Option<StringMatch> {
    Some(match t {
        MatchType::Exact => StringMatch::Exact(v.to_string()),
        MatchType::RegularExpression => StringMatch::Regex(full_regex(v).ok()?),
    })
}

fn header_matches(ms: &[model::ValueMatch]) -> Option<Vec<HeaderMatch>> {
    ms.iter()
        .map(|h| {
            Some(HeaderMatch {
                name: HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                value: string_match(h.match_type, &h.value)?,
            })
        })
        .collect()
}

fn http_match(m: &model::HttpRouteMatch) -> Option<HttpMatch> {
    Some(HttpMatch {
        path: match m.path_type {
            PathType::Exact => PathMatch::Exact(m.path.clone()),
            PathType::PathPrefix => PathMatch::Prefix(prefix_of(&m.path)),
            PathType::RegularExpression => PathMatch::Regex(full_regex(&m.path).ok()?),
        },
        method: match &m.method {
            Some(meth) => Some(Method::from_bytes(meth.as_bytes()).ok()?),
            None => None,
        },
        headers: header_matches(&m.headers)?,
        query: m
            .query_params
            .iter()
            .map(|q| {
                Some(QueryMatch {
                    name: q.name.clone(),
                    value: string_match(q.match_type, &q.value)?,
                })
            })
            .collect::<Option<_>>()?,
    })
}

fn grpc_match(m: &model::GrpcRouteMatch) -> Option<GrpcMatch> {
    let (service, method) = match &m.method {
        None => (None, None),
        Some(mm) => (
            match &mm.service {
                Some(s) => Some(string_match(mm.match_type, s)?),
                None => None,
            },
            match &mm.method {
                Some(s) => Some(string_match(mm.match_type, s)?),
                None => None,
            },
        ),
    };
    Some(GrpcMatch {
        service,
        method,
        headers: header_matches(&m.headers)?,
    })
}

fn header_modifier(m: &model::HeaderModifier) -> HeaderModifier {
    let pairs = |v: &[(String, String)]| {
        v.iter()
            .filter_map(|(n, v)| {
                Some((
                    HeaderName::from_bytes(n.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect()
    };
    HeaderModifier {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m
            .remove
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect(),
    }
}

// ---- JSON rendering for /config ----

fn duration_json(d: Option<Duration>) -> Value {
    match d {
        None => Value::Null,
        Some(d) if d.subsec_millis() == 0 => format!("{}s", d.as_secs()).into(),
        Some(d) => format!("{}ms", d.as_millis()).into(),
    }
}

fn string_match_json(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(v) => json!({"type": "Exact", "value": v}),
        StringMatch::Regex(re) => json!({"type": "RegularExpression", "value": unanchor(re)}),
    }
}

/// The user's pattern, without the anchors Tern adds.
fn unanchor(re: &regex::Regex) -> &str {
    let s = re.as_str();
    s.strip_prefix("^(?:")
        .and_then(|s| s.strip_suffix(")$"))
        .unwrap_or(s)
}

fn header_modifier_json(m: &HeaderModifier) -> Value {
    if m.is_empty() {
        return Value::Null;
    }
    let pairs = |v: &[(HeaderName, HeaderValue)]| {
        v.iter()
            .map(|(n, v)| json!({"name": n.as_str(), "value": String::from_utf8_lossy(v.as_bytes())}))
            .collect::<Vec<_>>()
    };
    json!({
        "set": pairs(&m.set),
        "add": pairs(&m.add),
        "remove": m.remove.iter().map(HeaderName::as_str).collect::<Vec<_>>(),
    })
}

fn rule_json(r: &Rule) -> Value {
    let mut prev = 0;
    let backends: Vec<Value> = r
        .backends
        .entries
        .iter()
        .map(|(cum, b)| {
            let w = cum - prev;
            prev = *cum;
            json!({"backend": &*b.name, "weight": w})
        })
        .collect();
    let rewrite = r.url_rewrite.as_ref().map(|u| {
        json!({
            "hostname": u.hostname.as_ref().map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()),
            "path": u.path.as_ref().map(|p| match p {
                PathRewrite::ReplaceFullPath(v) => json!({"type": "ReplaceFullPath", "value": v}),
                PathRewrite::ReplacePrefixMatch(v) => json!({"type": "ReplacePrefixMatch", "value": v}),
            }),
        })
    });
    json!({
        "route": &*r.route,
        "kind": r.kind,
        "rule": r.rule_index,
        "backends": backends,
        "timeouts": {
            "request": duration_json(r.timeouts.request),
            "backendRequest": duration_json(r.timeouts.backend_request),
        },
        "requestHeaders": header_modifier_json(&r.request_headers),
        "responseHeaders": header_modifier_json(&r.response_headers),
        "urlRewrite": rewrite,
        "retry": r.retry.as_ref().map(retry_json),
        "rateLimit": r.rate_limit.as_deref().map(rate_limit_json),
        "concurrency": r.concurrency.as_deref().map(concurrency_json),
        "authorization": r.authorization.as_deref().map(authorization_json),
    })
}

fn authorization_json(a: &Authorization) -> Value {
    a.policies
        .iter()
        .map(|p| {
            let allow: Vec<Value> = p
                .allow
                .iter()
                .map(|principal| match principal {
                    Principal::Identity(id) => json!({"identity": id.to_string()}),
                    Principal::Namespace(ns) => json!({"namespace": ns}),
                    Principal::Meshed => json!("Meshed"),
                    Principal::Unauthenticated => json!("Unauthenticated"),
                })
                .collect();
            json!({"source": &*p.name, "allow": allow})
        })
        .collect()
}

fn rate_limit_json(r: &RateLimit) -> Value {
    json!({
        "source": r.source.to_string(),
        "requests": r.requests,
        "per": duration_json(Some(r.per)),
        "burst": r.burst,
        "key": match &r.key {
            RateLimitKey::All => json!("All"),
            RateLimitKey::Route => json!("Route"),
            RateLimitKey::Caller => json!("Caller"),
            RateLimitKey::Header(h) => json!({"header": h.as_str()}),
        },
    })
}

fn concurrency_json(c: &ConcurrencyLimit) -> Value {
    json!({
        "maxConcurrent": c.max_concurrent,
        "maxQueue": c.max_queue,
        "queueTimeout": duration_json(Some(c.queue_timeout)),
        "adaptive": c.adaptive.map(|a| json!({
            "algorithm": a.algorithm,
            "minLimit": a.min_limit,
            "maxLimit": a.max_limit,
        })),
    })
}

fn load_balancer_json(lb: &LoadBalancer) -> Value {
    json!({
        "algorithm": lb.algorithm,
        "hash": lb.hash.as_ref().map(|h| match h {
            HashKey::Header(name) => json!({"header": name.as_str()}),
            HashKey::Cookie(name) => json!({"cookie": name}),
            HashKey::SourceIP => json!({"sourceIP": true}),
        }),
        "locality": {
            "enabled": lb.locality.enabled,
            "minHealthyPercent": lb.locality.min_healthy_percent,
        },
    })
}

fn retry_json(r: &RetryPolicy) -> Value {
    json!({
        "attempts": r.attempts,
        "backoff": duration_json(Some(r.backoff)),
        "codes": r.codes,
        "grpcCodes": r.grpc_codes.iter().map(|c| GRPC_CODES.get(usize::from(*c)).copied().unwrap_or("?")).collect::<Vec<_>>(),
        "nonIdempotent": r.non_idempotent,
    })
}

fn policy_json(p: &BackendPolicy) -> Value {
    let cb = &p.circuit_breaker;
    json!({
        "source": p.source.as_ref().map(ToString::to_string),
        "retryBudget": {
            "percent": p.retry_budget.percent,
            "minRetriesPerSecond": p.retry_budget.min_retries_per_second,
            "interval": duration_json(Some(p.retry_budget.interval)),
        },
        "circuitBreaker": {
            "consecutiveFailures": cb.consecutive_failures,
            "failureRate": cb.failure_rate.map(|r| json!({
                "percent": r.percent,
                "minRequests": r.min_requests,
                "interval": duration_json(Some(r.interval)),
            })),
            "ejection": {
                "base": duration_json(Some(cb.ejection.base)),
                "max": duration_json(Some(cb.ejection.max)),
                "maxEjectedPercent": cb.ejection.max_ejected_percent,
            },
            "failureStatusCodes": cb.failure_status_codes,
        },
        "limits": {
            "maxConnections": p.limits.max_connections,
            "maxPendingRequests": p.limits.max_pending_requests,
            "maxRequests": p.limits.max_requests,
        },
        "loadBalancer": load_balancer_json(&p.load_balancer),
        "concurrency": p.concurrency.as_ref().map(concurrency_json),
    })
}

fn port_json(sp: &ServicePort) -> Value {
    let http: Vec<Value> = sp
        .http
        .iter()
        .map(|h| {
            let path = match &h.m.path {
                PathMatch::Exact(p) => json!({"type": "Exact", "value": p}),
                PathMatch::Prefix(p) => json!({"type": "PathPrefix", "value": p}),
                PathMatch::Regex(re) => json!({"type": "RegularExpression", "value": unanchor(re)}),
            };
            let headers: BTreeMap<&str, Value> =
                h.m.headers
                    .iter()
                    .map(|m| (m.name.as_str(), string_match_json(&m.value)))
                    .collect();
            let query: BTreeMap<&str, Value> =
                h.m.query
                    .iter()
                    .map(|m| (m.name.as_str(), string_match_json(&m.value)))
                    .collect();
            json!({
                "match": {
                    "path": path,
                    "method": h.m.method.as_ref().map(Method::as_str),
                    "headers": headers,
                    "queryParams": query,
                },
                "rule": rule_json(&h.rule),
            })
        })
        .collect();
    let grpc: Vec<Value> = sp
        .grpc
        .iter()
        .map(|g| {
            let headers: BTreeMap<&str, Value> =
                g.m.headers
                    .iter()
                    .map(|m| (m.name.as_str(), string_match_json(&m.value)))
                    .collect();
            json!({
                "match": {
                    "service": g.m.service.as_ref().map(string_match_json),
                    "method": g.m.method.as_ref().map(string_match_json),
                    "headers": headers,
                },
                "rule": rule_json(&g.rule),
            })
        })
        .collect();
    json!({
        "port": sp.port,
        "name": sp.name,
        "protocol": sp.protocol,
        "http": http,
        "grpc": grpc,
        "default": sp.default_rule.as_deref().map(rule_json),
        "rateLimit": sp.rate_limit.as_deref().map(rate_limit_json),
        "authorization": sp.authorization.as_deref().map(authorization_json),
        "mtls": sp.mtls,
    })
}

fn backend_json(b: &Backend) -> Value {
    json!({
        "index": b.index,
        "name": &*b.name,
        "protocol": b.protocol,
        "policy": policy_json(&b.policy),
        "endpoints": b.endpoints.iter().map(|e| json!({
            "addr": e.addr.to_string(),
            "ready": e.ready,
            "zone": e.zone.as_deref(),
            "region": e.region.as_deref(),
            "identity": e.identity.as_deref().map(|i| json!({
                "namespace": i.namespace,
                "serviceAccount": i.service_account,
            })),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;
    use crate::testutil::{SPLIT, compile, route};

    fn port(c: &crate::Compiled, svc: &str) -> Arc<ServicePort> {
        c.snapshot.resolve(svc, Some(8080), "shop").unwrap().clone()
    }

    fn pick(
        sp: &ServicePort,
        method: Method,
        path: &str,
        query: Option<&str>,
        hdrs: &[(&str, &str)],
    ) -> Option<(String, usize)> {
        let mut h = HeaderMap::new();
        for (k, v) in hdrs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        sp.route(&method, path, query, &h)
            .map(|m| (m.rule.route.to_string(), m.rule.rule_index))
    }

    #[test]
    fn example_split_compiles() {
        let c = compile(SPLIT);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let sp = port(&c, "checkout");
        assert!(sp.default_rule.is_none());
        assert_eq!(sp.http.len(), 2);
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("1"));
        let m = sp.route(&Method::GET, "/api/cart", None, &h).unwrap();
        assert_eq!(m.rule.rule_index, 0);
        assert_eq!(m.prefix, Some("/api"));
        assert_eq!(m.rule.backends.entries.len(), 1);
        assert_eq!(&*m.rule.backends.entries[0].1.name, "shop/checkout-v2:8080");
        assert_eq!(m.rule.backends.entries[0].1.protocol, Protocol::H2c);

        let m = sp
            .route(&Method::GET, "/api", None, &HeaderMap::new())
            .unwrap();
        assert_eq!(m.rule.rule_index, 1);
        let w = &m.rule.backends;
        assert_eq!(w.total, 100);
        assert_eq!(&*w.pick(0).unwrap().name, "shop/checkout-v1:8080");
        assert_eq!(&*w.pick(89).unwrap().name, "shop/checkout-v1:8080");
        assert_eq!(&*w.pick(90).unwrap().name, "shop/checkout-v2:8080");
        assert_eq!(m.rule.timeouts.request, Some(Duration::from_secs(10)));
        assert_eq!(
            m.rule.timeouts.backend_request,
            Some(Duration::from_secs(2))
        );
        assert!(
            sp.route(&Method::GET, "/other", None, &HeaderMap::new())
                .is_none()
        );

        // Backends are deduplicated: checkout-v2:8080 is used by both rules.
        // The default rules of checkout-v1/v2 reuse the same two backends.
        assert_eq!(c.snapshot.backends.len(), 2);
        let names: Vec<_> = c
            .snapshot
            .backends
            .iter()
            .map(|b| b.name.to_string())
            .collect();
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len(), "{names:?}");
        for (i, b) in c.snapshot.backends.iter().enumerate() {
            assert_eq!(b.index, i);
        }
    }

    #[test]
    fn endpoints_ports_zones_regions() {
        let c = compile(SPLIT);
        let v1 = c
            .snapshot
            .backends
            .iter()
            .find(|b| &*b.name == "shop/checkout-v1:8080")
            .unwrap();
        assert_eq!(v1.protocol, Protocol::Http1);
        assert_eq!(v1.endpoints.len(), 2);
        assert_eq!(v1.endpoints[0].addr, "10.0.0.1:9000".parse().unwrap());
        assert!(v1.endpoints[0].ready);
        assert_eq!(v1.endpoints[0].zone.as_deref(), Some("eu-a"));
        assert_eq!(v1.endpoints[0].region.as_deref(), Some("eu"));
        assert!(!v1.endpoints[1].ready);
        // Single-port Service and single-port slice map even though the names differ.
        let v2 = c
            .snapshot
            .backends
            .iter()
            .find(|b| &*b.name == "shop/checkout-v2:8080")
            .unwrap();
        assert_eq!(v2.endpoints[0].addr, "10.0.1.1:9001".parse().unwrap());
    }

    #[test]
    fn default_rule_without_routes() {
        let c = compile("");
        let sp = port(&c, "checkout-v1");
        let rule = sp.default_rule.as_ref().unwrap();
        assert_eq!(rule.kind, RouteKind::Default);
        assert_eq!(&*rule.route, "shop/checkout-v1");
        let m = sp
            .route(&Method::GET, "/anything", None, &HeaderMap::new())
            .unwrap();
        assert_eq!(
            &*m.rule.backends.pick(0).unwrap().name,
            "shop/checkout-v1:8080"
        );
        let namespaces: Vec<&str> = c.snapshot.by_name["checkout"]
            .iter()
            .map(|s| s.id.namespace.as_str())
            .collect();
        assert_eq!(namespaces, ["shop"]);
    }

    #[test]
    fn http_precedence() {
        let rules = "  - matches:\n    - path: {type: RegularExpression, value: /a.*}\n    - path: {type: PathPrefix, value: /a}\n    - path: {type: PathPrefix, value: /a/b/}\n    - path: {type: Exact, value: /a/b}\n    - path: {value: /a/b}\n      method: GET\n    - path: {value: /a/b}\n      headers: [{name: x, value: \"1\"}]\n    - path: {value: /a/b}\n      headers: [{name: x, value: \"1\"}, {name: y, value: \"2\"}]\n    - path: {value: /a/b}\n      queryParams: [{name: q, value: v}]\n    backendRefs: [{name: checkout-v1, port: 8080}]\n";
        let c = compile(&route(rules));
        let sp = port(&c, "checkout");
        let order: Vec<String> = c.snapshot.json["services"][0]["ports"][0]["http"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["match"].to_string())
            .collect();
        assert_eq!(order.len(), 8);
        let kinds: Vec<_> = sp
            .http
            .iter()
            .map(|h| match &h.m.path {
                PathMatch::Exact(p) => format!("E{p}"),
                PathMatch::Prefix(p) => format!(
                    "P{p}|m{}|h{}|q{}",
                    h.m.method.is_some() as u8,
                    h.m.headers.len(),
                    h.m.query.len()
                ),
                PathMatch::Regex(_) => "R".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                "E/a/b",
                "P/a/b|m1|h0|q0",
                "P/a/b|m0|h2|q0",
                "P/a/b|m0|h1|q0",
                "P/a/b|m0|h0|q1",
                "P/a/b|m0|h0|q0",
                "P/a|m0|h0|q0",
                "R"
            ],
        );
        assert_eq!(
            pick(&sp, Method::GET, "/a/b/c", None, &[]),
            Some(("shop/r".into(), 0))
        );
    }

    #[test]
    fn older_route_wins_ties_then_name() {
        let mk = |name: &str, ts: Option<&str>, backend: &str| {
            let ts = ts
                .map(|t| format!(", creationTimestamp: \"{t}\""))
                .unwrap_or_default();
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop{ts}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: checkout}}]\n  rules: [{{backendRefs: [{{name: {backend}, port: 8080}}]}}]\n---\n"
            )
        };
        let yaml = mk("a-new", None, "checkout-v1")
            + &mk("z-old", Some("2020-01-01T00:00:00Z"), "checkout-v2")
            + &mk("b-new", None, "checkout-v1");
        let c = compile(&yaml);
        let sp = port(&c, "checkout");
        let routes: Vec<_> = sp.http.iter().map(|h| h.rule.route.to_string()).collect();
        assert_eq!(routes, vec!["shop/z-old", "shop/a-new", "shop/b-new"]);
    }

    #[test]
    fn grpc_precedence_and_routing() {
        let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: checkout}]\n  rules:\n  - matches: [{method: {method: Get}}]\n    backendRefs: [{name: checkout-v1, port: 8080}]\n  - matches: [{method: {service: pkg.Cart}}]\n    backendRefs: [{name: checkout-v1, port: 8080}]\n  - matches: [{method: {service: pkg.Cart, method: Get}}, {headers: [{name: x, value: y}]}]\n    backendRefs: [{name: checkout-v2, port: 8080}]\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: x-a, value: b}], remove: [x-c]}\n";
        let c = compile(yaml);
        let sp = port(&c, "checkout");
        let idx: Vec<_> = sp.grpc.iter().map(|g| g.rule.rule_index).collect();
        assert_eq!(idx, vec![2, 1, 0, 2]);
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        let m = sp.route(&Method::POST, "/pkg.Cart/Get", None, &h).unwrap();
        assert_eq!(m.rule.rule_index, 2);
        assert_eq!(m.rule.request_headers.set.len(), 1);
        assert_eq!(m.rule.kind, RouteKind::GRPCRoute);
        let m = sp.route(&Method::POST, "/pkg.Cart/Put", None, &h).unwrap();
        assert_eq!(m.rule.rule_index, 1);
        let m = sp.route(&Method::POST, "/other.Svc/Get", None, &h).unwrap();
        assert_eq!(m.rule.rule_index, 0);
    }

    #[test]
    fn filters_and_zero_timeouts() {
        let rules = "  - matches: [{path: {value: /old}}]\n    filters:\n    - type: URLRewrite\n      urlRewrite: {hostname: new.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {add: [{name: x-r, value: v}]}\n    backendRefs: [{name: checkout-v1, port: 8080}]\n    timeouts: {request: 0s}\n";
        let c = compile(&route(rules));
        let sp = port(&c, "checkout");
        let r = &sp.http[0].rule;
        let u = r.url_rewrite.as_ref().unwrap();
        assert_eq!(u.hostname.as_ref().unwrap(), "new.example");
        assert!(matches!(&u.path, Some(PathRewrite::ReplacePrefixMatch(p)) if p == "/new"));
        assert_eq!(r.response_headers.add.len(), 1);
        assert_eq!(r.timeouts, Timeouts::default());
    }

    #[test]
    fn version_ignores_file_names_and_order() {
        use crate::load_sources;
        let docs: Vec<&str> = crate::testutil::SHOP.split("\n---\n").collect();
        let a: Vec<(String, String)> = vec![
            ("a.yaml".into(), docs.join("\n---\n")),
            ("b.yaml".into(), SPLIT.into()),
        ];
        let mut rev = docs.clone();
        rev.reverse();
        let b: Vec<(String, String)> = vec![
            ("x.yaml".into(), SPLIT.into()),
            ("y.yml".into(), rev.join("\n---\n")),
        ];
        let va = load_sources(&a).unwrap().snapshot.version;
        let vb = load_sources(&b).unwrap().snapshot.version;
        assert_eq!(va, vb);
        assert_eq!(va.len(), 16);
        let changed = SPLIT.replace("weight: 90", "weight: 80");
        let vc = compile(&changed).snapshot.version;
        assert_ne!(va, vc);
    }

    fn only_rule(c: &crate::Compiled) -> Arc<Rule> {
        let sp = port(c, "checkout");
        let rule = sp.http.first().map(|h| &h.rule);
        let rule = rule.or(sp.grpc.first().map(|g| &g.rule));
        rule.expect("one rule").clone()
    }

    #[test]
    fn retry_defaults_and_values() {
        let c = compile(&route(
            "  - retry: {}\n    backendRefs: [{name: checkout-v1, port: 8080}]\n",
        ));
        assert_eq!(
            only_rule(&c).retry,
            Some(RetryPolicy {
                attempts: 2,
                backoff: Duration::from_millis(25),
                codes: vec![502, 503, 504],
                grpc_codes: vec![],
                non_idempotent: false,
            })
        );
        let c = compile(&route(
            "  - retry: {attempts: 0, backoff: 1s, codes: [504, 429, 504]}\n    backendRefs: [{name: checkout-v1, port: 8080}]\n",
        ));
        assert_eq!(
            only_rule(&c).retry,
            Some(RetryPolicy {
                attempts: 0,
                backoff: Duration::from_secs(1),
                codes: vec![429, 504],
                grpc_codes: vec![],
                non_idempotent: false,
            })
        );
        // An explicit empty list retries no status code.
        let c = compile(&route("  - retry: {codes: []}\n"));
        assert_eq!(
            only_rule(&c).retry.as_ref().unwrap().codes,
            Vec::<u16>::new()
        );
        // No retry field: None (the proxy still retries connect failures).
        let c = compile(&route(
            "  - backendRefs: [{name: checkout-v1, port: 8080}]\n",
        ));
        assert_eq!(only_rule(&c).retry, None);
    }

    #[test]
    fn grpc_retry_codes_and_defaults() {
        use crate::testutil::grpc_route;
        let c = compile(&grpc_route("  - retry: {}\n"));
        assert_eq!(
            only_rule(&c).retry,
            Some(RetryPolicy {
                attempts: 2,
                backoff: Duration::from_millis(25),
                codes: vec![],
                grpc_codes: vec![14],
                non_idempotent: true,
            })
        );
        let c = compile(&grpc_route(
            "  - retry: {attempts: 4, codes: [resource-exhausted, Unavailable, 14, 0, DEADLINE_EXCEEDED]}\n",
        ));
        let r = only_rule(&c).retry.clone().unwrap();
        assert_eq!((r.attempts, r.grpc_codes), (4, vec![0, 4, 8, 14]));
        assert!(r.codes.is_empty() && r.non_idempotent);
        let j = &c.snapshot.json["services"][0]["ports"][0]["grpc"][0]["rule"]["retry"];
        assert_eq!(
            j["grpcCodes"],
            json!([
                "OK",
                "DEADLINE_EXCEEDED",
                "RESOURCE_EXHAUSTED",
                "UNAVAILABLE"
            ])
        );
    }

    #[test]
    fn non_idempotent_annotation_applies_to_rules_with_retry() {
        let annotated = |v: &str| {
            route(
                "  - matches: [{path: {value: /a}}]\n    retry: {}\n  - matches: [{path: {value: /b}}]\n",
            )
            .replace(
                "namespace: shop}",
                &format!("namespace: shop, annotations: {{retry.tern.dev/non-idempotent: \"{v}\"}}}}"),
            )
        };
        let c = compile(&annotated("true"));
        let sp = port(&c, "checkout");
        let by_index = |i: usize| {
            sp.http
                .iter()
                .find(|h| h.rule.rule_index == i)
                .map(|h| h.rule.retry.clone())
                .unwrap()
        };
        assert!(by_index(0).unwrap().non_idempotent);
        assert_eq!(by_index(1), None, "the annotation does not add retries");
        let c = compile(&annotated("false"));
        let sp = port(&c, "checkout");
        assert!(
            !sp.http
                .iter()
                .any(|h| h.rule.retry.as_ref().is_some_and(|r| r.non_idempotent))
        );
    }

    fn backend_named<'a>(c: &'a crate::Compiled, name: &str) -> &'a Arc<Backend> {
        c.snapshot
            .backends
            .iter()
            .find(|b| &*b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    #[test]
    fn policy_defaults_and_values() {
        use crate::testutil::policy;
        // Only targetRefs: every setting is the default, and the source is named.
        let c = compile(&policy("p", "", "  targetRefs: [{name: checkout-v1}]\n"));
        let p = &backend_named(&c, "shop/checkout-v1:8080").policy;
        assert_eq!(
            **p,
            BackendPolicy {
                source: Some(ObjectRef {
                    namespace: "shop".into(),
                    name: "p".into()
                }),
                ..BackendPolicy::default()
            }
        );
        assert_eq!(p.circuit_breaker.failure_rate, None);
        // A backend no policy targets gets the defaults.
        assert_eq!(
            *backend_named(&c, "shop/checkout-v2:8080").policy,
            BackendPolicy::default()
        );
        // Every field given.
        let full = "  targetRefs: [{group: \"\", kind: Service, name: checkout-v1}]\n  retryBudget: {percent: 30, minRetriesPerSecond: 3, interval: 1m}\n  circuitBreaker:\n    consecutiveFailures: 7\n    failureRate: {percent: 40, minRequests: 10, interval: 30s}\n    ejection: {base: 1s, max: 1m, maxEjectedPercent: 100}\n    failureStatusCodes: [503, 500, 503]\n  limits: {maxConnections: 10, maxPendingRequests: 20, maxRequests: 30}\n";
        let c = compile(&policy("full", "", full));
        let p = &backend_named(&c, "shop/checkout-v1:8080").policy;
        assert_eq!(
            p.retry_budget,
            RetryBudget {
                percent: 30,
                min_retries_per_second: 3,
                interval: Duration::from_secs(60)
            }
        );
        assert_eq!(
            p.circuit_breaker,
            CircuitBreaker {
                consecutive_failures: Some(7),
                failure_rate: Some(FailureRate {
                    percent: 40,
                    min_requests: 10,
                    interval: Duration::from_secs(30)
                }),
                ejection: Ejection {
                    base: Duration::from_secs(1),
                    max: Duration::from_secs(60),
                    max_ejected_percent: 100
                },
                failure_status_codes: vec![500, 503],
            }
        );
        assert_eq!(
            p.limits,
            Limits {
                max_connections: 10,
                max_pending_requests: 20,
                max_requests: 30
            }
        );
        // Partial sections: 0 disables consecutive failures, `failureRate: {}` turns the
        // rate on with its defaults, an empty status list counts no status as a failure.
        let partial = "  targetRefs: [{name: checkout-v1}]\n  circuitBreaker: {consecutiveFailures: 0, failureRate: {}, ejection: {base: 1s}, failureStatusCodes: []}\n  limits: {maxRequests: 5}\n";
        let c = compile(&policy("partial", "", partial));
        let p = &backend_named(&c, "shop/checkout-v1:8080").policy;
        let cb = &p.circuit_breaker;
        assert_eq!(cb.consecutive_failures, None);
        assert_eq!(cb.failure_rate, Some(FailureRate::default()));
        assert_eq!(cb.ejection.base, Duration::from_secs(1));
        assert_eq!(cb.ejection.max, Ejection::default().max);
        assert!(cb.failure_status_codes.is_empty());
        assert_eq!(p.retry_budget, RetryBudget::default());
        assert_eq!(
            p.limits,
            Limits {
                max_requests: 5,
                ..Limits::default()
            }
        );
    }

    #[test]
    fn policy_precedence_section_then_age_then_name() {
        use crate::testutil::{MULTI, policy};
        let old = ", creationTimestamp: \"2020-01-01T00:00:00Z\"";
        let older = ", creationTimestamp: \"2019-01-01T00:00:00Z\"";
        let whole = "  targetRefs: [{name: multi}]\n";
        let grpc = "  targetRefs: [{name: multi, sectionName: grpc}]\n";
        let load = |docs: &[String]| {
            let yaml = MULTI.to_string() + "---\n" + &docs.join("---\n");
            crate::load_sources(&[("p.yaml".into(), yaml)]).unwrap_or_else(|e| panic!("{e}"))
        };
        let source = |c: &crate::Compiled, port: u16| {
            let b = backend_named(c, &format!("shop/multi:{port}"));
            b.policy.source.as_ref().map(|s| s.name.clone())
        };
        // The oldest service-wide policy wins; the newer one is warned about.
        let c = load(&[policy("a-new", "", whole), policy("z-old", old, whole)]);
        assert_eq!(source(&c, 80).as_deref(), Some("z-old"));
        assert_eq!(source(&c, 90).as_deref(), Some("z-old"));
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].message.contains("shop/z-old applies there"));
        // Same age: namespace/name order.
        let c = load(&[policy("b", old, whole), policy("a", old, whole)]);
        assert_eq!(source(&c, 80).as_deref(), Some("a"));
        // No timestamp counts as newest.
        let c = load(&[policy("a", "", whole), policy("b", old, whole)]);
        assert_eq!(source(&c, 80).as_deref(), Some("b"));
        // sectionName beats service-wide, even an older one; other ports keep the latter.
        let c = load(&[policy("svc", older, whole), policy("port", "", grpc)]);
        assert_eq!(source(&c, 80).as_deref(), Some("svc"));
        assert_eq!(source(&c, 90).as_deref(), Some("port"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // Between sectionName policies, the oldest again.
        let c = load(&[
            policy("p-new", "", grpc),
            policy("p-old", old, grpc),
            policy("svc", older, whole),
        ]);
        assert_eq!(source(&c, 90).as_deref(), Some("p-old"));
        assert_eq!(source(&c, 80).as_deref(), Some("svc"));
        // One Arc per policy, shared by the ports it governs.
        let c = load(&[policy("svc", "", whole)]);
        let (a, b) = (
            &backend_named(&c, "shop/multi:80").policy,
            &backend_named(&c, "shop/multi:90").policy,
        );
        assert!(Arc::ptr_eq(a, b));
        // A policy in another namespace does not reach the Service.
        let elsewhere = policy("svc", "", whole).replace("namespace: shop", "namespace: other");
        let c = load(&[elsewhere]);
        assert_eq!(source(&c, 80), None);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].message.contains("no Service other/multi"));
    }

    #[test]
    fn retry_and_policy_json_and_version() {
        use crate::testutil::policy;
        let rules = "  - retry: {attempts: 3, backoff: 100ms}\n    backendRefs: [{name: checkout-v1, port: 8080}]\n";
        let yaml = route(rules)
            + "---\n"
            + &policy(
                "p",
                "",
                "  targetRefs: [{name: checkout-v1}]\n  circuitBreaker: {failureRate: {percent: 60}}\n",
            );
        let c = compile(&yaml);
        let j = &c.snapshot.json;
        assert_eq!(
            j["services"][0]["ports"][0]["http"][0]["rule"]["retry"],
            json!({"attempts": 3, "backoff": "100ms", "codes": [502, 503, 504], "grpcCodes": [], "nonIdempotent": false})
        );
        let v1 = j["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "shop/checkout-v1:8080")
            .unwrap();
        assert_eq!(
            v1["policy"],
            json!({
                "source": "shop/p",
                "retryBudget": {"percent": 20, "minRetriesPerSecond": 10, "interval": "10s"},
                "circuitBreaker": {
                    "consecutiveFailures": 5,
                    "failureRate": {"percent": 60, "minRequests": 20, "interval": "10s"},
                    "ejection": {"base": "5s", "max": "120s", "maxEjectedPercent": 50},
                    "failureStatusCodes": [502, 503, 504],
                },
                "limits": {"maxConnections": 1024, "maxPendingRequests": 1024, "maxRequests": 1024},
                "loadBalancer": {
                    "algorithm": "P2CPeakEWMA",
                    "hash": null,
                    "locality": {"enabled": true, "minHealthyPercent": 70},
                },
                "concurrency": null,
            })
        );
        let v2 = j["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "shop/checkout-v2:8080")
            .unwrap();
        assert_eq!(v2["policy"]["source"], Value::Null);
        assert_eq!(v2["policy"]["circuitBreaker"]["failureRate"], Value::Null);
        // Policies, retries and annotations are part of the version.
        let base = c.snapshot.version.clone();
        for changed in [
            yaml.replace("percent: 60", "percent: 61"),
            yaml.replace("attempts: 3", "attempts: 4"),
            yaml.replace(
                "{name: r, namespace: shop}",
                "{name: r, namespace: shop, annotations: {a: b}}",
            ),
        ] {
            assert_ne!(compile(&changed).snapshot.version, base);
        }
    }

    #[test]
    fn json_rendering() {
        let c = compile(SPLIT);
        let j = &c.snapshot.json;
        assert_eq!(j["version"], c.snapshot.version.as_str());
        let port = &j["services"][0]["ports"][0];
        assert_eq!(j["services"][0]["service"], "shop/checkout");
        assert_eq!(
            port["http"][0]["match"]["headers"]["x-canary"]["value"],
            "1"
        );
        let second = &port["http"][1]["rule"];
        assert_eq!(second["backends"][0]["weight"], 90);
        assert_eq!(second["backends"][1]["weight"], 10);
        assert_eq!(second["timeouts"]["request"], "10s");
        assert_eq!(second["timeouts"]["backendRequest"], "2s");
        assert!(
            j["backends"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["endpoints"][0]["addr"] == "10.0.0.1:9000")
        );
    }
}

#[cfg(test)]
mod traffic_policy_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http::HeaderName;
    use serde_json::json;

    use crate::identity::SpiffeId;
    use crate::snapshot::*;
    use crate::testutil::{MULTI, policy, policy_of};

    const GW: &str = "group: gateway.networking.k8s.io";

    /// `MULTI`, an HTTPRoute `shop/r` on every port of it (rules `pay` and an unnamed
    /// one), a GRPCRoute `shop/g` on port 90, then `docs`.
    fn load(docs: &[String]) -> crate::Compiled {
        let routes = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: multi}]\n  rules:\n  - name: pay\n    matches: [{path: {value: /pay}}]\n  - {}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: multi, port: 90}]\n  rules: [{}]\n".to_string();
        let yaml = [MULTI.to_string(), routes]
            .into_iter()
            .chain(docs.iter().cloned())
            .collect::<Vec<_>>()
            .join("---\n");
        crate::load_sources(&[("p.yaml".into(), yaml)]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn port(c: &crate::Compiled, port: u16) -> Arc<ServicePort> {
        c.snapshot
            .resolve("multi.shop", Some(port), "shop")
            .unwrap()
            .clone()
    }

    /// The rules of HTTPRoute `r` on a port, by rule index.
    fn http_rules(sp: &ServicePort) -> Vec<Arc<Rule>> {
        let mut rules: Vec<Arc<Rule>> = sp.http.iter().map(|h| h.rule.clone()).collect();
        rules.sort_by_key(|r| r.rule_index);
        rules
    }

    fn source(r: &Option<Arc<RateLimit>>) -> Option<String> {
        r.as_ref().map(|r| r.source.name.clone())
    }

    fn backend_policy(c: &crate::Compiled, name: &str) -> Arc<BackendPolicy> {
        c.snapshot
            .backends
            .iter()
            .find(|b| &*b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
            .policy
            .clone()
    }

    #[test]
    fn load_balancer_and_concurrency_values_and_defaults() {
        let targets = "  targetRefs: [{name: checkout-v1}]\n";
        let one = |spec: &str| {
            let c = crate::testutil::compile(&policy("p", "", &format!("{targets}{spec}")));
            let p = backend_policy(&c, "shop/checkout-v1:8080");
            (c, p)
        };
        // Omitted: the defaults, no concurrency limit.
        let (_, p) = one("");
        assert_eq!(p.load_balancer, LoadBalancer::default());
        assert_eq!(p.load_balancer.algorithm, Algorithm::P2CPeakEWMA);
        assert_eq!(
            p.load_balancer.locality,
            Locality {
                enabled: true,
                min_healthy_percent: 70
            }
        );
        assert_eq!(p.concurrency, None);
        // Every field.
        let (c, p) = one(
            "  loadBalancer:\n    algorithm: Maglev\n    hash: {cookie: session}\n    locality: {enabled: false, minHealthyPercent: 50}\n  concurrency:\n    maxConcurrent: 100\n    maxQueue: 10\n    queueTimeout: 250ms\n    adaptive: {algorithm: AIMD, minLimit: 5, maxLimit: 500}\n",
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(
            p.load_balancer,
            LoadBalancer {
                algorithm: Algorithm::Maglev,
                hash: Some(HashKey::Cookie("session".into())),
                locality: Locality {
                    enabled: false,
                    min_healthy_percent: 50
                },
            }
        );
        assert_eq!(
            p.concurrency,
            Some(ConcurrencyLimit {
                max_concurrent: 100,
                max_queue: 10,
                queue_timeout: Duration::from_millis(250),
                adaptive: Some(Adaptive {
                    algorithm: AdaptiveAlgorithm::AIMD,
                    min_limit: 5,
                    max_limit: 500
                }),
            })
        );
        // Header names are lower-cased; the source IP.
        let (_, p) = one("  loadBalancer: {algorithm: RingHash, hash: {header: X-User}}\n");
        assert_eq!(
            p.load_balancer.hash,
            Some(HashKey::Header(HeaderName::from_static("x-user")))
        );
        let (_, p) = one("  loadBalancer: {algorithm: Maglev, hash: {sourceIP: true}}\n");
        assert_eq!(p.load_balancer.hash, Some(HashKey::SourceIP));
        // A hash with an algorithm that does not hash is dropped (and warned about).
        let (c, p) = one("  loadBalancer: {algorithm: LeastRequest, hash: {header: x}}\n");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert_eq!(p.load_balancer.algorithm, Algorithm::LeastRequest);
        assert_eq!(p.load_balancer.hash, None);
        // Concurrency defaults: no queue, 1s, Gradient between 1 and maxConcurrent.
        let (_, p) = one("  concurrency: {maxConcurrent: 50, adaptive: {}}\n");
        assert_eq!(
            p.concurrency,
            Some(ConcurrencyLimit {
                max_concurrent: 50,
                max_queue: 0,
                queue_timeout: Duration::from_secs(1),
                adaptive: Some(Adaptive {
                    algorithm: AdaptiveAlgorithm::Gradient,
                    min_limit: 1,
                    max_limit: 50
                }),
            })
        );
        let (_, p) = one("  concurrency: {maxConcurrent: 7}\n");
        assert_eq!(p.concurrency.as_ref().unwrap().adaptive, None);
    }

    #[test]
    fn rate_limit_on_service_ports_and_route_rules() {
        let rate = |name: &str, meta: &str, targets: &str, rest: &str| {
            policy_of(
                "RateLimitPolicy",
                name,
                meta,
                &format!("  targetRefs: {targets}\n  rate: {{requests: 10}}\n{rest}"),
            )
        };
        let c = load(&[
            rate("svc", "", "[{name: multi, sectionName: http}]", ""),
            rate(
                "route",
                "",
                &format!("[{{{GW}, kind: HTTPRoute, name: r}}]"),
                "  key: {header: X-Tenant}\n",
            ),
        ]);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let (p80, p90) = (port(&c, 80), port(&c, 90));
        // A Service target: the named port only, with the defaults filled in.
        assert_eq!(
            p80.rate_limit.as_deref(),
            Some(&RateLimit {
                source: ObjectRef {
                    namespace: "shop".into(),
                    name: "svc".into()
                },
                requests: 10,
                per: Duration::from_secs(1),
                burst: 0,
                key: RateLimitKey::All,
            })
        );
        assert_eq!(p90.rate_limit, None);
        // A route target: every rule of the route on every port it attaches to, one Arc.
        let rules: Vec<Arc<Rule>> = http_rules(&p80)
            .into_iter()
            .chain(http_rules(&p90))
            .collect();
        assert_eq!(rules.len(), 4);
        let first = rules[0].rate_limit.clone().unwrap();
        assert_eq!(
            first.key,
            RateLimitKey::Header(HeaderName::from_static("x-tenant"))
        );
        for r in &rules {
            assert!(Arc::ptr_eq(r.rate_limit.as_ref().unwrap(), &first));
        }
        // Not the GRPCRoute, not the route's rules' concurrency.
        assert_eq!(p90.grpc[0].rule.rate_limit, None);
        assert!(rules.iter().all(|r| r.concurrency.is_none()));

        // One policy on the Service and on a route: one Arc everywhere.
        let c = load(&[rate(
            "both",
            "",
            &format!("[{{name: multi}}, {{{GW}, kind: GRPCRoute, name: g}}]"),
            "  rate: {requests: 5, per: 1m, burst: 3}\n  key: Caller\n",
        )
        .replace("  rate: {requests: 10}\n", "")]);
        let p90 = port(&c, 90);
        let svc = p90.rate_limit.clone().unwrap();
        assert_eq!(
            (svc.requests, svc.per, svc.burst, &svc.key),
            (5, Duration::from_secs(60), 3, &RateLimitKey::Caller)
        );
        assert!(Arc::ptr_eq(&svc, port(&c, 80).rate_limit.as_ref().unwrap()));
        assert!(Arc::ptr_eq(
            &svc,
            p90.grpc[0].rule.rate_limit.as_ref().unwrap()
        ));
        assert!(http_rules(&p90).iter().all(|r| r.rate_limit.is_none()));
    }

    #[test]
    fn rate_limit_precedence() {
        let old = ", creationTimestamp: \"2020-01-01T00:00:00Z\"";
        let rate = |name: &str, meta: &str, targets: &str| {
            policy_of(
                "RateLimitPolicy",
                name,
                meta,
                &format!("  targetRefs: {targets}\n  rate: {{requests: 1}}\n"),
            )
        };
        let route = format!("[{{{GW}, kind: HTTPRoute, name: r}}]");
        let pay = format!("[{{{GW}, kind: HTTPRoute, name: r, sectionName: pay}}]");
        // Rule `pay` by sectionName beats the older route-wide policies; of those, the
        // oldest gets the other rule; the newer one is warned about.
        let c = load(&[
            rate("a-new", "", &route),
            rate("z-old", old, &route),
            rate("pay", "", &pay),
        ]);
        let rules = http_rules(&port(&c, 80));
        assert_eq!(source(&rules[0].rate_limit).as_deref(), Some("pay"));
        assert_eq!(source(&rules[1].rate_limit).as_deref(), Some("z-old"));
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].message.contains("shop/z-old applies there"),
            "{:?}",
            c.warnings
        );
        // Service ports: sectionName, then age, then name.
        let c = load(&[
            rate("b", old, "[{name: multi}]"),
            rate("a", old, "[{name: multi}]"),
            rate("grpc", "", "[{name: multi, sectionName: grpc}]"),
        ]);
        assert_eq!(source(&port(&c, 80).rate_limit).as_deref(), Some("a"));
        assert_eq!(source(&port(&c, 90).rate_limit).as_deref(), Some("grpc"));
    }

    #[test]
    fn concurrency_policy_on_route_rules() {
        let conc = |name: &str, meta: &str, targets: &str, spec: &str| {
            policy_of(
                "ConcurrencyPolicy",
                name,
                meta,
                &format!("  targetRefs: {targets}\n{spec}"),
            )
        };
        let c = load(&[
            conc(
                "http",
                "",
                &format!("[{{{GW}, kind: HTTPRoute, name: r}}]"),
                "  maxConcurrent: 20\n",
            ),
            conc(
                "grpc",
                "",
                &format!("[{{{GW}, kind: GRPCRoute, name: g}}]"),
                "  maxConcurrent: 30\n  maxQueue: 5\n  queueTimeout: 2s\n  adaptive: {algorithm: Gradient, minLimit: 10, maxLimit: 300}\n",
            ),
        ]);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let rules: Vec<Arc<Rule>> = http_rules(&port(&c, 80))
            .into_iter()
            .chain(http_rules(&port(&c, 90)))
            .collect();
        let first = rules[0].concurrency.clone().unwrap();
        assert_eq!(
            *first,
            ConcurrencyLimit {
                max_concurrent: 20,
                max_queue: 0,
                queue_timeout: Duration::from_secs(1),
                adaptive: None,
            }
        );
        for r in &rules {
            assert!(Arc::ptr_eq(r.concurrency.as_ref().unwrap(), &first));
            assert!(r.rate_limit.is_none());
        }
        assert_eq!(
            port(&c, 90).grpc[0].rule.concurrency.as_deref(),
            Some(&ConcurrencyLimit {
                max_concurrent: 30,
                max_queue: 5,
                queue_timeout: Duration::from_secs(2),
                adaptive: Some(Adaptive {
                    algorithm: AdaptiveAlgorithm::Gradient,
                    min_limit: 10,
                    max_limit: 300
                }),
            })
        );
        // By rule name; the rest of the route keeps the route-wide policy.
        let c = load(&[
            conc(
                "route",
                ", creationTimestamp: \"2020-01-01T00:00:00Z\"",
                &format!("[{{{GW}, kind: HTTPRoute, name: r}}]"),
                "  maxConcurrent: 20\n",
            ),
            conc(
                "pay",
                "",
                &format!("[{{{GW}, kind: HTTPRoute, name: r, sectionName: pay}}]"),
                "  maxConcurrent: 2\n",
            ),
        ]);
        let rules = http_rules(&port(&c, 80));
        assert_eq!(rules[0].concurrency.as_ref().unwrap().max_concurrent, 2);
        assert_eq!(rules[1].concurrency.as_ref().unwrap().max_concurrent, 20);
        // A Service's own default rule never has one.
        let c = crate::testutil::compile("");
        let sp = c.snapshot.resolve("checkout", Some(8080), "shop").unwrap();
        let default = sp.default_rule.as_ref().unwrap();
        assert!(default.concurrency.is_none() && default.rate_limit.is_none());
        assert!(sp.rate_limit.is_none());
    }

    #[test]
    fn json_and_version() {
        let docs = [
            policy_of(
                "RateLimitPolicy",
                "limit",
                "",
                "  targetRefs: [{name: multi, sectionName: http}]\n  rate: {requests: 100, per: 1s, burst: 20}\n  key: {header: x-tenant}\n",
            ),
            policy_of(
                "ConcurrencyPolicy",
                "conc",
                "",
                &format!(
                    "  targetRefs: [{{{GW}, kind: HTTPRoute, name: r, sectionName: pay}}]\n  maxConcurrent: 8\n  adaptive: {{algorithm: AIMD}}\n"
                ),
            ),
        ];
        let c = load(&docs);
        let j = &c.snapshot.json;
        let p80 = &j["services"][0]["ports"][0];
        assert_eq!(p80["port"], 80);
        let limit = json!({
            "source": "shop/limit",
            "requests": 100,
            "per": "1s",
            "burst": 20,
            "key": {"header": "x-tenant"},
        });
        assert_eq!(p80["rateLimit"], limit);
        assert_eq!(j["services"][0]["ports"][1]["rateLimit"], json!(null));
        let pay = p80["http"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["rule"]["rule"] == 0)
            .unwrap();
        assert_eq!(pay["rule"]["rateLimit"], json!(null));
        assert_eq!(
            pay["rule"]["concurrency"],
            json!({
                "maxConcurrent": 8,
                "maxQueue": 0,
                "queueTimeout": "1s",
                "adaptive": {"algorithm": "AIMD", "minLimit": 1, "maxLimit": 8},
            })
        );
        // A route-targeted rate limit in its rules.
        let routed = load(&[policy_of(
            "RateLimitPolicy",
            "per-route",
            "",
            &format!(
                "  targetRefs: [{{{GW}, kind: HTTPRoute, name: r}}]\n  rate: {{requests: 3}}\n  key: Route\n"
            ),
        )]);
        assert_eq!(
            routed.snapshot.json["services"][0]["ports"][1]["http"][0]["rule"]["rateLimit"],
            json!({"source": "shop/per-route", "requests": 3, "per": "1s", "burst": 0, "key": "Route"})
        );
        // BackendPolicy: the load balancer and the concurrency limit of a backend.
        let lb = policy(
            "lb",
            "",
            "  targetRefs: [{name: checkout-v1}]\n  loadBalancer: {algorithm: RingHash, hash: {header: x-user}, locality: {minHealthyPercent: 80}}\n  concurrency: {maxConcurrent: 100, maxQueue: 100, queueTimeout: 1500ms}\n",
        );
        let c2 = crate::testutil::compile(&lb);
        let v1 = c2.snapshot.json["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "shop/checkout-v1:8080")
            .unwrap()
            .clone();
        assert_eq!(
            v1["policy"]["loadBalancer"],
            json!({
                "algorithm": "RingHash",
                "hash": {"header": "x-user"},
                "locality": {"enabled": true, "minHealthyPercent": 80},
            })
        );
        assert_eq!(
            v1["policy"]["concurrency"],
            json!({"maxConcurrent": 100, "maxQueue": 100, "queueTimeout": "1500ms", "adaptive": null})
        );
        for (hash, want) in [
            ("{cookie: s}", json!({"cookie": "s"})),
            ("{sourceIP: true}", json!({"sourceIP": true})),
        ] {
            let yaml = lb.replace("{header: x-user}", hash);
            let c = crate::testutil::compile(&yaml);
            let b = &c.snapshot.json["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == "shop/checkout-v1:8080")
                .unwrap()["policy"]["loadBalancer"]["hash"];
            assert_eq!(*b, want);
        }
        // The new kinds and fields are part of the version.
        let base = c.snapshot.version.clone();
        for (i, from, to) in [
            (0, "burst: 20", "burst: 21"),
            (1, "maxConcurrent: 8", "maxConcurrent: 9"),
        ] {
            let mut changed = docs.clone();
            changed[i] = changed[i].replace(from, to);
            assert_ne!(load(&changed).snapshot.version, base);
        }
        assert_ne!(load(&docs[..1]).snapshot.version, base);
        let v = c2.snapshot.version.clone();
        let changed = lb.replace("minHealthyPercent: 80", "minHealthyPercent: 81");
        assert_ne!(crate::testutil::compile(&changed).snapshot.version, v);
    }

    fn authz(name: &str, meta: &str, targets: &str, allow: &str) -> String {
        policy_of(
            "AuthorizationPolicy",
            name,
            meta,
            &format!("  targetRefs: {targets}\n  allow: {allow}\n"),
        )
    }

    /// The names of the policies of an authorization, in order.
    fn names(a: &Option<Arc<Authorization>>) -> Option<Vec<String>> {
        a.as_ref()
            .map(|a| a.policies.iter().map(|p| p.name.to_string()).collect())
    }

    #[test]
    fn authorization_on_ports_and_rules() {
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let old = ", creationTimestamp: \"2020-01-01T00:00:00Z\"";
        let c = load(&[
            authz("svc", "", "[{name: multi}]", "[{meshed: true}]"),
            authz(
                "grpc-port",
                "",
                "[{name: multi, sectionName: grpc}]",
                "[{namespaces: [ops]}]",
            ),
            authz(
                "route",
                "",
                &format!("[{{{GW}, kind: HTTPRoute, name: r}}]"),
                &format!(
                    "[{{identities: [\"{web}\"], unauthenticated: false}}, {{namespaces: [shop, shop], identities: [\"{web}\"]}}]"
                ),
            ),
            authz(
                "pay",
                old,
                &format!("[{{{GW}, kind: HTTPRoute, name: r, sectionName: pay}}]"),
                "[]",
            ),
            // A second policy on the same target is no conflict: both apply.
            authz("svc-2", "", "[{name: multi}]", "[{unauthenticated: true}]"),
        ]);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let (http, grpc) = (port(&c, 80), port(&c, 90));
        let v = |names: &[&str]| Some(names.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        // Service targets: every port, plus the one named by sectionName; oldest first,
        // then by name.
        assert_eq!(names(&http.authorization), v(&["shop/svc", "shop/svc-2"]));
        assert_eq!(
            names(&grpc.authorization),
            v(&["shop/grpc-port", "shop/svc", "shop/svc-2"])
        );
        // Route targets: every rule, plus the one named by sectionName.
        let rules = http_rules(&http);
        assert_eq!(
            names(&rules[0].authorization),
            v(&["shop/pay", "shop/route"])
        );
        assert_eq!(names(&rules[1].authorization), v(&["shop/route"]));
        // One Authorization per set of policies, one Arc per policy, whatever the port.
        let rules90 = http_rules(&grpc);
        let a = |r: &Arc<Rule>| r.authorization.clone().unwrap();
        assert!(Arc::ptr_eq(&a(&rules[1]), &a(&rules90[1])));
        assert!(Arc::ptr_eq(&a(&rules[0]), &a(&rules90[0])));
        assert!(Arc::ptr_eq(
            &a(&rules[0]).policies[1],
            &a(&rules[1]).policies[0]
        ));
        assert!(Arc::ptr_eq(
            &http.authorization.as_ref().unwrap().policies[0],
            &grpc.authorization.as_ref().unwrap().policies[1]
        ));
        // No policy on the GRPCRoute.
        assert!(grpc.grpc[0].rule.authorization.is_none());
        // Clauses flattened into principals, duplicates removed; `allow: []` allows nobody.
        let id = SpiffeId::parse(web).unwrap();
        assert_eq!(
            a(&rules[1]).policies[0].allow,
            vec![
                Principal::Identity(id.clone()),
                Principal::Namespace("shop".into())
            ]
        );
        assert!(a(&rules[0]).policies[0].allow.is_empty());
        // End to end: the route's policy lets web in; `pay` adds nothing; the Service's
        // policies also apply (svc-2 lets anyone in).
        let decision = authorize(
            http.authorization.as_deref(),
            rules[0].authorization.as_deref(),
            Some(&id),
        );
        assert!(matches!(decision, Decision::Allowed(p) if &*p.name == "shop/route"));
        let decision = authorize(
            http.authorization.as_deref(),
            rules[0].authorization.as_deref(),
            None,
        );
        assert!(matches!(decision, Decision::Allowed(p) if &*p.name == "shop/svc-2"));
        // JSON.
        let port_json = &c.snapshot.json["services"][0]["ports"][0];
        assert_eq!(port_json["mtls"], "permissive");
        assert_eq!(
            port_json["authorization"],
            json!([
                {"source": "shop/svc", "allow": ["Meshed"]},
                {"source": "shop/svc-2", "allow": ["Unauthenticated"]},
            ])
        );
        let rule_json = port_json["http"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| &h["rule"]["authorization"])
            .find(|a| a.as_array().is_some_and(|a| a.len() == 1))
            .unwrap();
        assert_eq!(
            *rule_json,
            json!([{"source": "shop/route", "allow": [{"identity": web}, {"namespace": "shop"}]}])
        );
        // Without policies: no authorization at all, and the version changes with them.
        let bare = load(&[]);
        assert!(port(&bare, 80).authorization.is_none());
        assert!(
            http_rules(&port(&bare, 80))
                .iter()
                .all(|r| r.authorization.is_none())
        );
        assert_ne!(bare.snapshot.version, c.snapshot.version);
    }

    const ADDRESSED: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: a
  namespace: shop
  annotations: {tern.dev/mtls-mode: strict}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: admin, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop, annotations: {tern.dev/mtls-mode: permissive}}
spec: {clusterIP: None, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: c, namespace: dev}
spec: {clusterIP: "fd00::10", ports: [{port: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: a-1
  namespace: shop
  labels: {kubernetes.io/service-name: a}
  annotations: {tern.dev/service-account: a-sa}
addressType: IPv4
endpoints: [{addresses: [10.1.0.1, 10.1.0.2]}]
ports: [{name: http, port: 8080}, {name: admin, port: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b-1, namespace: shop, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.3, 10.1.0.4]}]
ports: [{port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: c-1, namespace: dev, labels: {kubernetes.io/service-name: c}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.3]}]
ports: [{port: 8080}]
"#;

    #[test]
    fn resolve_addr_mtls_and_endpoint_identity() {
        let c = crate::load_sources(&[("a.yaml".into(), ADDRESSED.into())])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let s = &c.snapshot;
        let at = |addr: &str| {
            s.resolve_addr(addr.parse().unwrap())
                .map(|sp| format!("{}:{}", sp.service, sp.port))
        };
        // clusterIP and port.
        assert_eq!(at("10.96.0.10:80").as_deref(), Some("shop/a:80"));
        assert_eq!(at("10.96.0.10:9000").as_deref(), Some("shop/a:9000"));
        assert_eq!(at("[fd00::10]:8080").as_deref(), Some("dev/c:8080"));
        assert_eq!(at("10.96.0.10:81"), None);
        // Endpoint addresses, each to its own Service port.
        assert_eq!(at("10.1.0.1:8080").as_deref(), Some("shop/a:80"));
        assert_eq!(at("10.1.0.2:9090").as_deref(), Some("shop/a:9000"));
        assert_eq!(at("10.1.0.1:9000"), None);
        // Headless: no clusterIP, endpoints still resolve.
        assert_eq!(at("10.1.0.4:8080").as_deref(), Some("shop/b:8080"));
        // An address of two Services: the first by namespace/name.
        assert_eq!(at("10.1.0.3:8080").as_deref(), Some("dev/c:8080"));
        assert_eq!(at("10.9.9.9:80"), None);
        // From a dual-stack socket; IPv6 scope ids do not matter.
        assert_eq!(at("[::ffff:10.96.0.10]:80").as_deref(), Some("shop/a:80"));
        assert_eq!(at("[fd00::10%3]:8080").as_deref(), Some("dev/c:8080"));
        assert_eq!(s.by_addr.len(), 3 + 6);

        // mTLS modes (permissive by default).
        let mode = |host: &str, p: u16| s.resolve(host, Some(p), "shop").unwrap().mtls;
        assert_eq!(mode("a", 80), MtlsMode::Strict);
        assert_eq!(mode("a", 9000), MtlsMode::Strict);
        assert_eq!(mode("b", 8080), MtlsMode::Permissive);
        assert_eq!(mode("c.dev", 8080), MtlsMode::Permissive);

        // Endpoint identities from the slice annotation, one Arc per slice and port.
        let endpoints = |name: &str| {
            s.backends
                .iter()
                .find(|b| &*b.name == name)
                .unwrap_or_else(|| panic!("no backend {name}"))
                .endpoints
                .clone()
        };
        let a80 = endpoints("shop/a:80");
        let want = EndpointIdentity {
            namespace: "shop".into(),
            service_account: "a-sa".into(),
        };
        assert_eq!(a80.len(), 2);
        assert!(a80.iter().all(|e| e.identity.as_deref() == Some(&want)));
        assert!(Arc::ptr_eq(
            a80[0].identity.as_ref().unwrap(),
            a80[1].identity.as_ref().unwrap()
        ));
        assert!(
            endpoints("shop/b:8080")
                .iter()
                .all(|e| e.identity.is_none())
        );
        let backend = c.snapshot.json["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "shop/a:80")
            .unwrap();
        assert_eq!(
            backend["endpoints"][0]["identity"],
            json!({"namespace": "shop", "serviceAccount": "a-sa"})
        );
        assert_eq!(c.snapshot.json["services"][1]["ports"][0]["mtls"], "strict");
    }
}
