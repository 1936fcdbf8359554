//! Semantic checks on a decoded [`Resources`] set: references between objects, values
//! that must parse (durations, regexes, header names, addresses), ranges and rules that
//! the Gateway API spells out in prose (weights, timeouts, `ReplacePrefixMatch`).
//!
//! The value parsers here are shared with [`crate::compile`], so what validates compiles.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::compile::{Policies, Policy, rank_policies};
use crate::diag::{Diagnostic, Sink};
use crate::identity::SpiffeId;
use crate::model::*;
use crate::resources::Resources;
use crate::snapshot::Algorithm;

/// Label naming the Service of an EndpointSlice.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label giving the region of an EndpointSlice's endpoints.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// Route annotation allowing retries of methods that are not idempotent (HTTPRoute).
pub const NON_IDEMPOTENT_ANNOTATION: &str = "retry.tern.dev/non-idempotent";

/// Service annotation: `strict` (mTLS only) or `permissive` (the default).
pub const MTLS_MODE_ANNOTATION: &str = "tern.dev/mtls-mode";
/// EndpointSlice annotation: the service account every endpoint of the slice runs as.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "tern.dev/service-account";

/// Canonical gRPC status code names, by code.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Checks every object of the set; returns errors and warnings in no particular order.
pub fn validate(res: &Resources) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let policies = Policies::new(res);
    // The first Service (by namespace/name) with each clusterIP.
    let mut cluster_ips: HashMap<IpAddr, &Object> = HashMap::new();
    for obj in res.of_kind(Kind::Service) {
        if let Resource::Service(s) = &obj.resource
            && let Ok(Some(ip)) = cluster_ip(s.cluster_ip.as_deref())
        {
            cluster_ips.entry(ip).or_insert(obj);
        }
    }
    for obj in res.iter() {
        let mut v = V {
            res,
            policies: &policies,
            cluster_ips: &cluster_ips,
            src: &obj.source,
            sink: Sink {
                file: &obj.source.file,
                diags: &mut diags,
            },
        };
        v.meta(obj.resource.kind(), obj.resource.meta());
        match &obj.resource {
            Resource::Service(s) => v.service(s),
            Resource::EndpointSlice(s) => v.endpoint_slice(s),
            Resource::HTTPRoute(r) => v.http_route(r),
            Resource::GRPCRoute(r) => v.grpc_route(r),
            Resource::BackendPolicy(p) => v.backend_policy(p),
            Resource::RateLimitPolicy(p) => v.rate_limit_policy(p),
            Resource::ConcurrencyPolicy(p) => v.concurrency_policy(p),
            Resource::AuthorizationPolicy(p) => v.authorization_policy(p),
        }
    }
    diags
}

struct V<'a> {
    res: &'a Resources,
    policies: &'a Policies<'a>,
    cluster_ips: &'a HashMap<IpAddr, &'a Object>,
    src: &'a Source,
    sink: Sink<'a>,
}

impl<'a> V<'a> {
    fn err(&mut self, path: &str, msg: impl Into<String>) {
        let loc = self.src.loc(path);
        self.sink.error(loc, path, msg);
    }

    fn warn(&mut self, path: &str, msg: impl Into<String>) {
        let loc = self.src.loc(path);
        self.sink.warn(loc, path, msg);
    }

    fn meta(&mut self, kind: Kind, m: &Meta) {
        // Services must be DNS labels: they become host names.
        let name_ok = if kind == Kind::Service {
            is_dns_label(&m.name)
        } else {
            is_dns_subdomain(&m.name)
        };
        if !name_ok {
            let what = if kind == Kind::Service {
                "a DNS label (lower-case letters, digits and '-', at most 63 characters)"
            } else {
                "a DNS subdomain (lower-case letters, digits, '-' and '.')"
            };
            self.err(
                "metadata.name",
                format!("invalid name \"{}\": must be {what}", m.name),
            );
        }
        if !is_dns_label(&m.namespace) {
            self.err(
                "metadata.namespace",
                format!("invalid namespace \"{}\": must be a DNS label", m.namespace),
            );
        }
        if let Some(ts) = &m.creation_timestamp
            && timestamp_key(ts).is_none()
        {
            self.err(
                "metadata.creationTimestamp",
                format!(
                    "invalid timestamp \"{ts}\" (expected RFC 3339 UTC, e.g. 2024-05-01T12:00:00Z)"
                ),
            );
        }
    }

    fn port_range(&mut self, path: &str, port: i64) -> bool {
        let ok = (1..=65535).contains(&port);
        if !ok {
            self.err(path, format!("port {port} out of range (1-65535)"));
        }
        ok
    }

    fn service(&mut self, s: &Service) {
        if let Some(mode) = s.meta.annotations.get(MTLS_MODE_ANNOTATION)
            && !matches!(mode.as_str(), "strict" | "permissive")
        {
            self.err(
                &format!("metadata.annotations.{MTLS_MODE_ANNOTATION}"),
                format!("invalid mTLS mode \"{mode}\" (expected \"strict\" or \"permissive\")"),
            );
        }
        match cluster_ip(s.cluster_ip.as_deref()) {
            Err(msg) => self.err("spec.clusterIP", msg),
            Ok(Some(ip)) => {
                let first = self.cluster_ips.get(&ip).copied();
                if let Some(first) = first
                    && !std::ptr::eq(first.resource.meta(), &s.meta)
                {
                    let m = first.resource.meta();
                    self.err(
                        "spec.clusterIP",
                        format!(
                            "duplicate clusterIP {ip} (also Service {}/{} at {}:{})",
                            m.namespace,
                            m.name,
                            first.source.file,
                            first.source.loc("spec.clusterIP"),
                        ),
                    );
                }
            }
            Ok(None) => {}
        }
        for (i, p) in s.ports.iter().enumerate() {
            let path = format!("spec.ports[{i}]");
            self.port_range(&format!("{path}.port"), p.port);
            if let Some(j) = s.ports[..i].iter().position(|q| q.port == p.port) {
                self.err(
                    &format!("{path}.port"),
                    format!("duplicate port {} (also spec.ports[{j}])", p.port),
                );
            }
            match &p.name {
                None | Some(_)
                    if s.ports.len() > 1 && p.name.as_deref().unwrap_or("").is_empty() =>
                {
                    self.err(&path, "a Service with several ports must name each of them");
                }
                Some(name) if !name.is_empty() => {
                    if let Some(j) = s.ports[..i].iter().position(|q| q.name == p.name) {
                        self.err(
                            &format!("{path}.name"),
                            format!("duplicate port name \"{name}\" (also spec.ports[{j}])"),
                        );
                    }
                }
                _ => {}
            }
        }
    }

    fn endpoint_slice(&mut self, e: &EndpointSlice) {
        let family = match e.address_type.as_str() {
            "IPv4" | "IPv6" => Some(e.address_type.as_str()),
            "FQDN" => {
                self.warn(
                    "addressType",
                    "FQDN EndpointSlices are not supported by Tern yet; ignored",
                );
                None
            }
            "" => None,
            other => {
                self.err(
                    "addressType",
                    format!("unknown addressType \"{other}\" (expected IPv4, IPv6 or FQDN)"),
                );
                None
            }
        };
        if let Some(family) = family {
            for (i, ep) in e.endpoints.iter().enumerate() {
                for (j, a) in ep.addresses.iter().enumerate() {
                    let ok = if family == "IPv4" {
                        a.parse::<Ipv4Addr>().is_ok()
                    } else {
                        a.parse::<Ipv6Addr>().is_ok()
                    };
                    if !ok {
                        self.err(
                            &format!("endpoints[{i}].addresses[{j}]"),
                            format!("invalid {family} address \"{a}\""),
                        );
                    }
                }
            }
        }
        for (i, p) in e.ports.iter().enumerate() {
            if let Some(port) = p.port {
                self.port_range(&format!("ports[{i}].port"), port);
            }
        }
        if let Some(sa) = e.meta.annotations.get(SERVICE_ACCOUNT_ANNOTATION)
            && !is_dns_subdomain(sa)
        {
            self.err(
                &format!("metadata.annotations.{SERVICE_ACCOUNT_ANNOTATION}"),
                format!(
                    "invalid service account \"{sa}\": must be a DNS subdomain (lower-case letters, digits, '-' and '.')"
                ),
            );
        }
        match e.meta.labels.get(SERVICE_NAME_LABEL) {
            None => self.warn(
                "metadata.labels",
                format!("no {SERVICE_NAME_LABEL} label: this EndpointSlice belongs to no Service; ignored"),
            ),
            Some(svc) if self.res.service(&e.meta.namespace, svc).is_none() => self.warn(
                &format!("metadata.labels.{SERVICE_NAME_LABEL}"),
                format!("no Service {}/{svc}; this EndpointSlice is ignored", e.meta.namespace),
            ),
            Some(_) => {}
        }
    }

    fn parent_refs(&mut self, route_ns: &str, refs: &[ParentRef]) {
        for (i, p) in refs.iter().enumerate() {
            let path = format!("spec.parentRefs[{i}]");
            if p.name.is_empty() {
                continue;
            }
            if !p.is_service() {
                self.warn(
                    &path,
                    format!(
                        "parentRef to {} {}/{} ignored: Tern only attaches routes to Services (group \"\", kind Service)",
                        p.kind, p.namespace, p.name
                    ),
                );
                continue;
            }
            let Some(svc) = self.res.service(&p.namespace, &p.name) else {
                self.err(
                    &format!("{path}.name"),
                    format!("no Service {}/{}", p.namespace, p.name),
                );
                continue;
            };
            if let Some(port) = p.port
                && self.port_range(&format!("{path}.port"), port)
                && !svc.incomplete
                && !svc.ports.iter().any(|sp| sp.port == port)
            {
                self.err(
                    &format!("{path}.port"),
                    format!("Service {}/{} has no port {port}", p.namespace, p.name),
                );
            }
            if p.namespace != route_ns {
                self.warn(
                    &format!("{path}.namespace"),
                    "consumer routes are not supported yet: this route applies to clients in every namespace",
                );
            }
        }
    }

