//! The compiled, immutable routing snapshot: what a sidecar reads on every request.
//!
//! Everything here is lookup-ready: header names are parsed, regexes compiled, weights
//! accumulated and rules sorted by Gateway API precedence when the snapshot is built, so
//! the per-request work is comparisons only. Nothing in a snapshot is mutated after
//! compilation; state that learns from traffic (balancer cursors, breakers) lives in the
//! proxy, keyed by [`Backend::index`] or [`Backend::name`].

use std::collections::HashMap;

// FxHash for the maps looked up per request or connection: their keys come from config,
// not from clients, so a fast non-keyed hash is safe (SipHash was ~30 % of a lookup).
use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::identity::SpiffeId;

/// Namespace + name of a Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How the proxy talks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (appProtocol `kubernetes.io/h2c` or `grpc`).
    H2c,
}

/// The compiled routing table of a whole config directory.
#[derive(Debug)]
pub struct Snapshot {
    /// Content version: a hash of the normalised input, stable across reorderings of
    /// files and documents. Equal content gives an equal version.
    pub version: String,
    /// Every Service, by namespace/name.
    pub services: HashMap<ObjectRef, Arc<Service>>,
    /// Every Service by name, sorted by namespace: the per-request lookup index (a
    /// hostname resolves without building an owned key).
    pub by_name: FxHashMap<String, Vec<Arc<Service>>>,
    /// Every backend, indexed by [`Backend::index`] (dense, 0..backends.len()).
    pub backends: Vec<Arc<Backend>>,
    /// Each Service's backends by port (indexes into `backends`), for [`Snapshot::backend_of`].
    pub backend_ids: FxHashMap<ObjectRef, Vec<(u16, usize)>>,
    /// Service ports by address, for [`Snapshot::resolve_addr`]: every Service's
    /// clusterIP:port, then every endpoint address of a Service port not already taken
    /// (an address of several Service ports goes to the first by namespace, name, port).
    pub by_addr: FxHashMap<SocketAddr, Arc<ServicePort>>,
    /// A JSON rendering of the snapshot for `/config` and `ternctl`.
    pub json: serde_json::Value,
}

#[derive(Debug)]
pub struct Service {
    pub id: ObjectRef,
    pub ports: Vec<Arc<ServicePort>>,
}

/// One port of a Service with the routes attached to it.
#[derive(Debug)]
pub struct ServicePort {
    pub service: ObjectRef,
    pub port: u16,
    pub name: Option<String>,
    pub protocol: Protocol,
    /// HTTP rules from every HTTPRoute attached to this port, one entry per match, sorted by
    /// Gateway API precedence. Empty when no HTTPRoute is attached.
    pub http: Vec<HttpRuleMatch>,
    /// `http` indexed by first path segment, for long rule lists.
    pub http_index: HttpIndex,
    /// GRPCRoute rules, one entry per match, sorted by precedence. Tried before `http` for
    /// requests whose content-type is `application/grpc*`.
    pub grpc: Vec<GrpcRuleMatch>,
    /// Used when no route at all is attached to this port: the Service's own endpoints.
    /// `None` when routes are attached (then an unmatched request is a 404).
    pub default_rule: Option<Arc<Rule>>,
    /// A RateLimitPolicy targeting the Service (all its ports, or this one by
    /// sectionName); enforced by the Service's inbound sidecars.
    pub rate_limit: Option<Arc<RateLimit>>,
    /// Every AuthorizationPolicy targeting the Service (all its ports, or this one by
    /// sectionName); `None`: none. Enforced by the Service's inbound sidecars with
    /// [`authorize`].
    pub authorization: Option<Arc<Authorization>>,
    /// Whether the Service's inbound sidecars accept plaintext (annotation
    /// `tern.dev/mtls-mode`).
    pub mtls: MtlsMode,
}

/// What a Service's inbound sidecar accepts (annotation `tern.dev/mtls-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// mTLS and plaintext (the default, for migrations).
    #[default]
    Permissive,
    /// mTLS only: plaintext connections are refused.
    Strict,
}

/// Who an [`AuthorizationPolicy`] lets in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// Exactly this client identity (trust domain included).
    Identity(SpiffeId),
    /// Any authenticated client in this namespace.
    Namespace(String),
    /// Any authenticated client.
    Meshed,
    /// Anyone, plaintext clients included.
    Unauthenticated,
}

impl Principal {
    /// Whether a client with identity `client` (`None`: not authenticated) is this.
    #[inline]
    pub fn allows(&self, client: Option<&SpiffeId>) -> bool {
        match self {
            Principal::Identity(id) => client == Some(id),
            Principal::Namespace(ns) => client.is_some_and(|c| c.namespace == *ns),
            Principal::Meshed => client.is_some(),
            Principal::Unauthenticated => true,
        }
    }
}

