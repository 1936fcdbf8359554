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
//! Compilation assumes [`crate::validate`] passed; anything that still does not parse is
//! skipped rather than panicking.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde_json::{Value, json};

use crate::model::{self, Filter, Kind, MatchType, PathType, Resource};
use crate::resources::Resources;
use crate::snapshot::*;
use crate::validate::{REGION_LABEL, SERVICE_NAME_LABEL, full_regex, parse_duration, timestamp_key};

/// Builds the snapshot of a resource set that passed validation.
pub fn compile(res: &Resources) -> Snapshot {
    let mut c = Compiler {
        res,
        backends: Vec::new(),
        backend_ids: HashMap::new(),
    };
    let mut services = HashMap::new();
    let mut by_name: HashMap<String, Vec<String>> = HashMap::new();
    let mut json_services = Vec::new();
    for obj in res.of_kind(Kind::Service) {
        let Resource::Service(svc) = &obj.resource else { continue };
        let id = ObjectRef {
            namespace: svc.meta.namespace.clone(),
            name: svc.meta.name.clone(),
        };
        let mut ports = Vec::new();
        let mut json_ports = Vec::new();
        for p in &svc.ports {
            let Ok(port) = u16::try_from(p.port) else { continue };
            let sp = c.service_port(&id, port, p);
            json_ports.push(port_json(&sp));
            ports.push(Arc::new(sp));
        }
        json_services.push(json!({"service": id.to_string(), "ports": json_ports}));
        by_name
            .entry(id.name.clone())
            .or_default()
            .push(id.namespace.clone());
        services.insert(id.clone(), Arc::new(Service { id, ports }));
    }
    for namespaces in by_name.values_mut() {
        namespaces.sort();
    }
    let version = res.version();
    let json = json!({
        "version": version,
        "services": json_services,
        "backends": c.backends.iter().map(|b| backend_json(b)).collect::<Vec<_>>(),
    });
    Snapshot {
        version,
        services,
        by_name,
        backends: c.backends,
        json,
    }
}

struct Compiler<'a> {
    res: &'a Resources,
    backends: Vec<Arc<Backend>>,
    backend_ids: HashMap<(ObjectRef, u16), usize>,
}

/// Sort key of an HTTP match entry; see the module doc.
type HttpKey = (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>, AgeKey, usize, usize);
/// Route tie-breakers: age (absent = newest), then namespace/name.
type AgeKey = (bool, (String, u32), String, String);

fn age_key(meta: &model::Meta) -> AgeKey {
    let ts = meta.creation_timestamp.as_deref().and_then(timestamp_key);
    (
        ts.is_none(),
        ts.unwrap_or_default(),
        meta.namespace.clone(),
        meta.name.clone(),
    )
}