    fn backend_refs(&mut self, rule_path: &str, refs: &[BackendRef]) {
        for (j, b) in refs.iter().enumerate() {
            let path = format!("{rule_path}.backendRefs[{j}]");
            if b.name.is_empty() {
                continue;
            }
            if !(0..=1_000_000).contains(&b.weight) {
                self.err(
                    &format!("{path}.weight"),
                    format!("weight {} out of range (0-1000000)", b.weight),
                );
            }
            if !b.group.is_empty() || b.kind != "Service" {
                let gk = if b.group.is_empty() {
                    b.kind.clone()
                } else {
                    format!("{}/{}", b.group, b.kind)
                };
                self.err(
                    &format!("{path}.kind"),
                    format!(
                        "unsupported backendRef kind {gk}: only Services (group \"\") are supported"
                    ),
                );
                continue;
            }
            let Some(port) = b.port else { continue };
            let Some(svc) = self.res.service(&b.namespace, &b.name) else {
                self.err(
                    &format!("{path}.name"),
                    format!("no Service {}/{}", b.namespace, b.name),
                );
                continue;
            };
            if self.port_range(&format!("{path}.port"), port)
                && !svc.incomplete
                && !svc.ports.iter().any(|sp| sp.port == port)
            {
                self.err(
                    &format!("{path}.port"),
                    format!("Service {}/{} has no port {port}", b.namespace, b.name),
                );
            }
        }
        if !refs.is_empty() && refs.iter().all(|b| b.weight == 0) {
            self.err(
                &format!("{rule_path}.backendRefs"),
                "every backendRef has weight 0: the rule can send traffic nowhere",
            );
        }
    }

    fn value_matches(&mut self, path: &str, what: &str, matches: &[ValueMatch], header: bool) {
        for (i, m) in matches.iter().enumerate() {
            let p = format!("{path}.{what}[{i}]");
            if header {
                if HeaderName::from_bytes(m.name.as_bytes()).is_err() {
                    self.err(
                        &format!("{p}.name"),
                        format!("invalid header name \"{}\"", m.name),
                    );
                }
            } else if m.name.is_empty() {
                self.err(
                    &format!("{p}.name"),
                    "query parameter name must not be empty",
                );
            }
            match m.match_type {
                MatchType::Exact => {
                    if header && HeaderValue::from_str(&m.value).is_err() {
                        self.err(
                            &format!("{p}.value"),
                            format!("invalid header value {:?}", m.value),
                        );
                    }
                }
                MatchType::RegularExpression => self.regex(&format!("{p}.value"), &m.value),
            }
        }
    }

    fn regex(&mut self, path: &str, re: &str) {
        if let Err(e) = full_regex(re) {
            self.err(path, e);
        }
    }

    fn filters(&mut self, rule_path: &str, filters: &[Filter], matches: Option<&[HttpRouteMatch]>) {
        let mut seen: Vec<&'static str> = Vec::new();
        for (k, f) in filters.iter().enumerate() {
            let path = format!("{rule_path}.filters[{k}]");
            let ty = match f {
                Filter::RequestHeaderModifier(m) => {
                    self.header_modifier(&format!("{path}.requestHeaderModifier"), m);
                    "RequestHeaderModifier"
                }
                Filter::ResponseHeaderModifier(m) => {
                    self.header_modifier(&format!("{path}.responseHeaderModifier"), m);
                    "ResponseHeaderModifier"
                }
                Filter::URLRewrite(u) => {
                    self.url_rewrite(&format!("{path}.urlRewrite"), u, matches.unwrap_or(&[]));
                    "URLRewrite"
                }
                Filter::Unsupported(_) => continue,
            };
            if seen.contains(&ty) {
                self.err(
                    &format!("{path}.type"),
                    format!("filter {ty} appears more than once in this rule"),
                );
            }
            seen.push(ty);
        }
    }