/// A compiled `AuthorizationPolicy`: every principal of every `allow` clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// `namespace/name` of the policy.
    pub name: Arc<str>,
    /// A client any of these allows is allowed; empty (`allow: []`) allows nobody.
    pub allow: Vec<Principal>,
}

impl AuthorizationPolicy {
    /// Whether this policy lets `client` in.
    #[inline]
    pub fn allows(&self, client: Option<&SpiffeId>) -> bool {
        self.allow.iter().any(|p| p.allows(client))
    }
}

/// The AuthorizationPolicies of one Service port or one route rule (all of them: they
/// add up, none wins over another).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// Never empty; sorted by policy age, then `namespace/name`.
    pub policies: Vec<Arc<AuthorizationPolicy>>,
}

impl Authorization {
    /// The first policy that lets `client` in (`None`: the client is not
    /// authenticated); `None` if none does. Allocation-free.
    #[inline]
    pub fn decide(&self, client: Option<&SpiffeId>) -> Option<&AuthorizationPolicy> {
        self.policies
            .iter()
            .map(Arc::as_ref)
            .find(|p| p.allows(client))
    }
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// No AuthorizationPolicy targets the Service or the matched route: anyone may call.
    Unrestricted,
    /// This policy lets the client in.
    Allowed(&'a AuthorizationPolicy),
    /// Policies apply and none lets the client in.
    Denied,
}

/// The decision for a request: `service` = [`ServicePort::authorization`], `route` =
/// [`Rule::authorization`] of the matched rule (if any), `client` = the client's mTLS
/// identity (`None`: plaintext or not authenticated).
///
/// No policy on either: [`Decision::Unrestricted`]. Otherwise the request is allowed iff
/// a policy targeting the Service or the matched route allows it (the route's policies
/// are asked first, so `Allowed` names the more specific one). Allocation-free.
#[inline]
pub fn authorize<'a>(
    service: Option<&'a Authorization>,
    route: Option<&'a Authorization>,
    client: Option<&SpiffeId>,
) -> Decision<'a> {
    if service.is_none() && route.is_none() {
        return Decision::Unrestricted;
    }
    route
        .and_then(|a| a.decide(client))
        .or_else(|| service.and_then(|a| a.decide(client)))
        .map_or(Decision::Denied, Decision::Allowed)
}

/// Positions in [`ServicePort::http`] by the first segment of the path they can match.
///
/// An `Exact` or (segment-wise) `PathPrefix` match other than `/` only matches paths with
/// the same first segment as its own, so a request need only try those entries plus the
/// ones that can match anything (`/` prefixes, regexes), merged in precedence order: the
/// same answer as a linear scan. Built only for long lists, where it pays.
#[derive(Debug, Default)]
pub struct HttpIndex {
    /// `None`: the list is short, scan it.
    by_segment: Option<FxHashMap<String, Vec<u32>>>,
    /// Entries any path may match, in order.
    anywhere: Vec<u32>,
}

/// Lists shorter than this are scanned: a hash lookup costs more than a few comparisons.
const INDEX_FROM: usize = 16;

fn first_segment(path: &str) -> &str {
    let rest = path.strip_prefix('/').unwrap_or(path);
    rest.split('/').next().unwrap_or("")
}

impl HttpIndex {
    pub fn build(http: &[HttpRuleMatch]) -> Self {
        if http.len() < INDEX_FROM {
            return HttpIndex::default();
        }
        let mut by_segment: FxHashMap<String, Vec<u32>> = FxHashMap::default();
        let mut anywhere = Vec::new();
        for (i, entry) in http.iter().enumerate() {
            let i = i as u32;
            match &entry.m.path {
                PathMatch::Exact(p) => by_segment
                    .entry(first_segment(p).into())
                    .or_default()
                    .push(i),
                PathMatch::Prefix(p) if p != "/" => by_segment
                    .entry(first_segment(p).into())
                    .or_default()
                    .push(i),
                _ => anywhere.push(i),
            }
        }
        HttpIndex {
            by_segment: Some(by_segment),
            anywhere,
        }
    }

    /// Calls `f` on the positions that may match `path`, in precedence order, until it
    /// returns `Some`. `None` from the index itself means: scan everything.
    fn find<T>(&self, path: &str, mut f: impl FnMut(usize) -> Option<T>) -> Option<Option<T>> {
        let by_segment = self.by_segment.as_ref()?;
        let segment: &[u32] = by_segment
            .get(first_segment(path))
            .map_or(&[], Vec::as_slice);
        let (mut a, mut b) = (segment.iter().peekable(), self.anywhere.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => return Some(None),
            };
            if let Some(i) = next
                && let Some(found) = f(*i as usize)
            {
                return Some(Some(found));
            }
        }
    }
}

