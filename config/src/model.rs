//! The typed resources Tern reads, as decoded from YAML (before semantic validation).
//!
//! Values stay close to what the user wrote (durations, regexes and header names are
//! still strings) so that [`crate::validate`] can report on them with locations and
//! [`crate::compile`] can build the snapshot. `Serialize` gives the canonical rendering
//! the snapshot version is hashed from.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::diag::Loc;
use crate::snapshot::{AdaptiveAlgorithm, Algorithm};
use crate::yaml::LocMap;

/// The Gateway API group of routes (as a policy target).
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The kinds Tern reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Service,
    EndpointSlice,
    HTTPRoute,
    GRPCRoute,
    BackendPolicy,
    RateLimitPolicy,
    ConcurrencyPolicy,
    AuthorizationPolicy,
}

impl Kind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [Kind; 8] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::HTTPRoute,
        Kind::GRPCRoute,
        Kind::BackendPolicy,
        Kind::RateLimitPolicy,
        Kind::ConcurrencyPolicy,
        Kind::AuthorizationPolicy,
    ];

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::HTTPRoute | Kind::GRPCRoute => "gateway.networking.k8s.io/v1",
            Kind::BackendPolicy
            | Kind::RateLimitPolicy
            | Kind::ConcurrencyPolicy
            | Kind::AuthorizationPolicy => "policy.tern.dev/v1alpha1",
        }
    }

    pub fn from_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.to_string() == kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identity of a resource in a [`crate::resources::Resources`] set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Where a resource came from: its file and the location of each of its nodes.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: Arc<str>,
    pub locs: Arc<LocMap>,
}

impl Source {
    pub fn loc(&self, path: &str) -> Loc {
        self.locs.get(path)
    }
}

/// One decoded resource with its source.
#[derive(Debug, Clone)]
pub struct Object {
    pub resource: Resource,
    pub source: Source,
}