    fn header_modifier(&mut self, path: &str, m: &HeaderModifier) {
        for (what, pairs) in [("set", &m.set), ("add", &m.add)] {
            for (i, (name, value)) in pairs.iter().enumerate() {
                let p = format!("{path}.{what}[{i}]");
                if HeaderName::from_bytes(name.as_bytes()).is_err() {
                    self.err(
                        &format!("{p}.name"),
                        format!("invalid header name \"{name}\""),
                    );
                }
                if HeaderValue::from_str(value).is_err() {
                    self.err(
                        &format!("{p}.value"),
                        format!("invalid header value {value:?}"),
                    );
                }
            }
        }
        for (i, name) in m.remove.iter().enumerate() {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.err(
                    &format!("{path}.remove[{i}]"),
                    format!("invalid header name \"{name}\""),
                );
            }
        }
    }

    fn url_rewrite(&mut self, path: &str, u: &UrlRewrite, matches: &[HttpRouteMatch]) {
        if let Some(h) = &u.hostname
            && !is_dns_subdomain(h)
        {
            self.err(
                &format!("{path}.hostname"),
                format!("invalid hostname \"{h}\""),
            );
        }
        match &u.path {
            Some(PathModifier::ReplaceFullPath(p)) if !p.starts_with('/') => self.err(
                &format!("{path}.path.replaceFullPath"),
                "path must start with \"/\"",
            ),
            Some(PathModifier::ReplacePrefixMatch(p)) => {
                if !p.starts_with('/') {
                    self.err(
                        &format!("{path}.path.replacePrefixMatch"),
                        "path must start with \"/\"",
                    );
                }
                if matches.iter().any(|m| m.path_type != PathType::PathPrefix) {
                    self.err(
                        &format!("{path}.path.type"),
                        "ReplacePrefixMatch is only valid when every match of the rule is a PathPrefix match",
                    );
                }
            }
            _ => {}
        }
    }

    fn http_route(&mut self, r: &HttpRoute) {
        self.non_idempotent_annotation(&r.meta, false);
        self.parent_refs(&r.meta.namespace, &r.parent_refs);
        for (i, rule) in r.rules.iter().enumerate() {
            let rp = format!("spec.rules[{i}]");
            for (j, m) in rule.matches.iter().enumerate() {
                let mp = format!("{rp}.matches[{j}]");
                match m.path_type {
                    PathType::RegularExpression => self.regex(&format!("{mp}.path.value"), &m.path),
                    _ if !m.path.starts_with('/') => {
                        self.err(&format!("{mp}.path.value"), "path must start with \"/\"")
                    }
                    _ => {}
                }
                self.value_matches(&mp, "headers", &m.headers, true);
                self.value_matches(&mp, "queryParams", &m.query_params, false);
                if let Some(method) = &m.method
                    && !METHODS.contains(&method.as_str())
                {
                    self.err(
                        &format!("{mp}.method"),
                        format!(
                            "unknown method \"{method}\" (expected one of {})",
                            METHODS.join(", ")
                        ),
                    );
                }
            }
            self.filters(&rp, &rule.filters, Some(&rule.matches));
            self.backend_refs(&rp, &rule.backend_refs);
            let mut parsed = [None, None];
            for (slot, (key, value)) in [
                ("request", &rule.timeouts.request),
                ("backendRequest", &rule.timeouts.backend_request),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(v) = value {
                    match parse_duration(v) {
                        Ok(d) => parsed[slot] = Some(d),
                        Err(e) => self.err(&format!("{rp}.timeouts.{key}"), e),
                    }
                }
            }
            if let [Some(req), Some(backend)] = parsed
                && !req.is_zero()
                && (backend.is_zero() || backend > req)
            {
                self.err(
                    &format!("{rp}.timeouts.backendRequest"),
                    format!(
                        "backendRequest timeout ({}) is longer than the request timeout ({})",
                        rule.timeouts.backend_request.as_deref().unwrap_or_default(),
                        rule.timeouts.request.as_deref().unwrap_or_default()
                    ),
                );
            }
            if let Some(retry) = &rule.retry {
                self.retry(&rp, retry, false);
            }
        }
    }

    fn grpc_route(&mut self, r: &GrpcRoute) {
        self.non_idempotent_annotation(&r.meta, true);
        self.parent_refs(&r.meta.namespace, &r.parent_refs);
        for (i, rule) in r.rules.iter().enumerate() {
            let rp = format!("spec.rules[{i}]");
            for (j, m) in rule.matches.iter().enumerate() {
                let mp = format!("{rp}.matches[{j}]");
                if let Some(gm) = &m.method {
                    match gm.match_type {
                        MatchType::Exact => {
                            if gm.service.is_none() && gm.method.is_none() {
                                self.err(
                                    &format!("{mp}.method"),
                                    "an Exact method match needs a service, a method or both",
                                );
                            }
                            if let Some(s) = &gm.service
                                && !is_grpc_name(s, true)
                            {
                                self.err(
                                    &format!("{mp}.method.service"),
                                    format!("invalid gRPC service name \"{s}\""),
                                );
                            }
                            if let Some(m) = &gm.method
                                && !is_grpc_name(m, false)
                            {
                                self.err(
                                    &format!("{mp}.method.method"),
                                    format!("invalid gRPC method name \"{m}\""),
                                );
                            }
                        }
                        MatchType::RegularExpression => {
                            for (key, v) in [("service", &gm.service), ("method", &gm.method)] {
                                if let Some(v) = v {
                                    self.regex(&format!("{mp}.method.{key}"), v);
                                }
                            }
                        }
                    }
                }
                self.value_matches(&mp, "headers", &m.headers, true);
            }
            self.filters(&rp, &rule.filters, None);
            self.backend_refs(&rp, &rule.backend_refs);
            if let Some(retry) = &rule.retry {
                self.retry(&rp, retry, true);
            }
        }
    }

    fn non_idempotent_annotation(&mut self, m: &Meta, grpc: bool) {
        let Some(v) = m.annotations.get(NON_IDEMPOTENT_ANNOTATION) else {
            return;
        };
        let path = format!("metadata.annotations.{NON_IDEMPOTENT_ANNOTATION}");
        match v.as_str() {
            "true" | "false" if grpc => self.warn(
                &path,
                "no effect on a GRPCRoute: a gRPC retry applies to every method (listing a status code is the service owner's permission)",
            ),
            "true" | "false" => {}
            _ => self.err(
                &path,
                format!("invalid value \"{v}\" (expected \"true\" or \"false\")"),
            ),
        }
    }

    fn retry(&mut self, rule_path: &str, r: &Retry, grpc: bool) {
        let path = format!("{rule_path}.retry");
        if let Some(a) = r.attempts
            && !(0..=MAX_RETRY_ATTEMPTS).contains(&a)
        {
            self.err(
                &format!("{path}.attempts"),
                format!("attempts {a} out of range (0-{MAX_RETRY_ATTEMPTS})"),
            );
        }
        if let Some(b) = &r.backoff {
            self.positive_duration(&format!("{path}.backoff"), b);
        }
        for (i, c) in r.codes.iter().flatten().enumerate() {
            let p = format!("{path}.codes[{i}]");
            match c {
                RetryCode::Invalid => {}
                _ if grpc && grpc_code(c).is_some() => {}
                RetryCode::Number(n) if grpc => {
                    self.err(&p, format!("gRPC status code {n} out of range (0-16)"))
                }
                RetryCode::Name(name) => self.err(
                    &p,
                    format!(
                        "unknown gRPC status code \"{name}\" (expected 0-16 or a name such as UNAVAILABLE or RESOURCE_EXHAUSTED)"
                    ),
                ),
                RetryCode::Number(n) => {
                    if !(400..=599).contains(n) {
                        self.err(&p, format!("status code {n} out of range (400-599)"));
                    }
                }
            }
        }
    }

    /// Checks an integer field against `lo..=hi`; returns whether it is in range.
    fn int_range(&mut self, path: &str, v: i64, lo: i64, hi: i64) -> bool {
        let ok = (lo..=hi).contains(&v);
        if !ok {
            let what = path.rsplit('.').next().unwrap_or(path);
            if hi == i64::from(u32::MAX) && v < lo {
                self.err(path, format!("{what} must be at least {lo} (got {v})"));
            } else {
                self.err(path, format!("{what} {v} out of range ({lo}-{hi})"));
            }
        }
        ok
    }

    /// Parses a duration that must be longer than zero.
    fn positive_duration(&mut self, path: &str, v: &str) -> Option<Duration> {
        match parse_duration(v) {
            Err(e) => {
                self.err(path, e);
                None
            }
            Ok(d) if d.is_zero() => {
                self.err(path, format!("duration \"{v}\" must be longer than 0"));
                None
            }
            Ok(d) => Some(d),
        }
    }

    fn backend_policy(&mut self, bp: &BackendPolicy) {
        self.policy_targets(bp);
        let u32_max = i64::from(u32::MAX);
        if let Some(b) = &bp.retry_budget {
            let p = "spec.retryBudget";
            if let Some(v) = b.percent {
                self.int_range(&format!("{p}.percent"), v, 0, 100);
            }
            if let Some(v) = b.min_retries_per_second {
                self.int_range(&format!("{p}.minRetriesPerSecond"), v, 0, u32_max);
            }
            if let Some(v) = &b.interval {
                self.positive_duration(&format!("{p}.interval"), v);
            }
        }
        if let Some(cb) = &bp.circuit_breaker {
            let p = "spec.circuitBreaker";
            if let Some(v) = cb.consecutive_failures {
                self.int_range(&format!("{p}.consecutiveFailures"), v, 0, u32_max);
            }
            if let Some(r) = &cb.failure_rate {
                if let Some(v) = r.percent {
                    self.int_range(&format!("{p}.failureRate.percent"), v, 1, 100);
                }
                if let Some(v) = r.min_requests {
                    self.int_range(&format!("{p}.failureRate.minRequests"), v, 1, u32_max);
                }
                if let Some(v) = &r.interval {
                    self.positive_duration(&format!("{p}.failureRate.interval"), v);
                }
            }
            if let Some(e) = &cb.ejection {
                let defaults = crate::snapshot::Ejection::default();
                let base = match &e.base {
                    Some(v) => self.positive_duration(&format!("{p}.ejection.base"), v),
                    None => Some(defaults.base),
                };
                let max = match &e.max {
                    Some(v) => self.positive_duration(&format!("{p}.ejection.max"), v),
                    None => Some(defaults.max),
                };
                if let (Some(base), Some(max)) = (base, max)
                    && max < base
                {
                    let shown = |v: &Option<String>, d: Duration| match v {
                        Some(v) => v.clone(),
                        None => format!("{}, the default", format_duration(d)),
                    };
                    let at = if e.max.is_some() { "max" } else { "base" };
                    self.err(
                        &format!("{p}.ejection.{at}"),
                        format!(
                            "ejection max ({}) is shorter than base ({})",
                            shown(&e.max, max),
                            shown(&e.base, base)
                        ),
                    );
                }
                if let Some(v) = e.max_ejected_percent {
                    self.int_range(&format!("{p}.ejection.maxEjectedPercent"), v, 0, 100);
                }
            }
            for (i, c) in cb.failure_status_codes.iter().flatten().enumerate() {
                if let Some(c) = c
                    && !(100..=599).contains(c)
                {
                    self.err(
                        &format!("{p}.failureStatusCodes[{i}]"),
                        format!("status code {c} out of range (100-599)"),
                    );
                }
            }
        }
        if let Some(l) = &bp.limits {
            for (key, v) in [
                ("maxConnections", l.max_connections),
                ("maxPendingRequests", l.max_pending_requests),
                ("maxRequests", l.max_requests),
            ] {
                if let Some(v) = v {
                    self.int_range(&format!("spec.limits.{key}"), v, 1, u32_max);
                }
            }
        }
        if let Some(lb) = &bp.load_balancer {
            self.load_balancer(lb);
        }
        if let Some(c) = &bp.concurrency {
            self.concurrency("spec.concurrency", c);
        }
    }

    fn load_balancer(&mut self, lb: &LoadBalancerSpec) {
        let p = "spec.loadBalancer";
        let algorithm = lb.algorithm.unwrap_or_default();
        let hashing = matches!(algorithm, Algorithm::RingHash | Algorithm::Maglev);
        match &lb.hash {
            None if hashing => self.err(
                &format!("{p}.algorithm"),
                format!(
                    "{algorithm:?} needs loadBalancer.hash: {{header: <name>}}, {{cookie: <name>}} or {{sourceIP: true}}"
                ),
            ),
            Some(h) if !hashing && !lb.invalid_algorithm && *h != HashSpec::Invalid => {
                let default = if lb.algorithm.is_none() {
                    " (the default)"
                } else {
                    ""
                };
                self.warn(
                    &format!("{p}.hash"),
                    format!(
                        "hash is only used by RingHash and Maglev; ignored with {algorithm:?}{default}"
                    ),
                );
            }
            _ => {}
        }
        match &lb.hash {
            Some(HashSpec::Header(h)) if HeaderName::from_bytes(h.as_bytes()).is_err() => {
                self.err(
                    &format!("{p}.hash.header"),
                    format!("invalid header name \"{h}\""),
                );
            }
            Some(HashSpec::Cookie(c)) => {
                if c.is_empty() {
                    self.err(&format!("{p}.hash.cookie"), "cookie name must not be empty");
                } else if !is_token(c) {
                    self.err(
                        &format!("{p}.hash.cookie"),
                        format!("invalid cookie name \"{c}\""),
                    );
                }
            }
            Some(HashSpec::SourceIP(false)) => self.err(
                &format!("{p}.hash.sourceIP"),
                "sourceIP: false hashes on nothing (write sourceIP: true, or hash on a header or a cookie)",
            ),
            _ => {}
        }
        if let Some(v) = lb.locality.as_ref().and_then(|l| l.min_healthy_percent) {
            self.int_range(&format!("{p}.locality.minHealthyPercent"), v, 1, 100);
        }
    }

    /// A concurrency limit at `p` (`spec.concurrency`, or `spec` of a ConcurrencyPolicy).
    fn concurrency(&mut self, p: &str, c: &ConcurrencySpec) {
        let u32_max = i64::from(u32::MAX);
        let max = c
            .max_concurrent
            .filter(|v| self.int_range(&format!("{p}.maxConcurrent"), *v, 1, u32_max));
        if let Some(v) = c.max_queue {
            self.int_range(&format!("{p}.maxQueue"), v, 0, u32_max);
        }
        if let Some(v) = &c.queue_timeout {
            self.positive_duration(&format!("{p}.queueTimeout"), v);
        }
        let Some(a) = &c.adaptive else { return };
        let ap = format!("{p}.adaptive");
        let min = a
            .min_limit
            .filter(|v| self.int_range(&format!("{ap}.minLimit"), *v, 1, u32_max));
        let max_limit = a
            .max_limit
            .filter(|v| self.int_range(&format!("{ap}.maxLimit"), *v, 1, u32_max));
        let Some(max) = max else { return };
        if let Some(min) = min
            && min > max
        {
            self.err(
                &format!("{ap}.minLimit"),
                format!("minLimit ({min}) is greater than maxConcurrent ({max})"),
            );
        }
        if let Some(max_limit) = max_limit
            && max_limit < max
        {
            self.err(
                &format!("{ap}.maxLimit"),
                format!("maxLimit ({max_limit}) is less than maxConcurrent ({max})"),
            );
        }
    }

    fn rate_limit_policy(&mut self, rp: &RateLimitPolicy) {
        self.policy_targets(rp);
        let u32_max = i64::from(u32::MAX);
        if let Some(r) = &rp.rate {
            if let Some(v) = r.requests {
                self.int_range("spec.rate.requests", v, 1, u32_max);
            }
            if let Some(v) = &r.per {
                self.positive_duration("spec.rate.per", v);
            }
            if let Some(v) = r.burst {
                self.int_range("spec.rate.burst", v, 0, u32_max);
            }
        }
        if let Some(RateLimitKeySpec::Header(h)) = &rp.key
            && HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            self.err("spec.key.header", format!("invalid header name \"{h}\""));
        }
    }

    fn concurrency_policy(&mut self, cp: &ConcurrencyPolicy) {
        self.policy_targets(cp);
        self.concurrency("spec", &cp.limit);
    }

    fn authorization_policy(&mut self, ap: &AuthorizationPolicy) {
        self.policy_targets(ap);
        for (i, clause) in ap.allow.iter().enumerate() {
            let path = format!("spec.allow[{i}]");
            if clause.is_empty() && !clause.incomplete {
                self.err(
                    &path,
                    "an allow clause needs at least one of identities, namespaces, meshed: true or unauthenticated: true (to deny everything, write allow: [])",
                );
            }
            for (j, id) in clause.identities.iter().enumerate() {
                if let Some(id) = id
                    && let Err(e) = SpiffeId::parse(id)
                {
                    self.err(&format!("{path}.identities[{j}]"), e.to_string());
                }
            }
            for (j, ns) in clause.namespaces.iter().enumerate() {
                if let Some(ns) = ns
                    && !is_dns_label(ns)
                {
                    self.err(
                        &format!("{path}.namespaces[{j}]"),
                        format!("invalid namespace \"{ns}\": must be a DNS label"),
                    );
                }
            }
        }
    }

    /// Checks a policy's targetRefs (kinds it takes, objects that exist, section names
    /// they have), then warns about its conflicts with other policies of its kind.
    fn policy_targets<P: Policy>(&mut self, policy: &P) {
        let ns = policy.meta().namespace.as_str();
        for (i, t) in policy.target_refs().iter().enumerate() {
            let path = format!("spec.targetRefs[{i}]");
            let Some(kind) = P::target_of(t) else {
                let msg = if P::KIND == Kind::ConcurrencyPolicy
                    && t.target_kind() == Some(Kind::Service)
                {
                    format!(
                        "a ConcurrencyPolicy targets {}; to limit concurrency to a Service, use BackendPolicy.spec.concurrency",
                        describe_targets(P::TARGETS)
                    )
                } else {
                    let article = if P::KIND == Kind::AuthorizationPolicy {
                        "an"
                    } else {
                        "a"
                    };
                    format!(
                        "unsupported targetRef kind {}: {article} {} targets {}",
                        t.group_kind(),
                        P::KIND,
                        describe_targets(P::TARGETS)
                    )
                };
                self.err(&format!("{path}.kind"), msg);
                continue;
            };
            let Some(sections) = self.sections(kind, ns, &t.name) else {
                self.warn(
                    &format!("{path}.name"),
                    format!(
                        "no {kind} {ns}/{}: policy attaches to nothing (targetRef ignored)",
                        t.name
                    ),
                );
                continue;
            };
            if let Some(section) = &t.section_name
                && !sections.incomplete
                && !sections
                    .list
                    .iter()
                    .any(|(n, _)| !section.is_empty() && *n == Some(section.as_str()))
            {
                self.warn(
                    &format!("{path}.sectionName"),
                    format!(
                        "{kind} {ns}/{} has no {} named \"{section}\": policy attaches to nothing (targetRef ignored)",
                        t.name, sections.what
                    ),
                );
            }
        }
        if P::EXCLUSIVE {
            self.policy_conflicts(policy);
        }
    }

    /// What a targetRef's `sectionName` can name in object `kind` `ns/name`: a Service's
    /// ports or a route's rules; `None` if there is no such object.
    fn sections(&self, kind: Kind, ns: &str, name: &str) -> Option<Sections<'a>> {
        let key = Key {
            kind,
            namespace: ns.to_string(),
            name: name.to_string(),
        };
        let obj: &'a Object = self.res.get(&key)?;
        // Rule names of a route, in order; labelled `0 (pay)`, `1`.
        let rules = |names: Vec<Option<&'a str>>| Sections {
            what: "rule",
            incomplete: false,
            list: names
                .into_iter()
                .enumerate()
                .map(|(i, n)| match n.filter(|n| !n.is_empty()) {
                    Some(name) => (n, format!("{i} ({name})")),
                    None => (n, i.to_string()),
                })
                .collect(),
        };
        Some(match &obj.resource {
            Resource::Service(svc) => Sections {
                what: "port",
                incomplete: svc.incomplete,
                list: svc
                    .ports
                    .iter()
                    .map(|p| {
                        let n = p.name.as_deref();
                        let label = match n.filter(|n| !n.is_empty()) {
                            Some(n) => format!("{} ({n})", p.port),
                            None => p.port.to_string(),
                        };
                        (n, label)
                    })
                    .collect(),
            },
            Resource::HTTPRoute(r) => rules(r.rules.iter().map(|r| r.name.as_deref()).collect()),
            Resource::GRPCRoute(r) => rules(r.rules.iter().map(|r| r.name.as_deref()).collect()),
            _ => return None,
        })
    }

    /// Warns at each targetRef of `policy` that ties with an older policy of its kind (same
    /// Service port or route rule, same specificity) and therefore applies nowhere there.
    fn policy_conflicts<P: Policy>(&mut self, policy: &P) {
        let ns = policy.meta().namespace.as_str();
        // (targetRef index, winner, sections lost, what they are) in first-seen order.
        let mut lost: Vec<(usize, &P, Vec<String>, &str)> = Vec::new();
        let mut targets: Vec<(Kind, &str)> = Vec::new();
        for t in policy.target_refs() {
            if let Some(kind) = P::target_of(t)
                && !targets.contains(&(kind, t.name.as_str()))
            {
                targets.push((kind, &t.name));
            }
        }
        for (kind, name) in targets {
            let Some(sections) = self.sections(kind, ns, name) else {
                continue;
            };
            let all = self.policies.targeting::<P>(kind, ns, name);
            for (section, label) in sections.list {
                let ranked = rank_policies(all, kind, name, section);
                let Some((best_rank, _, winner)) = ranked.first().copied() else {
                    continue;
                };
                let Some((_, ref_index, _)) = ranked
                    .iter()
                    .skip(1)
                    .find(|(rank, _, p)| *rank == best_rank && std::ptr::eq(*p, policy))
                    .copied()
                else {
                    continue;
                };
                match lost
                    .iter_mut()
                    .find(|(i, w, _, _)| *i == ref_index && std::ptr::eq(*w, winner))
                {
                    Some((_, _, labels, _)) => labels.push(label),
                    None => lost.push((ref_index, winner, vec![label], sections.what)),
                }
            }
        }
        for (i, winner, labels, what) in lost {
            let t = &policy.target_refs()[i];
            let (w, me) = (
                crate::compile::age_key(winner.meta()),
                crate::compile::age_key(policy.meta()),
            );
            let reason = if (w.0, &w.1) != (me.0, &me.1) {
                "it is older"
            } else {
                "same creationTimestamp, its name sorts first"
            };
            let plural = if labels.len() == 1 { "" } else { "s" };
            let kind = P::target_of(t).unwrap_or(Kind::Service);
            let winner = &winner.meta().name;
            self.warn(
                &format!("spec.targetRefs[{i}]"),
                format!(
                    "conflicts with {} {ns}/{winner} on {kind} {ns}/{} {what}{plural} {}: {ns}/{winner} applies there ({reason})",
                    P::KIND,
                    t.name,
                    labels.join(", "),
                ),
            );
        }
    }
}