/// The action part of a route rule, shared by all its matches.
#[derive(Debug)]
pub struct Rule {
    /// Metric/route label: `namespace/route-name` (or `namespace/service` for the default rule).
    pub route: Arc<str>,
    /// Index of the rule inside its route (`spec.rules[i]`); 0 for the default rule.
    pub rule_index: usize,
    pub kind: RouteKind,
    pub backends: WeightedBackends,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub url_rewrite: Option<UrlRewrite>,
    pub timeouts: Timeouts,
    /// HTTPRoute `retry` (or Tern's `retry` on GRPCRoute rules). `None`: only attempts
    /// that never reached the upstream (connect failures) are retried.
    pub retry: Option<RetryPolicy>,
    /// A RateLimitPolicy targeting this rule's route; enforced by the server's inbound
    /// sidecar.
    pub rate_limit: Option<Arc<RateLimit>>,
    /// A ConcurrencyPolicy targeting this rule's route; enforced by the calling sidecar.
    pub concurrency: Option<Arc<ConcurrencyLimit>>,
    /// Every AuthorizationPolicy targeting this rule's route (all of its rules, or this
    /// one by sectionName); enforced by the server's inbound sidecar with [`authorize`].
    /// Rules with the same policies share one `Arc`.
    pub authorization: Option<Arc<Authorization>>,
}

/// When and how often a rule's requests are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (Gateway API `attempts`; default 2).
    pub attempts: u32,
    /// Base of the exponential backoff with full jitter (Gateway API `backoff`; default 25ms).
    pub backoff: Duration,
    /// HTTP status codes that are retried (HTTPRoute `codes`).
    pub codes: Vec<u16>,
    /// gRPC status codes that are retried, read from `grpc-status` in the response
    /// headers (trailers-only responses), for GRPCRoute rules.
    pub grpc_codes: Vec<u8>,
    /// The route allows retrying methods that are not idempotent (annotation
    /// `retry.tern.dev/non-idempotent: "true"` on the route).
    pub non_idempotent: bool,
}

/// A `BackendPolicy` (policy.tern.dev/v1alpha1) as applied to one backend, or the
/// defaults when no policy targets its Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendPolicy {
    /// `namespace/name` of the policy; `None` for the defaults.
    pub source: Option<ObjectRef>,
    pub retry_budget: RetryBudget,
    pub circuit_breaker: CircuitBreaker,
    pub limits: Limits,
    pub load_balancer: LoadBalancer,
    /// Backpressure for requests to this backend (per sidecar); `None`: no limit beyond
    /// `limits.max_requests`.
    pub concurrency: Option<ConcurrencyLimit>,
}

/// How a backend's endpoints are chosen (`BackendPolicy.spec.loadBalancer`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadBalancer {
    pub algorithm: Algorithm,
    /// What consistent hashing hashes (required for `RingHash` and `Maglev`).
    pub hash: Option<HashKey>,
    pub locality: Locality,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency (weighted by requests in flight).
    #[default]
    P2CPeakEWMA,
    RoundRobin,
    LeastRequest,
    RingHash,
    Maglev,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    SourceIP,
}

/// Zone -> region -> other regions failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locality {
    pub enabled: bool,
    /// A tier serves while at least this share of its endpoints is ready and not ejected.
    pub min_healthy_percent: u32,
}

impl Default for Locality {
    fn default() -> Self {
        Locality {
            enabled: true,
            min_healthy_percent: 70,
        }
    }
}

/// A concurrency limit with a bounded queue (backpressure), optionally adaptive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencyLimit {
    /// Requests in flight at once (the starting limit when adaptive).
    pub max_concurrent: u32,
    /// Requests waiting for a slot; beyond this, 503 at once.
    pub max_queue: u32,
    /// A queued request waiting longer than this gets 503.
    pub queue_timeout: Duration,
    pub adaptive: Option<Adaptive>,
}

/// The limit follows measured latency (Netflix concurrency-limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptive {
    pub algorithm: AdaptiveAlgorithm,
    pub min_limit: u32,
    pub max_limit: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum AdaptiveAlgorithm {
    #[default]
    Gradient,
    AIMD,
}

/// A `RateLimitPolicy`: a token bucket of `requests` per `per`, with `burst` extra.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// `namespace/name` of the policy (the bucket's identity across reloads).
    pub source: ObjectRef,
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
    pub key: RateLimitKey,
}

/// What a bucket is per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    /// One bucket for everything the policy covers.
    All,
    /// One bucket per route rule.
    Route,
    /// One per caller: its mTLS identity once mTLS lands; until then its source address.
    Caller,
    /// One per value of a request header (absent header: one shared bucket).
    Header(HeaderName),
}