impl Compiler<'_> {
    fn service_port(&mut self, id: &ObjectRef, port: u16, spec: &model::ServicePort) -> ServicePort {
        let mut http: Vec<(HttpKey, HttpRuleMatch)> = Vec::new();
        let mut grpc: Vec<((u8, usize, Reverse<usize>, AgeKey, usize, usize), GrpcRuleMatch)> = Vec::new();
        let mut attached = false;
        for obj in self.res.iter() {
            match &obj.resource {
                Resource::HTTPRoute(r) if attaches(&r.parent_refs, id, port) => {
                    attached = true;
                    let label: Arc<str> = format!("{}/{}", r.meta.namespace, r.meta.name).into();
                    for (ri, rule) in r.rules.iter().enumerate() {
                        let compiled = Arc::new(self.rule(
                            &label,
                            ri,
                            RouteKind::HTTPRoute,
                            &rule.backend_refs,
                            &rule.filters,
                            &rule.timeouts,
                        ));
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
                            http.push((key, HttpRuleMatch { m: hm, rule: compiled.clone() }));
                        }
                    }
                }
                Resource::GRPCRoute(r) if attaches(&r.parent_refs, id, port) => {
                    attached = true;
                    let label: Arc<str> = format!("{}/{}", r.meta.namespace, r.meta.name).into();
                    for (ri, rule) in r.rules.iter().enumerate() {
                        let compiled = Arc::new(self.rule(
                            &label,
                            ri,
                            RouteKind::GRPCRoute,
                            &rule.backend_refs,
                            &rule.filters,
                            &model::Timeouts::default(),
                        ));
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
                            grpc.push((key, GrpcRuleMatch { m: gm, rule: compiled.clone() }));
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
            })
        });
        ServicePort {
            service: id.clone(),
            port,
            name: spec.name.clone().filter(|n| !n.is_empty()),
            protocol: protocol(spec.app_protocol.as_deref()),
            http: http.into_iter().map(|(_, m)| m).collect(),
            grpc: grpc.into_iter().map(|(_, m)| m).collect(),
            default_rule,
        }
    }

    fn rule(
        &mut self,
        route: &Arc<str>,
        rule_index: usize,
        kind: RouteKind,
        refs: &[model::BackendRef],
        filters: &[Filter],
        timeouts: &model::Timeouts,
    ) -> Rule {
        let mut entries = Vec::new();
        let mut total: u32 = 0;
        for b in refs {
            let (Some(port), Ok(weight)) = (b.port.and_then(|p| u16::try_from(p).ok()), u32::try_from(b.weight)) else {
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
        };
        for f in filters {
            match f {
                Filter::RequestHeaderModifier(m) => rule.request_headers = header_modifier(m),
                Filter::ResponseHeaderModifier(m) => rule.response_headers = header_modifier(m),
                Filter::URLRewrite(u) => {
                    rule.url_rewrite = Some(UrlRewrite {
                        hostname: u.hostname.as_deref().and_then(|h| HeaderValue::from_str(h).ok()),
                        path: u.path.as_ref().map(|p| match p {
                            model::PathModifier::ReplaceFullPath(v) => PathRewrite::ReplaceFullPath(v.clone()),
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
        });
        self.backends.push(backend.clone());
        self.backend_ids.insert((id.clone(), port), index);
        Some(backend)
    }

    /// Every endpoint of a Service port, from the EndpointSlices labelled with its name.
    fn endpoints(&self, svc: &model::Service, sp: &model::ServicePort) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for obj in self.res.of_kind(Kind::EndpointSlice) {
            let Resource::EndpointSlice(slice) = &obj.resource else { continue };
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
                .or_else(|| (svc.ports.len() == 1 && slice.ports.len() == 1).then(|| &slice.ports[0]));
            let Some(port) = slice_port.and_then(|p| p.port).and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            let region: Option<Arc<str>> = slice.meta.labels.get(REGION_LABEL).map(|r| r.as_str().into());
            for ep in &slice.endpoints {
                let zone: Option<Arc<str>> = ep.zone.as_deref().map(Into::into);
                for a in &ep.addresses {
                    let Ok(ip) = a.parse::<IpAddr>() else { continue };
                    out.push(Endpoint {
                        addr: SocketAddr::new(ip, port),
                        ready: ep.ready,
                        zone: zone.clone(),
                        region: region.clone(),
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
            let headers: BTreeMap<&str, Value> = h
                .m
                .headers
                .iter()
                .map(|m| (m.name.as_str(), string_match_json(&m.value)))
                .collect();
            let query: BTreeMap<&str, Value> = h
                .m
                .query
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
            let headers: BTreeMap<&str, Value> = g
                .m
                .headers
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
    })
}

fn backend_json(b: &Backend) -> Value {
    json!({
        "index": b.index,
        "name": &*b.name,
        "protocol": b.protocol,
        "endpoints": b.endpoints.iter().map(|e| json!({
            "addr": e.addr.to_string(),
            "ready": e.ready,
            "zone": e.zone.as_deref(),
            "region": e.region.as_deref(),
        })).collect::<Vec<_>>(),
    })
}