/// The parts of a policy target a `sectionName` can name.
struct Sections<'a> {
    /// `port` or `rule`.
    what: &'static str,
    /// Some port of the Service did not decode: unknown names are not reported.
    incomplete: bool,
    /// (name, label for messages) of each section, in order.
    list: Vec<(Option<&'a str>, String)>,
}

/// `Services (group "", kind Service) and routes (...)`: what a policy kind targets.
fn describe_targets(kinds: &[Kind]) -> String {
    let mut parts = Vec::new();
    if kinds.contains(&Kind::Service) {
        parts.push("Services (group \"\", kind Service)".to_string());
    }
    if kinds.contains(&Kind::HTTPRoute) {
        parts.push(format!(
            "routes (group {GATEWAY_GROUP}, kind HTTPRoute or GRPCRoute)"
        ));
    }
    parts.join(" and ")
}

/// An RFC 7230 token (a cookie name).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Most retries a rule may ask for.
pub const MAX_RETRY_ATTEMPTS: i64 = 10;

/// The gRPC status code of a `retry.codes` entry: 0-16, or a canonical name in any case,
/// with `-` for `_` (`resource-exhausted`).
pub fn grpc_code(c: &RetryCode) -> Option<u8> {
    match c {
        RetryCode::Number(n) => u8::try_from(*n).ok().filter(|n| *n <= 16),
        RetryCode::Name(name) => {
            let canonical = name.to_ascii_uppercase().replace('-', "_");
            GRPC_CODES
                .iter()
                .position(|n| *n == canonical)
                .and_then(|i| u8::try_from(i).ok())
        }
        RetryCode::Invalid => None,
    }
}

/// A duration in Gateway API form: `2m`, `1m30s`, `25ms`, `0s`.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)] {
        if ms >= size {
            out += &format!("{}{unit}", ms / size);
            ms %= size;
        }
    }
    out
}

fn is_grpc_name(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || (dots && b == b'.'))
}

/// A Service's `spec.clusterIP`: `Ok(None)` when absent, empty or `None` (a headless
/// Service), the address otherwise.
pub fn cluster_ip(v: Option<&str>) -> Result<Option<IpAddr>, String> {
    match v {
        None | Some("" | "None") => Ok(None),
        Some(ip) => ip.parse().map(Some).map_err(|_| {
            format!("invalid clusterIP \"{ip}\" (expected an IPv4 or IPv6 address, or None)")
        }),
    }
}

/// A DNS label (RFC 1123): 1-63 lower-case alphanumerics or '-', alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS subdomain (RFC 1123): dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Parses a Gateway API duration: `^([0-9]{1,5}(h|m|s|ms)){1,4}$`, e.g. `10s`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration \"{s}\" (expected 1 to 4 number+unit parts with units h, m, s or ms, e.g. 10s, 500ms, 1h30m)"
        )
    };
    let b = s.as_bytes();
    let (mut i, mut parts, mut total) = (0, 0, Duration::ZERO);
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 5 {
            return Err(bad());
        }
        let n: u64 = s[start..i].parse().map_err(|_| bad())?;
        let part = if s[i..].starts_with("ms") {
            i += 2;
            Duration::from_millis(n)
        } else {
            let unit = match b.get(i) {
                Some(b'h') => 3600,
                Some(b'm') => 60,
                Some(b's') => 1,
                _ => return Err(bad()),
            };
            i += 1;
            Duration::from_secs(n * unit)
        };
        total += part;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// Compiles a Gateway API regular expression (RE2 syntax) to match the whole value: Tern
/// anchors every regex match, path, header, query and gRPC alike.
pub fn full_regex(re: &str) -> Result<regex::Regex, String> {
    // Compile the pattern as written first so that error positions refer to it.
    if let Err(e) = regex::Regex::new(re) {
        let text = e.to_string();
        let detail = text
            .lines()
            .find_map(|l| l.strip_prefix("error: "))
            .map(str::to_string)
            .unwrap_or_else(|| text.split_whitespace().collect::<Vec<_>>().join(" "));
        return Err(format!("invalid regular expression \"{re}\": {detail}"));
    }
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regular expression \"{re}\": {e}"))
}

/// A sortable key for an RFC 3339 UTC timestamp (`2024-05-01T12:00:00Z`, optional
/// fraction): the seconds part and the nanoseconds.
pub fn timestamp_key(ts: &str) -> Option<(String, u32)> {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && matches!(b[b.len() - 1], b'Z' | b'z');
    if !shape {
        return None;
    }
    let frac = &ts[19..ts.len() - 1];
    let nanos = if frac.is_empty() {
        0
    } else {
        let d = frac.strip_prefix('.')?;
        if d.is_empty() || d.len() > 9 || !d.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        format!("{d:0<9}").parse().ok()?
    };
    Some((ts[..19].to_ascii_uppercase(), nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("1h1m1s1ms"),
            Ok(Duration::from_millis(3_661_001))
        );
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "123456s",
            "1h1m1s1ms1s",
            "10 s",
            "-1s",
            "1d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn regexes_are_anchored_and_errors_one_line() {
        let re = full_regex("/api/v[0-9]+").unwrap();
        assert!(re.is_match("/api/v2"));
        assert!(!re.is_match("/x/api/v2"));
        assert!(!re.is_match("/api/v2/x"));
        let e = full_regex("(abc").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("unclosed group"), "{e}");
    }

    #[test]
    fn timestamps() {
        assert!(timestamp_key("2024-05-01T12:00:00Z").is_some());
        let a = timestamp_key("2024-05-01T12:00:00.5Z").unwrap();
        let b = timestamp_key("2024-05-01T12:00:00Z").unwrap();
        assert!(b < a);
        assert!(timestamp_key("yesterday").is_none());
        assert!(timestamp_key("2024-05-01 12:00:00").is_none());
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_label("checkout-v1"));
        assert!(!is_dns_label("Checkout"));
        assert!(!is_dns_label("-a"));
        assert!(is_dns_subdomain("a.b-c"));
        assert!(!is_dns_subdomain("a..b"));
    }
}