/// Retries allowed: `percent` of the requests over `interval`, plus
/// `min_retries_per_second` x `interval` in reserve (Finagle's definition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    pub percent: u32,
    pub min_retries_per_second: u32,
    pub interval: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20,
            min_retries_per_second: 10,
            interval: Duration::from_secs(10),
        }
    }
}

/// Per-endpoint circuit breaking (outlier ejection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// Trip after this many failures in a row; `None` (0 in YAML) disables it.
    pub consecutive_failures: Option<u32>,
    /// Trip when failures reach `percent` of at least `min_requests` over `interval`.
    pub failure_rate: Option<FailureRate>,
    pub ejection: Ejection,
    /// Responses with these statuses count as failures (connect errors and timeouts
    /// always do).
    pub failure_status_codes: Vec<u16>,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            consecutive_failures: Some(5),
            failure_rate: None,
            ejection: Ejection::default(),
            failure_status_codes: vec![502, 503, 504],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureRate {
    pub percent: u32,
    pub min_requests: u32,
    pub interval: Duration,
}

/// The values a `failureRate: {}` takes for the fields it omits (the failure rate itself
/// is off unless given).
impl Default for FailureRate {
    fn default() -> Self {
        FailureRate {
            percent: 50,
            min_requests: 20,
            interval: Duration::from_secs(10),
        }
    }
}

/// How long a tripped endpoint stays out: `base`, doubling with each repeated trip, up to
/// `max`; at most `max_ejected_percent` of a backend's endpoints out at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub base: Duration,
    pub max: Duration,
    pub max_ejected_percent: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            base: Duration::from_secs(5),
            max: Duration::from_secs(120),
            max_ejected_percent: 50,
        }
    }
}

/// Per-backend limits, per sidecar. Overflow is an immediate 503 `overflow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RouteKind {
    HTTPRoute,
    GRPCRoute,
    /// Traffic to a Service with no route attached.
    Default,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Caps the whole request, all attempts included (`timeouts.request`).
    pub request: Option<Duration>,
    /// Caps one attempt to a backend (`timeouts.backendRequest`).
    pub backend_request: Option<Duration>,
}

/// One `matches[j]` entry of an HTTPRoute rule, with the rule it selects.
#[derive(Debug)]
pub struct HttpRuleMatch {
    pub m: HttpMatch,
    pub rule: Arc<Rule>,
}

#[derive(Debug, Clone)]
pub struct HttpMatch {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Matches whole path segments: `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`.
    /// Stored without a trailing slash (except for `/` itself).
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: StringMatch,
}

#[derive(Debug, Clone)]
pub struct QueryMatch {
    pub name: String,
    pub value: StringMatch,
}

/// One `matches[j]` entry of a GRPCRoute rule.
#[derive(Debug)]
pub struct GrpcRuleMatch {
    pub m: GrpcMatch,
    pub rule: Arc<Rule>,
}

#[derive(Debug, Clone)]
pub struct GrpcMatch {
    /// `None` matches any service.
    pub service: Option<StringMatch>,
    /// `None` matches any method.
    pub method: Option<StringMatch>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the modifier in Gateway API order: set, add, remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug, Clone)]
pub struct UrlRewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathRewrite>,
}

#[derive(Debug, Clone)]
pub enum PathRewrite {
    ReplaceFullPath(String),
    /// Replaces the matched `PathPrefix` value; only valid with a prefix match.
    ReplacePrefixMatch(String),
}

/// Backends of a rule with cumulative weights, zero-weight backends removed.
#[derive(Debug, Clone)]
pub struct WeightedBackends {
    /// (cumulative weight, backend); strictly increasing weights.
    pub entries: Vec<(u32, Arc<Backend>)>,
    pub total: u32,
}

impl WeightedBackends {
    /// Picks a backend given a uniform random number in `0..self.total`.
    pub fn pick(&self, r: u32) -> Option<&Arc<Backend>> {
        let i = self.entries.partition_point(|(cum, _)| *cum <= r);
        self.entries.get(i).map(|(_, b)| b)
    }
}

/// A Service port as a destination: a backendRef, or the Service itself.
#[derive(Debug)]
pub struct Backend {
    /// Dense index into [`Snapshot::backends`].
    pub index: usize,
    /// Metric/backend label: `namespace/name:port`.
    pub name: Arc<str>,
    pub service: ObjectRef,
    pub port: u16,
    pub protocol: Protocol,
    /// Every endpoint from the Service's EndpointSlices for this port (ready or not).
    pub endpoints: Vec<Endpoint>,
    /// The BackendPolicy targeting the Service (or its defaults).
    pub policy: Arc<BackendPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    pub zone: Option<Arc<str>>,
    pub region: Option<Arc<str>>,
    /// The identity the endpoint's workload must present (EndpointSlice annotation
    /// `tern.dev/service-account`); `None`: not known, not checked.
    pub identity: Option<Arc<EndpointIdentity>>,
}