impl Object {
    pub fn key(&self) -> Key {
        let meta = self.resource.meta();
        Key {
            kind: self.resource.kind(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub enum Resource {
    Service(Service),
    EndpointSlice(EndpointSlice),
    HTTPRoute(HttpRoute),
    GRPCRoute(GrpcRoute),
    BackendPolicy(Box<BackendPolicy>),
    RateLimitPolicy(Box<RateLimitPolicy>),
    ConcurrencyPolicy(Box<ConcurrencyPolicy>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Service(_) => Kind::Service,
            Resource::EndpointSlice(_) => Kind::EndpointSlice,
            Resource::HTTPRoute(_) => Kind::HTTPRoute,
            Resource::GRPCRoute(_) => Kind::GRPCRoute,
            Resource::BackendPolicy(_) => Kind::BackendPolicy,
            Resource::RateLimitPolicy(_) => Kind::RateLimitPolicy,
            Resource::ConcurrencyPolicy(_) => Kind::ConcurrencyPolicy,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    pub fn meta(&self) -> &Meta {
        match self {
            Resource::Service(r) => &r.meta,
            Resource::EndpointSlice(r) => &r.meta,
            Resource::HTTPRoute(r) => &r.meta,
            Resource::GRPCRoute(r) => &r.meta,
            Resource::BackendPolicy(r) => &r.meta,
            Resource::RateLimitPolicy(r) => &r.meta,
            Resource::ConcurrencyPolicy(r) => &r.meta,
            Resource::AuthorizationPolicy(r) => &r.meta,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Meta {
    pub name: String,
    pub namespace: String,
    /// RFC 3339, as written; orders routes by age.
    pub creation_timestamp: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub meta: Meta,
    pub ports: Vec<ServicePort>,
    /// `spec.clusterIP` as written (`None`, the headless marker, included); checked by
    /// validation.
    pub cluster_ip: Option<String>,
    /// Some port failed to decode (already reported), so "no such port" checks against
    /// this Service would only repeat that error.
    #[serde(skip)]
    pub incomplete: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: i64,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointSlice {
    pub meta: Meta,
    pub address_type: String,
    pub endpoints: Vec<EndpointSpec>,
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointSpec {
    pub addresses: Vec<String>,
    /// `conditions.ready`; absent means ready.
    pub ready: bool,
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i64>,
    pub app_protocol: Option<String>,
}

/// A `parentRefs[]` entry. Only Service parents (GAMMA) are used.
#[derive(Debug, Clone, Serialize)]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    /// Defaults to the route's namespace.
    pub namespace: String,
    pub name: String,
    pub port: Option<i64>,
}

impl ParentRef {
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub port: Option<i64>,
    pub weight: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRoute {
    pub meta: Meta,
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<HttpRule>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRule {
    /// `name`: what a policy's targetRef `sectionName` names.
    pub name: Option<String>,
    /// Never empty: a rule without matches gets one `PathPrefix /` match.
    pub matches: Vec<HttpRouteMatch>,
    pub filters: Vec<Filter>,
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

/// A rule's `retry` (Gateway API on HTTPRoute, Tern's extension on GRPCRoute), as
/// written; absent fields take their defaults when compiled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Retry {
    pub attempts: Option<i64>,
    pub backoff: Option<String>,
    /// `None` when omitted (the defaults apply); `Some(vec![])` for an explicit `[]`.
    pub codes: Option<Vec<RetryCode>>,
}

/// One entry of `retry.codes`: HTTP statuses are numbers; gRPC codes are numbers or names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RetryCode {
    Number(i64),
    Name(String),
    /// Neither (already reported); kept so that list positions match the YAML.
    Invalid,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PathType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MatchType {
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRouteMatch {
    pub path_type: PathType,
    pub path: String,
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

impl Default for HttpRouteMatch {
    fn default() -> Self {
        HttpRouteMatch {
            path_type: PathType::PathPrefix,
            path: "/".into(),
            headers: vec![],
            query_params: vec![],
            method: None,
        }
    }
}

/// A header or query parameter match.
#[derive(Debug, Clone, Serialize)]
pub struct ValueMatch {
    pub match_type: MatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Serialize)]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    URLRewrite(UrlRewrite),
    /// A valid Gateway API filter Tern does not implement (warned about, ignored).
    Unsupported(String),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Serialize)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct GrpcRoute {
    pub meta: Meta,
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<GrpcRule>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrpcRule {
    /// `name`: what a policy's targetRef `sectionName` names.
    pub name: Option<String>,
    /// Never empty: a rule without matches gets one match-everything entry.
    pub matches: Vec<GrpcRouteMatch>,
    pub filters: Vec<Filter>,
    pub backend_refs: Vec<BackendRef>,
    /// Tern's extension: retry on gRPC status codes.
    pub retry: Option<Retry>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    pub headers: Vec<ValueMatch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrpcMethodMatch {
    pub match_type: MatchType,
    pub service: Option<String>,
    pub method: Option<String>,
}

/// A `BackendPolicy` (`policy.tern.dev/v1alpha1`): retry budget, circuit breaker and
/// limits for the Services it targets. Every setting is optional (defaults in
/// [`crate::snapshot`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackendPolicy {
    pub meta: Meta,
    pub target_refs: Vec<PolicyTargetRef>,
    pub retry_budget: Option<RetryBudgetSpec>,
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    pub limits: Option<LimitsSpec>,
    pub load_balancer: Option<LoadBalancerSpec>,
    pub concurrency: Option<ConcurrencySpec>,
}

/// A `targetRefs[]` entry of a Tern policy: an object in the policy's namespace (a
/// Service, or a route for the kinds that take routes), optionally one section of it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyTargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    /// A Service port name or a route rule name; `None` targets the whole object.
    pub section_name: Option<String>,
}

impl PolicyTargetRef {
    /// The kind of object named, if it is one a policy can target at all (Service,
    /// HTTPRoute or GRPCRoute); whether this policy kind takes it is checked apart.
    pub fn target_kind(&self) -> Option<Kind> {
        match (self.group.as_str(), self.kind.as_str()) {
            ("", "Service") => Some(Kind::Service),
            (GATEWAY_GROUP, "HTTPRoute") => Some(Kind::HTTPRoute),
            (GATEWAY_GROUP, "GRPCRoute") => Some(Kind::GRPCRoute),
            _ => None,
        }
    }

    /// `Deployment`, `apps/Deployment`: the group/kind as shown in messages.
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}/{}", self.group, self.kind)
        }
    }
}

/// A `RateLimitPolicy` (`policy.tern.dev/v1alpha1`): a token bucket for the Services or
/// routes it targets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RateLimitPolicy {
    pub meta: Meta,
    pub target_refs: Vec<PolicyTargetRef>,
    /// Required (reported when missing).
    pub rate: Option<RateSpec>,
    /// `None` when omitted (`All`) or invalid (already reported).
    pub key: Option<RateLimitKeySpec>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RateSpec {
    pub requests: Option<i64>,
    pub per: Option<String>,
    pub burst: Option<i64>,
}

/// `spec.key` of a RateLimitPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RateLimitKeySpec {
    All,
    Route,
    Caller,
    Header(String),
}

/// A `ConcurrencyPolicy` (`policy.tern.dev/v1alpha1`): a concurrency limit for every rule
/// of the routes it targets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConcurrencyPolicy {
    pub meta: Meta,
    pub target_refs: Vec<PolicyTargetRef>,
    /// The rest of `spec`.
    pub limit: ConcurrencySpec,
}

/// An `AuthorizationPolicy` (`policy.tern.dev/v1alpha1`): who may call the Services or
/// routes it targets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuthorizationPolicy {
    pub meta: Meta,
    pub target_refs: Vec<PolicyTargetRef>,
    /// `spec.allow`: a request is allowed if any clause matches; empty denies everything.
    pub allow: Vec<AllowClause>,
}

/// One `spec.allow[]` clause of an AuthorizationPolicy: matches if any of its fields does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AllowClause {
    /// Exact SPIFFE IDs, as written (checked by validation). `None` entries did not
    /// decode (already reported); kept so that positions match.
    pub identities: Vec<Option<String>>,
    /// Any authenticated identity in these namespaces (`None`: as for `identities`).
    pub namespaces: Vec<Option<String>>,
    /// `meshed: true`: any authenticated identity.
    pub meshed: bool,
    /// `unauthenticated: true`: anyone, plaintext included.
    pub unauthenticated: bool,
    /// Part of the clause did not decode (already reported): it is not reported as empty.
    #[serde(skip)]
    pub incomplete: bool,
}

impl AllowClause {
    /// Whether the clause can match anything at all.
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
            && self.namespaces.is_empty()
            && !self.meshed
            && !self.unauthenticated
    }
}

/// `BackendPolicy.spec.concurrency`, or a ConcurrencyPolicy's `spec`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConcurrencySpec {
    /// Required (reported when missing).
    pub max_concurrent: Option<i64>,
    pub max_queue: Option<i64>,
    pub queue_timeout: Option<String>,
    pub adaptive: Option<AdaptiveSpec>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AdaptiveSpec {
    /// `None` when omitted (Gradient) or invalid (already reported).
    pub algorithm: Option<AdaptiveAlgorithm>,
    pub min_limit: Option<i64>,
    pub max_limit: Option<i64>,
}

/// `BackendPolicy.spec.loadBalancer`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadBalancerSpec {
    /// `None` when omitted (the default) or invalid.
    pub algorithm: Option<Algorithm>,
    /// `algorithm` was given but is not one Tern knows (already reported): checks that
    /// depend on the algorithm are skipped.
    #[serde(skip)]
    pub invalid_algorithm: bool,
    pub hash: Option<HashSpec>,
    pub locality: Option<LocalitySpec>,
}

/// `loadBalancer.hash`: exactly one of `header`, `cookie` or `sourceIP`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HashSpec {
    Header(String),
    Cookie(String),
    SourceIP(bool),
    /// Did not decode (already reported).
    Invalid,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LocalitySpec {
    pub enabled: Option<bool>,
    pub min_healthy_percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RetryBudgetSpec {
    pub percent: Option<i64>,
    pub min_retries_per_second: Option<i64>,
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CircuitBreakerSpec {
    pub consecutive_failures: Option<i64>,
    pub failure_rate: Option<FailureRateSpec>,
    pub ejection: Option<EjectionSpec>,
    /// `None` entries did not decode (already reported); kept so that positions match.
    pub failure_status_codes: Option<Vec<Option<i64>>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FailureRateSpec {
    pub percent: Option<i64>,
    pub min_requests: Option<i64>,
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EjectionSpec {
    pub base: Option<String>,
    pub max: Option<String>,
    pub max_ejected_percent: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LimitsSpec {
    pub max_connections: Option<i64>,
    pub max_pending_requests: Option<i64>,
    pub max_requests: Option<i64>,
}