#[cfg(test)]
mod semantic_tests {
    use crate::testutil::{SHOP, diags, route};

    fn one(yaml: &str) -> String {
        let d = diags(yaml);
        assert_eq!(d.len(), 1, "{d:#?}");
        d.into_iter().next().unwrap_or_default()
    }

    fn r(rules: &str) -> String {
        one(&route(rules))
    }

    #[test]
    fn semantic_checks() {
        let cases = [
            "  - backendRefs: [{name: nope, port: 8080}]\n",
            "  - backendRefs: [{name: checkout-v1, port: 9999}]\n",
            "  - backendRefs: [{name: checkout-v1, port: 8080, weight: 0}, {name: checkout-v2, port: 8080, weight: 0}]\n",
            "  - matches: [{path: {type: RegularExpression, value: \"/a(\"}}]\n",
            "  - timeouts: {request: 1s, backendRequest: 2s}\n",
            "  - timeouts: {request: 10 seconds}\n",
            "  - matches: [{headers: [{name: \"bad header\", value: x}]}]\n",
            "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: \"a\\nb\"}]}}]\n",
            "  - matches: [{path: {type: Exact, value: /x}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]\n",
            "  - backendRefs: [{name: checkout-v1, port: 70000}]\n",
            "  - matches: [{method: FETCH}]\n",
            "  - matches: [{path: {value: relative}}]\n",
            "  - backendRefs: [{name: checkout-v1, port: 8080, weight: -1}]\n",
        ];
        let got: Vec<String> = cases.iter().map(|c| r(c)).collect();
        let want = [
            "routes.yaml:7:26: spec.rules[0].backendRefs[0].name: no Service shop/nope",
            "routes.yaml:7:45: spec.rules[0].backendRefs[0].port: Service shop/checkout-v1 has no port 9999",
            "routes.yaml:7:18: spec.rules[0].backendRefs: every backendRef has weight 0: the rule can send traffic nowhere",
            "routes.yaml:7:55: spec.rules[0].matches[0].path.value: invalid regular expression \"/a(\": unclosed group",
            "routes.yaml:7:45: spec.rules[0].timeouts.backendRequest: backendRequest timeout (2s) is longer than the request timeout (1s)",
            "routes.yaml:7:25: spec.rules[0].timeouts.request: invalid duration \"10 seconds\" (expected 1 to 4 number+unit parts with units h, m, s or ms, e.g. 10s, 500ms, 1h30m)",
            "routes.yaml:7:33: spec.rules[0].matches[0].headers[0].name: invalid header name \"bad header\"",
            "routes.yaml:7:92: spec.rules[0].filters[0].requestHeaderModifier.set[0].value: invalid header value \"a\\nb\"",
            "routes.yaml:8:60: spec.rules[0].filters[0].urlRewrite.path.type: ReplacePrefixMatch is only valid when every match of the rule is a PathPrefix match",
            "routes.yaml:7:45: spec.rules[0].backendRefs[0].port: port 70000 out of range (1-65535)",
            "routes.yaml:7:24: spec.rules[0].matches[0].method: unknown method \"FETCH\" (expected one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH)",
            "routes.yaml:7:30: spec.rules[0].matches[0].path.value: path must start with \"/\"",
            "routes.yaml:7:59: spec.rules[0].backendRefs[0].weight: weight -1 out of range (0-1000000)",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn parent_refs() {
        let missing = route("  - backendRefs: [{name: checkout-v1, port: 8080}]\n")
            .replace("name: checkout, port: 8080", "name: gone");
        assert_eq!(
            one(&missing),
            "routes.yaml:5:49: spec.parentRefs[0].name: no Service shop/gone"
        );
        let bad_port = route("  - {}\n").replace("port: 8080}", "port: 81}");
        assert_eq!(
            one(&bad_port),
            "routes.yaml:5:65: spec.parentRefs[0].port: Service shop/checkout has no port 81"
        );
        let gateway = route("  - {}\n").replace(
            "{group: \"\", kind: Service, name: checkout, port: 8080}",
            "{name: gw, sectionName: http}",
        );
        let d = diags(&gateway);
        assert_eq!(
            d,
            vec![
                "routes.yaml:5:16: spec.parentRefs[0]: warning: parentRef to Gateway shop/gw ignored: Tern only attaches routes to Services (group \"\", kind Service)",
                "routes.yaml:5:27: spec.parentRefs[0].sectionName: warning: field \"sectionName\" is not supported by Tern yet; ignored",
            ]
        );
    }

    #[test]
    fn duplicates_point_at_the_second() {
        let svc = SHOP.split("\n---\n").nth(1).unwrap_or_default();
        let d = diags(svc);
        assert_eq!(
            d,
            vec![
                "routes.yaml:3:18: metadata.name: duplicate Service shop/checkout-v1 (first defined at svc.yaml:10:18)"
            ]
        );
    }

    #[test]
    fn service_and_slice_checks() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: Bad_Name}\nspec:\n  ports:\n  - {name: a, port: 0}\n  - {port: 81}\n  - {name: a, port: 81}\n";
        assert_eq!(
            diags(svc),
            vec![
                "routes.yaml:3:18: metadata.name: invalid name \"Bad_Name\": must be a DNS label (lower-case letters, digits and '-', at most 63 characters)",
                "routes.yaml:6:21: spec.ports[0].port: port 0 out of range (1-65535)",
                "routes.yaml:7:5: spec.ports[1]: a Service with several ports must name each of them",
                "routes.yaml:8:12: spec.ports[2].name: duplicate port name \"a\" (also spec.ports[0])",
                "routes.yaml:8:21: spec.ports[2].port: duplicate port 81 (also spec.ports[1])",
            ]
        );
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, namespace: shop, labels: {kubernetes.io/service-name: nope}}\naddressType: IPv4\nendpoints: [{addresses: [\"::1\"]}]\n";
        assert_eq!(
            diags(slice),
            vec![
                "routes.yaml:3:75: metadata.labels.kubernetes.io/service-name: warning: no Service shop/nope; this EndpointSlice is ignored",
                "routes.yaml:5:26: endpoints[0].addresses[0]: invalid IPv4 address \"::1\"",
            ]
        );
    }

    #[test]
    fn grpc_checks() {
        let g = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: checkout}]\n  rules:\n  - matches: [{method: {type: Exact}}, {method: {type: RegularExpression, service: \"(\"}}]\n    filters: [{type: URLRewrite}]\n";
        let d = diags(g);
        assert_eq!(d.len(), 3, "{d:#?}");
        assert_eq!(
            d[0],
            "routes.yaml:7:24: spec.rules[0].matches[0].method: an Exact method match needs a service, a method or both"
        );
        assert!(d[1].starts_with("routes.yaml:7:84: spec.rules[0].matches[1].method.service: invalid regular expression"), "{}", d[1]);
        assert!(d[2].starts_with("routes.yaml:8:22: spec.rules[0].filters[0].type: unknown filter type \"URLRewrite\""), "{}", d[2]);
    }
}

#[cfg(test)]
mod retry_and_policy_tests {
    use crate::testutil::{MULTI, diags, grpc_route, policy, route};

    fn one(yaml: &str) -> String {
        let d = diags(yaml);
        assert_eq!(d.len(), 1, "{d:#?}");
        d.into_iter().next().unwrap_or_default()
    }

    #[test]
    fn retry_checks() {
        let http = [
            "  - retry: {attempts: 11}\n",
            "  - retry: {attempts: -1}\n",
            "  - retry: {backoff: 0s}\n",
            "  - retry: {backoff: 1sec}\n",
            "  - retry: {codes: [500, 399]}\n",
            "  - retry: {codes: [600]}\n",
        ];
        let got: Vec<String> = http.iter().map(|c| one(&route(c))).collect();
        assert_eq!(
            got,
            [
                "routes.yaml:7:23: spec.rules[0].retry.attempts: attempts 11 out of range (0-10)",
                "routes.yaml:7:23: spec.rules[0].retry.attempts: attempts -1 out of range (0-10)",
                "routes.yaml:7:22: spec.rules[0].retry.backoff: duration \"0s\" must be longer than 0",
                "routes.yaml:7:22: spec.rules[0].retry.backoff: invalid duration \"1sec\" (expected 1 to 4 number+unit parts with units h, m, s or ms, e.g. 10s, 500ms, 1h30m)",
                "routes.yaml:7:26: spec.rules[0].retry.codes[1]: status code 399 out of range (400-599)",
                "routes.yaml:7:21: spec.rules[0].retry.codes[0]: status code 600 out of range (400-599)",
            ]
        );
        let grpc = [
            "  - retry: {codes: [17]}\n",
            "  - retry: {codes: [-1]}\n",
            "  - retry: {codes: [unavailabel]}\n",
            "  - retry: {attempts: 11, backoff: 0ms}\n",
        ];
        let got: Vec<Vec<String>> = grpc.iter().map(|c| diags(&grpc_route(c))).collect();
        assert_eq!(
            got,
            [
                vec![
                    "routes.yaml:7:21: spec.rules[0].retry.codes[0]: gRPC status code 17 out of range (0-16)"
                ],
                vec![
                    "routes.yaml:7:21: spec.rules[0].retry.codes[0]: gRPC status code -1 out of range (0-16)"
                ],
                vec![
                    "routes.yaml:7:21: spec.rules[0].retry.codes[0]: unknown gRPC status code \"unavailabel\" (expected 0-16 or a name such as UNAVAILABLE or RESOURCE_EXHAUSTED)"
                ],
                vec![
                    "routes.yaml:7:23: spec.rules[0].retry.attempts: attempts 11 out of range (0-10)",
                    "routes.yaml:7:36: spec.rules[0].retry.backoff: duration \"0ms\" must be longer than 0",
                ],
            ]
        );
        // Every canonical name, any case, `-` for `_`, and the numbers at both ends.
        let names = crate::validate::GRPC_CODES.join(", ");
        let ok = format!(
            "  - retry: {{codes: [{names}, cancelled, Deadline-Exceeded, resource-exhausted, data_loss, 0, 16]}}\n"
        );
        assert_eq!(diags(&grpc_route(&ok)), Vec::<String>::new());
        // Boundaries that are fine.
        let ok = "  - retry: {attempts: 0, backoff: 1ms, codes: [400, 599]}\n  - retry: {attempts: 10, codes: []}\n";
        assert_eq!(diags(&route(ok)), Vec::<String>::new());
    }

    #[test]
    fn grpc_code_names() {
        use crate::model::RetryCode::{Invalid, Name, Number};
        use crate::validate::grpc_code;
        assert_eq!(grpc_code(&Name("UNAVAILABLE".into())), Some(14));
        assert_eq!(grpc_code(&Name("resource-exhausted".into())), Some(8));
        assert_eq!(grpc_code(&Name("Ok".into())), Some(0));
        assert_eq!(grpc_code(&Name("unauthenticated".into())), Some(16));
        assert_eq!(grpc_code(&Name("14".into())), None);
        assert_eq!(grpc_code(&Name("CANCELED".into())), None);
        assert_eq!(grpc_code(&Number(4)), Some(4));
        assert_eq!(grpc_code(&Number(17)), None);
        assert_eq!(grpc_code(&Invalid), None);
    }

    #[test]
    fn non_idempotent_annotation() {
        let annotate = |yaml: String, value: &str| {
            yaml.replace(
                "namespace: shop}",
                &format!(
                    "namespace: shop, annotations: {{retry.tern.dev/non-idempotent: \"{value}\"}}}}"
                ),
            )
        };
        let rules = "  - retry: {}\n";
        assert_eq!(
            one(&annotate(route(rules), "True")),
            "routes.yaml:3:83: metadata.annotations.retry.tern.dev/non-idempotent: invalid value \"True\" (expected \"true\" or \"false\")"
        );
        for v in ["true", "false"] {
            assert_eq!(diags(&annotate(route(rules), v)), Vec::<String>::new());
        }
        assert_eq!(
            one(&annotate(grpc_route(rules), "true")),
            "routes.yaml:3:83: metadata.annotations.retry.tern.dev/non-idempotent: warning: no effect on a GRPCRoute: a gRPC retry applies to every method (listing a status code is the service owner's permission)"
        );
        assert_eq!(
            one(&annotate(grpc_route(rules), "1")),
            "routes.yaml:3:83: metadata.annotations.retry.tern.dev/non-idempotent: invalid value \"1\" (expected \"true\" or \"false\")"
        );
        // Other annotations are not Tern's business.
        let other = route(rules).replace(
            "namespace: shop}",
            "namespace: shop, annotations: {example.com/x: anything}}",
        );
        assert_eq!(diags(&other), Vec::<String>::new());
    }

    #[test]
    fn policy_value_checks() {
        let cases = [
            "  retryBudget: {percent: 101}\n",
            "  retryBudget: {percent: -1}\n",
            "  retryBudget: {minRetriesPerSecond: -5}\n",
            "  retryBudget: {interval: 0s}\n",
            "  retryBudget: {interval: 10x}\n",
            "  circuitBreaker: {consecutiveFailures: -1}\n",
            "  circuitBreaker: {failureRate: {percent: 0}}\n",
            "  circuitBreaker: {failureRate: {percent: 101}}\n",
            "  circuitBreaker: {failureRate: {minRequests: 0}}\n",
            "  circuitBreaker: {failureRate: {interval: 0ms}}\n",
            "  circuitBreaker: {ejection: {base: 0s}}\n",
            "  circuitBreaker: {ejection: {base: 10s, max: 5s}}\n",
            "  circuitBreaker: {ejection: {base: 5m}}\n",
            "  circuitBreaker: {ejection: {max: 1s}}\n",
            "  circuitBreaker: {ejection: {maxEjectedPercent: 101}}\n",
            "  circuitBreaker: {failureStatusCodes: [600]}\n",
            "  circuitBreaker: {failureStatusCodes: [99]}\n",
            "  limits: {maxConnections: 0}\n",
            "  limits: {maxPendingRequests: -1}\n",
            "  limits: {maxRequests: 0}\n",
            "  limits: {maxRequests: 5000000000}\n",
        ];
        let got: Vec<String> = cases
            .iter()
            .map(|c| {
                one(&policy(
                    "p",
                    "",
                    &format!("  targetRefs: [{{name: checkout}}]\n{c}"),
                ))
            })
            .collect();
        let want = [
            "routes.yaml:6:26: spec.retryBudget.percent: percent 101 out of range (0-100)",
            "routes.yaml:6:26: spec.retryBudget.percent: percent -1 out of range (0-100)",
            "routes.yaml:6:38: spec.retryBudget.minRetriesPerSecond: minRetriesPerSecond must be at least 0 (got -5)",
            "routes.yaml:6:27: spec.retryBudget.interval: duration \"0s\" must be longer than 0",
            "routes.yaml:6:27: spec.retryBudget.interval: invalid duration \"10x\" (expected 1 to 4 number+unit parts with units h, m, s or ms, e.g. 10s, 500ms, 1h30m)",
            "routes.yaml:6:41: spec.circuitBreaker.consecutiveFailures: consecutiveFailures must be at least 0 (got -1)",
            "routes.yaml:6:43: spec.circuitBreaker.failureRate.percent: percent 0 out of range (1-100)",
            "routes.yaml:6:43: spec.circuitBreaker.failureRate.percent: percent 101 out of range (1-100)",
            "routes.yaml:6:47: spec.circuitBreaker.failureRate.minRequests: minRequests must be at least 1 (got 0)",
            "routes.yaml:6:44: spec.circuitBreaker.failureRate.interval: duration \"0ms\" must be longer than 0",
            "routes.yaml:6:37: spec.circuitBreaker.ejection.base: duration \"0s\" must be longer than 0",
            "routes.yaml:6:47: spec.circuitBreaker.ejection.max: ejection max (5s) is shorter than base (10s)",
            "routes.yaml:6:37: spec.circuitBreaker.ejection.base: ejection max (2m, the default) is shorter than base (5m)",
            "routes.yaml:6:36: spec.circuitBreaker.ejection.max: ejection max (1s) is shorter than base (5s, the default)",
            "routes.yaml:6:50: spec.circuitBreaker.ejection.maxEjectedPercent: maxEjectedPercent 101 out of range (0-100)",
            "routes.yaml:6:41: spec.circuitBreaker.failureStatusCodes[0]: status code 600 out of range (100-599)",
            "routes.yaml:6:41: spec.circuitBreaker.failureStatusCodes[0]: status code 99 out of range (100-599)",
            "routes.yaml:6:28: spec.limits.maxConnections: maxConnections must be at least 1 (got 0)",
            "routes.yaml:6:32: spec.limits.maxPendingRequests: maxPendingRequests must be at least 1 (got -1)",
            "routes.yaml:6:25: spec.limits.maxRequests: maxRequests must be at least 1 (got 0)",
            "routes.yaml:6:25: spec.limits.maxRequests: maxRequests 5000000000 out of range (1-4294967295)",
        ];
        assert_eq!(got, want);
        // Boundaries that are fine: 0 percent budget, disabled consecutive failures, max = base.
        let ok = "  targetRefs: [{name: checkout}]\n  retryBudget: {percent: 0, minRetriesPerSecond: 0}\n  circuitBreaker:\n    consecutiveFailures: 0\n    failureRate: {percent: 100, minRequests: 1}\n    ejection: {base: 1s, max: 1s, maxEjectedPercent: 0}\n    failureStatusCodes: [100, 599]\n  limits: {maxConnections: 1, maxPendingRequests: 1, maxRequests: 1}\n";
        assert_eq!(diags(&policy("p", "", ok)), Vec::<String>::new());
    }

    #[test]
    fn policy_target_checks() {
        let p = |refs: &str| diags(&policy("p", "", &format!("  targetRefs: {refs}\n")));
        assert_eq!(
            p("[{group: apps, kind: Deployment, name: checkout}]"),
            [
                "routes.yaml:5:36: spec.targetRefs[0].kind: unsupported targetRef kind apps/Deployment: a BackendPolicy targets Services (group \"\", kind Service)"
            ]
        );
        assert_eq!(
            p("[{group: gateway.networking.k8s.io, kind: Service, name: checkout}]"),
            [
                "routes.yaml:5:57: spec.targetRefs[0].kind: unsupported targetRef kind gateway.networking.k8s.io/Service: a BackendPolicy targets Services (group \"\", kind Service)"
            ]
        );
        assert_eq!(
            p("[{name: nope}, {name: checkout}]"),
            [
                "routes.yaml:5:23: spec.targetRefs[0].name: warning: no Service shop/nope: policy attaches to nothing (targetRef ignored)"
            ]
        );
        assert_eq!(
            p("[{name: checkout, sectionName: grpc}]"),
            [
                "routes.yaml:5:46: spec.targetRefs[0].sectionName: warning: Service shop/checkout has no port named \"grpc\": policy attaches to nothing (targetRef ignored)"
            ]
        );
        assert_eq!(
            p("[{name: checkout, sectionName: http}]"),
            Vec::<String>::new()
        );
    }

    /// `MULTI` then the given policies, as one file.
    fn policies(docs: &[String]) -> Vec<String> {
        diags(&(MULTI.to_string() + "---\n" + &docs.join("---\n")))
    }

    #[test]
    fn policy_conflicts() {
        let old = ", creationTimestamp: \"2020-01-01T00:00:00Z\"";
        let whole = "  targetRefs: [{name: multi}]\n";
        let http = "  targetRefs: [{name: multi, sectionName: http}]\n";
        // Two service-wide policies: the newer one loses every port to the older.
        assert_eq!(
            policies(&[policy("a-new", "", whole), policy("z-old", old, whole)]),
            [
                "routes.yaml:11:16: spec.targetRefs[0]: warning: conflicts with BackendPolicy shop/z-old on Service shop/multi ports 80 (http), 90 (grpc): shop/z-old applies there (it is older)"
            ]
        );
        // Same age: the name decides.
        assert_eq!(
            policies(&[policy("b", old, whole), policy("a", old, whole)]),
            [
                "routes.yaml:11:16: spec.targetRefs[0]: warning: conflicts with BackendPolicy shop/a on Service shop/multi ports 80 (http), 90 (grpc): shop/a applies there (same creationTimestamp, its name sorts first)"
            ]
        );
        // A sectionName policy overrides a service-wide one on its port: no conflict.
        assert_eq!(
            policies(&[policy("port", "", http), policy("svc", old, whole)]),
            Vec::<String>::new()
        );
        // Two sectionName policies on one port conflict on that port only; the older
        // service-wide one is not involved.
        assert_eq!(
            policies(&[
                policy("p1", old, http),
                policy("p2", "", http),
                policy("svc", old, whole)
            ]),
            [
                "routes.yaml:17:16: spec.targetRefs[0]: warning: conflicts with BackendPolicy shop/p1 on Service shop/multi port 80 (http): shop/p1 applies there (it is older)"
            ]
        );
        // One policy naming the Service twice does not conflict with itself.
        let twice = "  targetRefs: [{name: multi}, {name: multi, sectionName: http}]\n";
        assert_eq!(policies(&[policy("x", "", twice)]), Vec::<String>::new());
    }
}

#[cfg(test)]
mod traffic_policy_tests {
    use crate::testutil::{MULTI, diags, policy, policy_of, route};

    const SVC: &str = "  targetRefs: [{name: checkout}]\n";
    const ROUTE: &str =
        "  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]\n";

    /// Route `shop/r` on checkout:8080 with rules `pay` (0) and an unnamed one (1), then
    /// the given documents: the first one starts on line 15.
    fn with_route(docs: &[String]) -> Vec<String> {
        let r = route(
            "  - name: pay\n    backendRefs: [{name: checkout-v1, port: 8080}]\n  - backendRefs: [{name: checkout-v2, port: 8080}]\n",
        );
        diags(&(r + "---\n" + &docs.join("---\n")))
    }

    fn rate(name: &str, meta: &str, spec: &str) -> String {
        policy_of("RateLimitPolicy", name, meta, spec)
    }

    fn conc(name: &str, meta: &str, spec: &str) -> String {
        policy_of("ConcurrencyPolicy", name, meta, spec)
    }

    #[test]
    fn load_balancer_checks() {
        let cases = [
            "  loadBalancer: {algorithm: RingHash}\n",
            "  loadBalancer: {algorithm: Maglev, locality: {}}\n",
            "  loadBalancer: {algorithm: RoundRobin, hash: {header: x}}\n",
            "  loadBalancer: {hash: {sourceIP: true}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {header: \"x user\"}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {cookie: \"\"}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {cookie: \"a;b\"}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {sourceIP: false}}\n",
            "  loadBalancer: {locality: {minHealthyPercent: 0}}\n",
            "  loadBalancer: {locality: {minHealthyPercent: 101}}\n",
        ];
        let got: Vec<Vec<String>> = cases
            .iter()
            .map(|c| diags(&policy("p", "", &format!("{SVC}{c}"))))
            .collect();
        let want: [&[&str]; 10] = [
            &[
                "routes.yaml:6:29: spec.loadBalancer.algorithm: RingHash needs loadBalancer.hash: {header: <name>}, {cookie: <name>} or {sourceIP: true}",
            ],
            &[
                "routes.yaml:6:29: spec.loadBalancer.algorithm: Maglev needs loadBalancer.hash: {header: <name>}, {cookie: <name>} or {sourceIP: true}",
            ],
            &[
                "routes.yaml:6:47: spec.loadBalancer.hash: warning: hash is only used by RingHash and Maglev; ignored with RoundRobin",
            ],
            &[
                "routes.yaml:6:24: spec.loadBalancer.hash: warning: hash is only used by RingHash and Maglev; ignored with P2CPeakEWMA (the default)",
            ],
            &["routes.yaml:6:54: spec.loadBalancer.hash.header: invalid header name \"x user\""],
            &["routes.yaml:6:54: spec.loadBalancer.hash.cookie: cookie name must not be empty"],
            &["routes.yaml:6:54: spec.loadBalancer.hash.cookie: invalid cookie name \"a;b\""],
            &[
                "routes.yaml:6:56: spec.loadBalancer.hash.sourceIP: sourceIP: false hashes on nothing (write sourceIP: true, or hash on a header or a cookie)",
            ],
            &[
                "routes.yaml:6:48: spec.loadBalancer.locality.minHealthyPercent: minHealthyPercent 0 out of range (1-100)",
            ],
            &[
                "routes.yaml:6:48: spec.loadBalancer.locality.minHealthyPercent: minHealthyPercent 101 out of range (1-100)",
            ],
        ];
        assert_eq!(got, want);
        // Fine: every algorithm, hashes on the two that use them, header names in any
        // case, the percent's boundaries, locality off.
        for ok in [
            "  loadBalancer: {}\n",
            "  loadBalancer: {algorithm: P2CPeakEWMA, locality: {minHealthyPercent: 1}}\n",
            "  loadBalancer: {algorithm: RoundRobin, locality: {enabled: false, minHealthyPercent: 100}}\n",
            "  loadBalancer: {algorithm: LeastRequest}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {header: X-User}}\n",
            "  loadBalancer: {algorithm: Maglev, hash: {cookie: session_id}}\n",
            "  loadBalancer: {algorithm: Maglev, hash: {sourceIP: true}}\n",
        ] {
            assert_eq!(
                diags(&policy("p", "", &format!("{SVC}{ok}"))),
                Vec::<String>::new(),
                "{ok}"
            );
        }
    }

    #[test]
    fn concurrency_checks() {
        let cases = [
            "  concurrency: {maxConcurrent: 0}\n",
            "  concurrency: {maxConcurrent: 1, maxQueue: -1}\n",
            "  concurrency: {maxConcurrent: 1, queueTimeout: 0s}\n",
            "  concurrency: {maxConcurrent: 10, adaptive: {minLimit: 0, maxLimit: 0}}\n",
            "  concurrency: {maxConcurrent: 10, adaptive: {minLimit: 11, maxLimit: 9}}\n",
            "  concurrency: {maxConcurrent: 5000000000}\n",
        ];
        let got: Vec<Vec<String>> = cases
            .iter()
            .map(|c| diags(&policy("p", "", &format!("{SVC}{c}"))))
            .collect();
        let want: [&[&str]; 6] = [
            &[
                "routes.yaml:6:32: spec.concurrency.maxConcurrent: maxConcurrent must be at least 1 (got 0)",
            ],
            &["routes.yaml:6:45: spec.concurrency.maxQueue: maxQueue must be at least 0 (got -1)"],
            &[
                "routes.yaml:6:49: spec.concurrency.queueTimeout: duration \"0s\" must be longer than 0",
            ],
            &[
                "routes.yaml:6:57: spec.concurrency.adaptive.minLimit: minLimit must be at least 1 (got 0)",
                "routes.yaml:6:70: spec.concurrency.adaptive.maxLimit: maxLimit must be at least 1 (got 0)",
            ],
            &[
                "routes.yaml:6:57: spec.concurrency.adaptive.minLimit: minLimit (11) is greater than maxConcurrent (10)",
                "routes.yaml:6:71: spec.concurrency.adaptive.maxLimit: maxLimit (9) is less than maxConcurrent (10)",
            ],
            &[
                "routes.yaml:6:32: spec.concurrency.maxConcurrent: maxConcurrent 5000000000 out of range (1-4294967295)",
            ],
        ];
        assert_eq!(got, want);
        // The same checks at the top of a ConcurrencyPolicy's spec.
        assert_eq!(
            with_route(&[conc(
                "c",
                "",
                &format!(
                    "{ROUTE}  maxConcurrent: 10\n  maxQueue: -1\n  adaptive: {{minLimit: 20}}\n"
                )
            )]),
            [
                "routes.yaml:17:13: spec.maxQueue: maxQueue must be at least 0 (got -1)",
                "routes.yaml:18:24: spec.adaptive.minLimit: minLimit (20) is greater than maxConcurrent (10)",
            ]
        );
        // Boundaries that are fine: minLimit = maxConcurrent = maxLimit, an empty queue.
        let ok = "  concurrency: {maxConcurrent: 1, maxQueue: 0, queueTimeout: 1ms, adaptive: {algorithm: AIMD, minLimit: 1, maxLimit: 1}}\n";
        assert_eq!(
            diags(&policy("p", "", &format!("{SVC}{ok}"))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn rate_limit_checks() {
        assert_eq!(
            diags(&rate(
                "p",
                "",
                &format!(
                    "{SVC}  rate: {{requests: 0, per: 0s, burst: -1}}\n  key: {{header: \"a b\"}}\n"
                )
            )),
            [
                "routes.yaml:6:20: spec.rate.requests: requests must be at least 1 (got 0)",
                "routes.yaml:6:28: spec.rate.per: duration \"0s\" must be longer than 0",
                "routes.yaml:6:39: spec.rate.burst: burst must be at least 0 (got -1)",
                "routes.yaml:7:17: spec.key.header: invalid header name \"a b\"",
            ]
        );
        assert_eq!(
            diags(&rate(
                "p",
                "",
                &format!("{SVC}  rate: {{requests: 5000000000, per: 1d}}\n")
            )),
            [
                "routes.yaml:6:20: spec.rate.requests: requests 5000000000 out of range (1-4294967295)",
                "routes.yaml:6:37: spec.rate.per: invalid duration \"1d\" (expected 1 to 4 number+unit parts with units h, m, s or ms, e.g. 10s, 500ms, 1h30m)",
            ]
        );
        let ok = format!(
            "{SVC}  rate: {{requests: 1, per: 1h, burst: 0}}\n  key: {{header: X-Tenant}}\n"
        );
        assert_eq!(diags(&rate("p", "", &ok)), Vec::<String>::new());
    }

    #[test]
    fn target_checks() {
        let deployment = "  targetRefs: [{group: apps, kind: Deployment, name: x}]\n";
        assert_eq!(
            diags(&rate(
                "p",
                "",
                &format!("{deployment}  rate: {{requests: 1}}\n")
            )),
            [
                "routes.yaml:5:36: spec.targetRefs[0].kind: unsupported targetRef kind apps/Deployment: a RateLimitPolicy targets Services (group \"\", kind Service) and routes (group gateway.networking.k8s.io, kind HTTPRoute or GRPCRoute)"
            ]
        );
        // A route kind needs the Gateway API group.
        assert_eq!(
            diags(&rate(
                "p",
                "",
                "  targetRefs: [{kind: HTTPRoute, name: r}]\n  rate: {requests: 1}\n"
            )),
            [
                "routes.yaml:5:23: spec.targetRefs[0].kind: unsupported targetRef kind HTTPRoute: a RateLimitPolicy targets Services (group \"\", kind Service) and routes (group gateway.networking.k8s.io, kind HTTPRoute or GRPCRoute)"
            ]
        );
        assert_eq!(
            diags(&conc("p", "", &format!("{SVC}  maxConcurrent: 10\n"))),
            [
                "routes.yaml:5:16: spec.targetRefs[0].kind: a ConcurrencyPolicy targets routes (group gateway.networking.k8s.io, kind HTTPRoute or GRPCRoute); to limit concurrency to a Service, use BackendPolicy.spec.concurrency"
            ]
        );
        assert_eq!(
            diags(&conc(
                "p",
                "",
                &format!("{deployment}  maxConcurrent: 10\n")
            )),
            [
                "routes.yaml:5:36: spec.targetRefs[0].kind: unsupported targetRef kind apps/Deployment: a ConcurrencyPolicy targets routes (group gateway.networking.k8s.io, kind HTTPRoute or GRPCRoute)"
            ]
        );
        // Targets that do not exist, by name or section: warnings.
        let gw = "group: gateway.networking.k8s.io";
        assert_eq!(
            with_route(&[
                rate(
                    "a",
                    "",
                    &format!(
                        "  targetRefs: [{{{gw}, kind: HTTPRoute, name: r, sectionName: refund}}]\n  rate: {{requests: 1}}\n"
                    )
                ),
                rate(
                    "b",
                    "",
                    &format!(
                        "  targetRefs: [{{{gw}, kind: GRPCRoute, name: r}}]\n  rate: {{requests: 1}}\n"
                    )
                ),
                rate(
                    "c",
                    "",
                    "  targetRefs: [{name: checkout, sectionName: grpc}]\n  rate: {requests: 1}\n"
                ),
                conc(
                    "d",
                    "",
                    &format!(
                        "  targetRefs: [{{{gw}, kind: HTTPRoute, name: gone}}]\n  maxConcurrent: 1\n"
                    )
                ),
            ]),
            [
                "routes.yaml:15:90: spec.targetRefs[0].sectionName: warning: HTTPRoute shop/r has no rule named \"refund\": policy attaches to nothing (targetRef ignored)",
                "routes.yaml:22:74: spec.targetRefs[0].name: warning: no GRPCRoute shop/r: policy attaches to nothing (targetRef ignored)",
                "routes.yaml:29:46: spec.targetRefs[0].sectionName: warning: Service shop/checkout has no port named \"grpc\": policy attaches to nothing (targetRef ignored)",
                "routes.yaml:36:74: spec.targetRefs[0].name: warning: no HTTPRoute shop/gone: policy attaches to nothing (targetRef ignored)",
            ]
        );
        // Existing targets: nothing to say.
        assert_eq!(
            with_route(&[
                rate(
                    "a",
                    "",
                    &format!(
                        "  targetRefs: [{{{gw}, kind: HTTPRoute, name: r, sectionName: pay}}, {{name: checkout, sectionName: http}}]\n  rate: {{requests: 1}}\n"
                    )
                ),
                conc("b", "", &format!("{ROUTE}  maxConcurrent: 1\n")),
            ]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn conflicts() {
        let old = ", creationTimestamp: \"2020-01-01T00:00:00Z\"";
        let gw = "group: gateway.networking.k8s.io";
        let pay = format!("  targetRefs: [{{{gw}, kind: HTTPRoute, name: r, sectionName: pay}}]\n");
        let limit = "  rate: {requests: 1}\n";
        // Route-wide against route-wide: the newer loses every rule.
        assert_eq!(
            with_route(&[
                rate("a", "", &format!("{ROUTE}{limit}")),
                rate("b", old, &format!("{ROUTE}{limit}")),
            ]),
            [
                "routes.yaml:15:16: spec.targetRefs[0]: warning: conflicts with RateLimitPolicy shop/b on HTTPRoute shop/r rules 0 (pay), 1: shop/b applies there (it is older)"
            ]
        );
        // A rule named by sectionName beats the route-wide policy (no warning); two of
        // them on that rule conflict there only.
        assert_eq!(
            with_route(&[
                conc("a", "", &format!("{pay}  maxConcurrent: 1\n")),
                conc("b", "", &format!("{pay}  maxConcurrent: 1\n")),
                conc("c", old, &format!("{ROUTE}  maxConcurrent: 1\n")),
            ]),
            [
                "routes.yaml:22:16: spec.targetRefs[0]: warning: conflicts with ConcurrencyPolicy shop/a on HTTPRoute shop/r rule 0 (pay): shop/a applies there (same creationTimestamp, its name sorts first)"
            ]
        );
        // Service targets: by port, as for BackendPolicy.
        let whole = "  targetRefs: [{name: multi}]\n";
        let http = "  targetRefs: [{name: multi, sectionName: http}]\n";
        let docs = [
            MULTI.to_string(),
            rate("svc", old, &format!("{whole}{limit}")),
            rate("new", "", &format!("{whole}{limit}")),
            rate("port", "", &format!("{http}{limit}")),
        ];
        assert_eq!(
            diags(&docs.join("---\n")),
            [
                "routes.yaml:18:16: spec.targetRefs[0]: warning: conflicts with RateLimitPolicy shop/svc on Service shop/multi port 90 (grpc): shop/svc applies there (it is older)"
            ]
        );
        // Different kinds never conflict: a BackendPolicy, a RateLimitPolicy on the
        // Service and one on the route, a ConcurrencyPolicy on the route.
        assert_eq!(
            with_route(&[
                policy("a", "", SVC),
                rate("b", "", &format!("{SVC}{limit}")),
                rate("c", "", &format!("{ROUTE}{limit}")),
                conc("d", "", &format!("{ROUTE}  maxConcurrent: 1\n")),
            ]),
            Vec::<String>::new()
        );
    }

    fn authz(name: &str, spec: &str) -> String {
        policy_of("AuthorizationPolicy", name, "", spec)
    }

    #[test]
    fn authorization_policy_checks() {
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        // Valid: every clause form; `allow: []` (deny everything); route targets.
        assert_eq!(
            with_route(&[
                authz(
                    "all",
                    &format!(
                        "{SVC}  allow:\n  - identities: [\"{web}\"]\n  - namespaces: [shop, ops]\n  - meshed: true\n  - unauthenticated: true\n"
                    )
                ),
                authz("deny", &format!("{SVC}  allow: []\n")),
                authz(
                    "pay",
                    "  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: pay}]\n  allow: [{meshed: true}]\n"
                ),
            ]),
            Vec::<String>::new()
        );
        let one = |spec: &str| with_route(&[authz("p", spec)]);
        let cases = [
            format!("{SVC}  allow: [{{}}]\n"),
            format!("{SVC}  allow: [{{meshed: false, identities: []}}]\n"),
            format!(
                "{SVC}  allow:\n  - identities: [\"{web}\", \"spiffe://cluster.local/sa/web\", \"spiffe://cluster.local/ns/Shop/sa/web\"]\n"
            ),
            format!("{SVC}  allow: [{{namespaces: [shop, Ops]}}]\n"),
            "  targetRefs: [{name: nope}, {kind: Deployment, group: apps, name: x}]\n  allow: []\n"
                .to_string(),
            "  targetRefs: [{name: checkout, sectionName: grpc}, {group: gateway.networking.k8s.io, kind: GRPCRoute, name: r}]\n  allow: []\n"
                .to_string(),
        ];
        let got: Vec<Vec<String>> = cases.iter().map(|c| one(c)).collect();
        let want: [&[&str]; 6] = [
            &[
                "routes.yaml:16:11: spec.allow[0]: an allow clause needs at least one of identities, namespaces, meshed: true or unauthenticated: true (to deny everything, write allow: [])",
            ],
            &[
                "routes.yaml:16:11: spec.allow[0]: an allow clause needs at least one of identities, namespaces, meshed: true or unauthenticated: true (to deny everything, write allow: [])",
            ],
            &[
                "routes.yaml:17:59: spec.allow[0].identities[1]: \"spiffe://cluster.local/sa/web\" is not a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<name>)",
                "routes.yaml:17:92: spec.allow[0].identities[2]: namespace \"Shop\" is not a valid name (lowercase letters, digits, '-' and '.')",
            ],
            &[
                "routes.yaml:16:31: spec.allow[0].namespaces[1]: invalid namespace \"Ops\": must be a DNS label",
            ],
            &[
                "routes.yaml:15:23: spec.targetRefs[0].name: warning: no Service shop/nope: policy attaches to nothing (targetRef ignored)",
                "routes.yaml:15:37: spec.targetRefs[1].kind: unsupported targetRef kind apps/Deployment: an AuthorizationPolicy targets Services (group \"\", kind Service) and routes (group gateway.networking.k8s.io, kind HTTPRoute or GRPCRoute)",
            ],
            &[
                "routes.yaml:15:46: spec.targetRefs[0].sectionName: warning: Service shop/checkout has no port named \"grpc\": policy attaches to nothing (targetRef ignored)",
                "routes.yaml:15:111: spec.targetRefs[1].name: warning: no GRPCRoute shop/r: policy attaches to nothing (targetRef ignored)",
            ],
        ];
        assert_eq!(got, want);
        // Several policies on one target never conflict (they add up).
        let old = ", creationTimestamp: \"2020-01-01T00:00:00Z\"";
        assert_eq!(
            with_route(&[
                policy_of(
                    "AuthorizationPolicy",
                    "a",
                    old,
                    &format!("{SVC}  allow: []\n")
                ),
                authz("b", &format!("{SVC}  allow: [{{meshed: true}}]\n")),
                authz("c", &format!("{ROUTE}  allow: [{{meshed: true}}]\n")),
                authz("d", &format!("{ROUTE}  allow: []\n")),
            ]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn mtls_service_account_and_cluster_ip_checks() {
        let svc = |name: &str, meta: &str, spec: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop{meta}}}\nspec: {{ports: [{{port: 80}}]{spec}}}\n"
            )
        };
        let docs = [
            svc("ok", ", annotations: {tern.dev/mtls-mode: strict}", ", clusterIP: 10.96.0.1"),
            svc("lax", ", annotations: {tern.dev/mtls-mode: permissive}", ", clusterIP: None"),
            svc("typo", ", annotations: {tern.dev/mtls-mode: STRICT}", ", clusterIP: \"\""),
            svc("bad-ip", "", ", clusterIP: 10.96.0.300"),
            svc("z-dup", "", ", clusterIP: 10.96.0.1"),
            svc("v6", "", ", clusterIP: \"fd00::1\""),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n  namespace: shop\n  labels: {kubernetes.io/service-name: ok}\n  annotations: {tern.dev/service-account: Web_SA}\naddressType: IPv4\nendpoints: []\n".to_string(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: t\n  namespace: shop\n  labels: {kubernetes.io/service-name: ok}\n  annotations: {tern.dev/service-account: web.sa-1}\naddressType: IPv4\nendpoints: []\n".to_string(),
        ];
        assert_eq!(
            diags(&docs.join("---\n")),
            [
                "routes.yaml:13:75: metadata.annotations.tern.dev/mtls-mode: invalid mTLS mode \"STRICT\" (expected \"strict\" or \"permissive\")",
                "routes.yaml:19:40: spec.clusterIP: invalid clusterIP \"10.96.0.300\" (expected an IPv4 or IPv6 address, or None)",
                "routes.yaml:24:40: spec.clusterIP: duplicate clusterIP 10.96.0.1 (also Service shop/ok at routes.yaml:4:40)",
                "routes.yaml:37:43: metadata.annotations.tern.dev/service-account: invalid service account \"Web_SA\": must be a DNS subdomain (lower-case letters, digits, '-' and '.')",
            ]
        );
    }
}