/// The service account an endpoint runs as.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct EndpointIdentity {
    pub namespace: String,
    pub service_account: String,
}

impl EndpointIdentity {
    /// Whether `id` names this namespace and service account. The trust domain is not
    /// compared: the proxy checks it against its trust bundle.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        id.is(&self.namespace, &self.service_account)
    }
}

/// Why an authority did not resolve to a Service port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no service {0} in the mesh")]
    UnknownService(String),
    #[error("service {service} has no port {port}")]
    UnknownPort { service: String, port: u16 },
    #[error("service {0} has several ports; name one in the authority")]
    AmbiguousPort(String),
    #[error("service name {0} exists in several namespaces ({1}); qualify it")]
    AmbiguousName(String, String),
}

/// A successful route match: the rule and, for `ReplacePrefixMatch`, the matched prefix.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'a> {
    pub rule: &'a Arc<Rule>,
    /// The `PathPrefix` value that matched, if the match was a prefix match.
    pub prefix: Option<&'a str>,
}

impl Snapshot {
    /// The backend of a Service port (its own endpoints), if the config uses it. A hash
    /// lookup, no allocation: opaque TCP asks once per connection.
    pub fn backend_of(&self, service: &ObjectRef, port: u16) -> Option<&Arc<Backend>> {
        let ids = self.backend_ids.get(service)?;
        let &(_, index) = ids.iter().find(|(p, _)| *p == port)?;
        self.backends.get(index)
    }

    /// The Service port a connection to `addr` is for: a Service's clusterIP and port,
    /// else an endpoint address (pod IP and target port) of a Service port. `None`: not
    /// in the mesh. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, from a dual-stack
    /// socket) counts as its IPv4 address; IPv6 flow info and scope ids are ignored. A hash
    /// lookup or two, no allocation.
    pub fn resolve_addr(&self, addr: SocketAddr) -> Option<&Arc<ServicePort>> {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.by_addr.get(&SocketAddr::new(ip, addr.port()))
    }

    /// Resolves a request authority to a Service port.
    ///
    /// `host` is the Host / :authority host part, lower-cased or not: `checkout`,
    /// `checkout.shop`, `checkout.shop.svc` or `checkout.shop.svc.cluster.local`.
    /// A bare name resolves in `default_ns` first, then in the only namespace that has it.
    /// Without a port: port 80 if the Service has it, else its only port.
    pub fn resolve(
        &self,
        host: &str,
        port: Option<u16>,
        default_ns: &str,
    ) -> Result<&Arc<ServicePort>, LookupError> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let host = strip_suffix_ignore_case(host, ".svc.cluster.local")
            .or_else(|| strip_suffix_ignore_case(host, ".svc"))
            .unwrap_or(host);
        // A byte scan: `splitn` with a char pattern sets up a searcher per call.
        let (name, ns) = match host.bytes().position(|b| b == b'.') {
            Some(dot) => (&host[..dot], Some(&host[dot + 1..])),
            None => (host, None),
        };
        let svc = self.find_service(name, ns, default_ns, host)?;
        match port {
            Some(p) => {
                svc.ports
                    .iter()
                    .find(|sp| sp.port == p)
                    .ok_or_else(|| LookupError::UnknownPort {
                        service: svc.id.to_string(),
                        port: p,
                    })
            }
            None => {
                if let Some(sp) = svc.ports.iter().find(|sp| sp.port == 80) {
                    Ok(sp)
                } else if svc.ports.len() == 1 {
                    Ok(&svc.ports[0])
                } else {
                    Err(LookupError::AmbiguousPort(svc.id.to_string()))
                }
            }
        }
    }

    fn find_service(
        &self,
        name: &str,
        ns: Option<&str>,
        default_ns: &str,
        host: &str,
    ) -> Result<&Arc<Service>, LookupError> {
        // Hostnames are case-insensitive; lower-case only when needed (rare).
        let name = lower(name);
        let unknown = || LookupError::UnknownService(host.to_string());
        let same_name = self.by_name.get(name.as_ref()).ok_or_else(unknown)?;
        let in_ns = |ns: &str| {
            same_name
                .iter()
                .find(|s| s.id.namespace.eq_ignore_ascii_case(ns))
        };
        if let Some(ns) = ns {
            return in_ns(ns).ok_or_else(unknown);
        }
        if let Some(s) = in_ns(default_ns) {
            return Ok(s);
        }
        match same_name.as_slice() {
            [only] => Ok(only),
            [] => Err(unknown()),
            many => Err(LookupError::AmbiguousName(
                name.into_owned(),
                many.iter()
                    .map(|s| s.id.namespace.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }
}

fn lower(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn strip_suffix_ignore_case<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = s.len().checked_sub(suffix.len())?;
    (s.is_char_boundary(cut) && s[cut..].eq_ignore_ascii_case(suffix)).then(|| &s[..cut])
}

impl ServicePort {
    /// Finds the rule for a request. `path` is the path without the query; `query` is the
    /// raw query string, if any. Returns `None` when routes are attached and none matches.
    pub fn route<'a>(
        &'a self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<Matched<'a>> {
        if !self.grpc.is_empty()
            && is_grpc(headers)
            && let Some((service, method_name)) = grpc_parts(path)
        {
            for g in &self.grpc {
                if g.m.matches(service, method_name, headers) {
                    return Some(Matched {
                        rule: &g.rule,
                        prefix: None,
                    });
                }
            }
        }
        let try_entry = |i: usize| {
            let h = &self.http[i];
            h.m.matches(method, path, query, headers)
                .then_some(Matched {
                    rule: &h.rule,
                    prefix: match &h.m.path {
                        PathMatch::Prefix(p) => Some(p.as_str()),
                        _ => None,
                    },
                })
        };
        let found = match self.http_index.find(path, try_entry) {
            Some(found) => found,
            None => (0..self.http.len()).find_map(try_entry),
        };
        found.or_else(|| {
            self.default_rule
                .as_ref()
                .map(|rule| Matched { rule, prefix: None })
        })
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Splits `/package.Service/Method` into (`package.Service`, `Method`).
fn grpc_parts(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                p == "/"
                    || (path.starts_with(p.as_str())
                        && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(v) => v == value,
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

impl HeaderMatch {
    fn matches(&self, headers: &HeaderMap) -> bool {
        headers
            .get(&self.name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| self.value.matches(v))
    }
}

impl HttpMatch {
    pub fn matches(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> bool {
        self.path.matches(path)
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.headers.iter().all(|h| h.matches(headers))
            && self.query.iter().all(|q| {
                // The first occurrence of a parameter is the one that counts (Gateway API).
                query
                    .and_then(|qs| {
                        qs.split('&').find_map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                            (k == q.name).then_some(v)
                        })
                    })
                    .is_some_and(|v| q.value.matches(v))
            })
    }
}

impl GrpcMatch {
    pub fn matches(&self, service: &str, method: &str, headers: &HeaderMap) -> bool {
        self.service.as_ref().is_none_or(|s| s.matches(service))
            && self.method.as_ref().is_none_or(|m| m.matches(method))
            && self.headers.iter().all(|h| h.matches(headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_whole_segments() {
        let p = PathMatch::Prefix("/api".into());
        assert!(p.matches("/api"));
        assert!(p.matches("/api/"));
        assert!(p.matches("/api/v1"));
        assert!(!p.matches("/apix"));
        assert!(!p.matches("/ap"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
    }

    #[test]
    fn grpc_path_split() {
        assert_eq!(grpc_parts("/pkg.Svc/Do"), Some(("pkg.Svc", "Do")));
        assert_eq!(grpc_parts("/pkg.Svc"), None);
        assert_eq!(grpc_parts("/pkg.Svc/Do/x"), None);
    }

    #[test]
    fn weighted_pick_boundaries() {
        let b = |i| {
            Arc::new(Backend {
                index: i,
                name: format!("b{i}").into(),
                service: ObjectRef {
                    namespace: "ns".into(),
                    name: format!("b{i}"),
                },
                port: 80,
                protocol: Protocol::Http1,
                endpoints: vec![],
                policy: Default::default(),
            })
        };
        let w = WeightedBackends {
            entries: vec![(90, b(0)), (100, b(1))],
            total: 100,
        };
        assert_eq!(w.pick(0).unwrap().index, 0);
        assert_eq!(w.pick(89).unwrap().index, 0);
        assert_eq!(w.pick(90).unwrap().index, 1);
        assert_eq!(w.pick(99).unwrap().index, 1);
        assert!(w.pick(100).is_none());
    }

    #[test]
    fn a_service_ports_backend_is_found_by_service_and_port() {
        let snap = two_namespaces();
        assert!(!snap.backends.is_empty());
        for b in &snap.backends {
            let found = snap.backend_of(&b.service, b.port).expect("backend");
            assert_eq!(found.index, b.index);
        }
        let multi = ObjectRef {
            namespace: "shop".into(),
            name: "multi".into(),
        };
        let (a, b) = (snap.backend_of(&multi, 81), snap.backend_of(&multi, 82));
        assert_eq!((a.unwrap().port, b.unwrap().port), (81, 82));
        assert!(snap.backend_of(&multi, 83).is_none());
        let missing = ObjectRef {
            namespace: "shop".into(),
            name: "nothing".into(),
        };
        assert!(snap.backend_of(&missing, 81).is_none());
    }

    fn two_namespaces() -> Snapshot {
        let svc = |ns: &str, name: &str, ports: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: {ports}}}\n---\n"
            )
        };
        let yaml = svc("shop", "checkout", "[{name: http, port: 8080}]")
            + &svc("dev", "checkout", "[{name: http, port: 8080}]")
            + &svc(
                "shop",
                "catalog",
                "[{name: http, port: 80}, {name: admin, port: 9000}]",
            )
            + &svc(
                "shop",
                "multi",
                "[{name: a, port: 81}, {name: b, port: 82}]",
            );
        match crate::load_sources(&[("t.yaml".into(), yaml)]) {
            Ok(c) => c.snapshot,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn resolve_forms_case_and_namespaces() {
        let s = two_namespaces();
        let ns_of = |r: Result<&Arc<ServicePort>, LookupError>| {
            r.map(|sp| format!("{}:{}", sp.service, sp.port))
        };
        // Qualified forms, any case, with or without the cluster suffix and port.
        for host in [
            "checkout.shop",
            "CHECKOUT.Shop.svc",
            "checkout.shop.svc.cluster.local.",
        ] {
            assert_eq!(
                ns_of(s.resolve(host, None, "default")).unwrap(),
                "shop/checkout:8080"
            );
        }
        assert_eq!(
            ns_of(s.resolve("checkout.dev", Some(8080), "x")).unwrap(),
            "dev/checkout:8080"
        );
        // A bare name: the caller's namespace first; ambiguous elsewhere.
        assert_eq!(
            ns_of(s.resolve("checkout", None, "dev")).unwrap(),
            "dev/checkout:8080"
        );
        assert!(matches!(
            s.resolve("checkout", None, "default"),
            Err(LookupError::AmbiguousName(_, _))
        ));
        // Unique elsewhere: found.
        assert_eq!(
            ns_of(s.resolve("Catalog", None, "default")).unwrap(),
            "shop/catalog:80"
        );
        // Ports: 80 by default, named port by number, unknown and ambiguous ports refused.
        assert_eq!(
            ns_of(s.resolve("catalog.shop", Some(9000), "x")).unwrap(),
            "shop/catalog:9000"
        );
        assert!(matches!(
            s.resolve("catalog.shop", Some(1), "x"),
            Err(LookupError::UnknownPort { .. })
        ));
        assert!(matches!(
            s.resolve("multi.shop", None, "x"),
            Err(LookupError::AmbiguousPort(_))
        ));
        assert!(matches!(
            s.resolve("nope.shop", None, "x"),
            Err(LookupError::UnknownService(_))
        ));
    }

    #[test]
    fn indexed_lookup_equals_linear_scan() {
        // Many prefixes and exacts under a few first segments, plus `/` and a regex,
        // spread over two routes so precedence interleaves them.
        let mut rules = String::new();
        for i in 0..40 {
            let seg = ["api", "web", "img", "x"][i % 4];
            let (ty, value) = match i % 3 {
                0 => ("PathPrefix", format!("/{seg}/v{i}")),
                1 => ("Exact", format!("/{seg}/e{i}")),
                _ => ("PathPrefix", format!("/{seg}")),
            };
            rules += &format!(
                "  - matches: [{{path: {{type: {ty}, value: \"{value}\"}}}}]\n    backendRefs: [{{name: s, port: 80}}]\n"
            );
        }
        rules += "  - matches: [{path: {type: RegularExpression, value: \"/img/.*\\\\.png\"}}]\n    backendRefs: [{name: s, port: 80}]\n";
        rules += "  - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: s, port: 80}]\n";
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: ns}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: s, port: 80}}]\n  rules:\n{rules}"
        );
        let snap = match crate::load_sources(&[("t.yaml".into(), yaml)]) {
            Ok(c) => c.snapshot,
            Err(e) => panic!("{e}"),
        };
        let sp = snap.resolve("s.ns", Some(80), "ns").unwrap();
        assert!(sp.http_index.by_segment.is_some(), "long lists are indexed");
        let linear = |path: &str| {
            sp.http
                .iter()
                .position(|h| h.m.matches(&Method::GET, path, None, &HeaderMap::new()))
        };
        let paths = [
            "/",
            "/api",
            "/api/",
            "/api/v0",
            "/api/v0/x",
            "/api/e1",
            "/api/e1/x",
            "/web/v12",
            "/img/a.png",
            "/img/v0/b.png",
            "/img",
            "/x/e37",
            "/apix",
            "/nothing/here",
            "",
        ];
        for path in paths {
            let indexed = sp
                .route(&Method::GET, path, None, &HeaderMap::new())
                .map(|m| {
                    sp.http
                        .iter()
                        .position(|h| std::ptr::eq(&h.rule, m.rule))
                        .expect("matched an http entry")
                });
            assert_eq!(indexed, linear(path), "{path}");
        }
    }

    #[test]
    fn authorize_truth_table() {
        let id = |uri: &str| SpiffeId::parse(uri).unwrap();
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let web_elsewhere = id("spiffe://other.domain/ns/shop/sa/web");
        let ops = id("spiffe://cluster.local/ns/ops/sa/deploy");
        let batch = id("spiffe://cluster.local/ns/batch/sa/job");
        let policy = |name: &str, allow: Vec<Principal>| {
            Arc::new(AuthorizationPolicy {
                name: name.into(),
                allow,
            })
        };
        let authz = |policies: Vec<Arc<AuthorizationPolicy>>| Authorization { policies };
        let only_web = authz(vec![policy(
            "shop/web",
            vec![Principal::Identity(web.clone())],
        )]);
        let ops_ns = authz(vec![policy(
            "shop/ops",
            vec![Principal::Namespace("ops".into())],
        )]);
        let meshed = authz(vec![policy("shop/meshed", vec![Principal::Meshed])]);
        let anyone = authz(vec![policy(
            "shop/anyone",
            vec![Principal::Unauthenticated],
        )]);
        let deny = authz(vec![policy("shop/deny", vec![])]);
        let name = |d: Decision| match d {
            Decision::Unrestricted => "unrestricted".to_string(),
            Decision::Allowed(p) => p.name.to_string(),
            Decision::Denied => "denied".to_string(),
        };
        // No policy anywhere: unrestricted, whoever calls.
        assert_eq!(name(authorize(None, None, None)), "unrestricted");
        assert_eq!(name(authorize(None, None, Some(&web))), "unrestricted");
        // (service, route, client) -> decision.
        type Case<'a> = (
            Option<&'a Authorization>,
            Option<&'a Authorization>,
            Option<&'a SpiffeId>,
            &'a str,
        );
        let cases: [Case; 17] = [
            (Some(&only_web), None, Some(&web), "shop/web"),
            // Exact identity: the trust domain counts.
            (Some(&only_web), None, Some(&web_elsewhere), "denied"),
            (Some(&only_web), None, Some(&ops), "denied"),
            (Some(&only_web), None, None, "denied"),
            (Some(&ops_ns), None, Some(&ops), "shop/ops"),
            (Some(&ops_ns), None, Some(&web), "denied"),
            // Namespace and Meshed need an authenticated client.
            (Some(&ops_ns), None, None, "denied"),
            (Some(&meshed), None, Some(&batch), "shop/meshed"),
            (Some(&meshed), None, None, "denied"),
            (Some(&anyone), None, None, "shop/anyone"),
            (Some(&anyone), None, Some(&web), "shop/anyone"),
            // allow: [] denies everything.
            (Some(&deny), None, Some(&web), "denied"),
            (None, Some(&deny), None, "denied"),
            // A policy on the route alone restricts too.
            (None, Some(&only_web), Some(&web), "shop/web"),
            (None, Some(&only_web), Some(&ops), "denied"),
            // Service and route policies add up; the route's is asked first.
            (Some(&ops_ns), Some(&only_web), Some(&ops), "shop/ops"),
            (Some(&meshed), Some(&only_web), Some(&web), "shop/web"),
        ];
        for (i, (service, route, client, want)) in cases.into_iter().enumerate() {
            assert_eq!(name(authorize(service, route, client)), want, "case {i}");
        }
        // Several policies on one target: any of them may allow; the first that does is named.
        let union = authz(vec![
            policy("shop/deny", vec![]),
            policy("shop/ops", vec![Principal::Namespace("ops".into())]),
            policy("shop/web", vec![Principal::Identity(web.clone())]),
        ]);
        assert_eq!(union.decide(Some(&web)).map(|p| &*p.name), Some("shop/web"));
        assert_eq!(union.decide(Some(&ops)).map(|p| &*p.name), Some("shop/ops"));
        assert_eq!(union.decide(Some(&batch)), None);
        assert_eq!(union.decide(None), None);
    }

    #[test]
    fn endpoint_identity_ignores_the_trust_domain() {
        let ei = EndpointIdentity {
            namespace: "shop".into(),
            service_account: "checkout".into(),
        };
        let id = |uri: &str| SpiffeId::parse(uri).unwrap();
        assert!(ei.matches(&id("spiffe://cluster.local/ns/shop/sa/checkout")));
        assert!(ei.matches(&id("spiffe://other/ns/shop/sa/checkout")));
        assert!(!ei.matches(&id("spiffe://cluster.local/ns/shop/sa/web")));
        assert!(!ei.matches(&id("spiffe://cluster.local/ns/dev/sa/checkout")));
    }

    #[test]
    fn suffix_strip() {
        assert_eq!(
            strip_suffix_ignore_case("a.b.SVC.cluster.local", ".svc.cluster.local"),
            Some("a.b")
        );
        assert_eq!(strip_suffix_ignore_case("svc", ".svc"), None);
    }
}
