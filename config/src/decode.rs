//! Located YAML nodes to typed [`crate::model`] resources.
//!
//! Hand-written rather than serde-derived so that one document can report every problem
//! at once (a serde deserializer stops at the first) and so that fields Tern knows but
//! does not implement can be warnings instead of errors. Problems found here are
//! structural: wrong types, unknown or missing fields, unknown enum values.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::diag::{Diagnostic, Sink};
use crate::model::*;
use crate::snapshot::{AdaptiveAlgorithm, Algorithm};
use crate::yaml::{self, LocMap, Node, NodeKind, Scalar, join};

/// Standard ObjectMeta fields that carry nothing Tern needs: accepted silently.
const META_SILENT: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "generateName",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

/// Service spec fields that do not matter to a proxy: accepted silently.
const SERVICE_SPEC_SILENT: &[&str] = &[
    "selector",
    "type",
    "clusterIPs",
    "sessionAffinity",
    "sessionAffinityConfig",
    "ipFamilies",
    "ipFamilyPolicy",
    "internalTrafficPolicy",
    "externalTrafficPolicy",
    "externalIPs",
    "externalName",
    "loadBalancerIP",
    "loadBalancerSourceRanges",
    "loadBalancerClass",
    "healthCheckNodePort",
    "publishNotReadyAddresses",
    "allocateLoadBalancerNodePorts",
    "trafficDistribution",
];

/// Parses and decodes one file. A YAML syntax error yields one diagnostic and no objects:
/// a file that does not parse as a whole is not trusted in part.
pub fn decode_file(file: &str, text: &str, diags: &mut Vec<Diagnostic>) -> Vec<Object> {
    let mut sink = Sink { file, diags };
    let docs = match yaml::parse(text) {
        Ok(docs) => docs,
        Err(e) => {
            sink.error(e.loc, "", format!("YAML syntax error: {}", e.message));
            return Vec::new();
        }
    };
    let file: Arc<str> = file.into();
    docs.iter()
        .filter(|d| !d.is_null())
        .filter_map(|doc| {
            let resource = decode_doc(&mut sink, doc)?;
            Some(Object {
                resource,
                source: Source {
                    file: file.clone(),
                    locs: Arc::new(LocMap::build(doc)),
                },
            })
        })
        .collect()
}

/// The entries of a mapping node being decoded, with which keys were consumed.
struct Fields<'n> {
    node: &'n Node,
    path: String,
    entries: Vec<(&'n Node, &'n Node)>,
    used: Vec<bool>,
}

impl<'n> Fields<'n> {
    fn new(s: &mut Sink, node: &'n Node, path: &str) -> Option<Fields<'n>> {
        match &node.kind {
            NodeKind::Map(entries) => Some(Fields {
                node,
                path: path.to_string(),
                entries: entries.iter().map(|(k, v)| (k, v)).collect(),
                used: vec![false; entries.len()],
            }),
            _ if node.is_null() => Some(Fields {
                node,
                path: path.to_string(),
                entries: Vec::new(),
                used: Vec::new(),
            }),
            _ => {
                s.error(node.loc, path, "expected a mapping");
                None
            }
        }
    }

    /// The value of `key` and its path; `None` when absent or null (Kubernetes treats an
    /// explicit null as absent).
    fn take(&mut self, key: &str) -> Option<(&'n Node, String)> {
        let i = self
            .entries
            .iter()
            .position(|(k, _)| k.key_text() == Some(key))?;
        self.used[i] = true;
        let v = self.entries[i].1;
        (!v.is_null()).then(|| (v, join(&self.path, key)))
    }

    fn str(&mut self, s: &mut Sink, key: &str) -> Option<String> {
        let (n, p) = self.take(key)?;
        string(s, n, &p)
    }

    fn int(&mut self, s: &mut Sink, key: &str) -> Option<i64> {
        let (n, p) = self.take(key)?;
        int(s, n, &p)
    }

    fn boolean(&mut self, s: &mut Sink, key: &str) -> Option<bool> {
        let (n, p) = self.take(key)?;
        match n.scalar() {
            Some(Scalar::Bool(b)) => Some(b),
            _ => {
                s.error(n.loc, &p, "expected true or false");
                None
            }
        }
    }

    fn map(&mut self, s: &mut Sink, key: &str) -> Option<Fields<'n>> {
        let (n, p) = self.take(key)?;
        Fields::new(s, n, &p)
    }

    fn list(&mut self, s: &mut Sink, key: &str) -> Vec<(&'n Node, String)> {
        match self.take(key) {
            Some((n, p)) => list(s, n, &p),
            None => Vec::new(),
        }
    }

    /// Like [`Fields::str`] but reports a missing field.
    fn required_str(&mut self, s: &mut Sink, key: &str) -> Option<String> {
        if self.has(key) {
            self.str(s, key)
        } else {
            self.missing(s, key);
            None
        }
    }

    fn has(&self, key: &str) -> bool {
        self.entries
            .iter()
            .any(|(k, v)| k.key_text() == Some(key) && !v.is_null())
    }

    fn missing(&self, s: &mut Sink, key: &str) {
        s.error(
            self.node.loc,
            &self.path,
            format!("missing required field \"{key}\""),
        );
    }

    /// Reports keys not consumed: `silent` ones are fine, `unsupported` ones are warnings
    /// (valid upstream, not implemented by Tern), the rest are errors.
    fn finish(self, s: &mut Sink, silent: &[&str], unsupported: &[&str]) {
        for (i, (k, _)) in self.entries.iter().enumerate() {
            let Some(key) = k.key_text() else {
                s.error(k.loc, &self.path, "expected a string key");
                continue;
            };
            let path = join(&self.path, key);
            if self.entries[..i]
                .iter()
                .any(|(k2, _)| k2.key_text() == Some(key))
            {
                s.error(k.loc, &path, format!("duplicate key \"{key}\""));
            } else if self.used[i] || silent.contains(&key) {
            } else if unsupported.contains(&key) {
                s.warn(
                    k.loc,
                    &path,
                    format!("field \"{key}\" is not supported by Tern yet; ignored"),
                );
            } else {
                s.error(k.loc, &path, format!("unknown field \"{key}\""));
            }
        }
    }
}

fn string(s: &mut Sink, n: &Node, path: &str) -> Option<String> {
    match n.scalar() {
        Some(Scalar::Str(v)) => Some(v.to_string()),
        _ => {
            s.error(n.loc, path, "expected a string");
            None
        }
    }
}

fn int(s: &mut Sink, n: &Node, path: &str) -> Option<i64> {
    match n.scalar() {
        Some(Scalar::Int(i)) => Some(i),
        _ => {
            s.error(n.loc, path, "expected an integer");
            None
        }
    }
}

fn list<'n>(s: &mut Sink, n: &'n Node, path: &str) -> Vec<(&'n Node, String)> {
    match &n.kind {
        NodeKind::Seq(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| (item, format!("{path}[{i}]")))
            .collect(),
        _ => {
            s.error(n.loc, path, "expected a list");
            Vec::new()
        }
    }
}

/// Decodes `key` as one of `allowed` values; `None` (after an error) for anything else.
fn enum_value<'a>(
    f: &mut Fields,
    s: &mut Sink,
    key: &str,
    what: &str,
    allowed: &[&'a str],
) -> Option<&'a str> {
    let (n, p) = f.take(key)?;
    let v = string(s, n, &p)?;
    match allowed.iter().find(|a| **a == v) {
        Some(a) => Some(*a),
        None => {
            s.error(
                n.loc,
                &p,
                format!("unknown {what} \"{v}\" (expected {})", one_of(allowed)),
            );
            None
        }
    }
}

fn one_of(allowed: &[&str]) -> String {
    match allowed {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn decode_doc(s: &mut Sink, doc: &Node) -> Option<Resource> {
    let mut f = Fields::new(s, doc, "")?;
    let api_version = f.required_str(s, "apiVersion");
    let (kind_node, _) = f.take("kind").unzip();
    let kind_name = match kind_node {
        Some(n) => string(s, n, "kind"),
        None => {
            f.missing(s, "kind");
            None
        }
    };
    let kind = match (&kind_name, kind_node) {
        (Some(k), Some(n)) => match Kind::from_name(k) {
            Some(kind) => Some(kind),
            None => {
                let [init @ .., last] = Kind::ALL.map(|k| k.to_string());
                s.error(
                    n.loc,
                    "kind",
                    format!(
                        "unknown kind \"{k}\" (Tern reads {} and {last})",
                        init.join(", ")
                    ),
                );
                None
            }
        },
        _ => None,
    };
    let kind = kind?;
    let api_version = api_version?;
    if api_version != kind.api_version() {
        let loc = f.take("apiVersion").map_or(doc.loc, |(n, _)| n.loc);
        s.error(
            loc,
            "apiVersion",
            format!(
                "unsupported apiVersion \"{api_version}\" for {kind} (expected {})",
                kind.api_version()
            ),
        );
        return None;
    }
    let meta = match f.map(s, "metadata") {
        Some(m) => meta(s, m),
        None => {
            f.missing(s, "metadata");
            None
        }
    };
    let resource = match kind {
        Kind::Service => {
            let spec = spec_fields(&mut f, s).map(|sf| service_spec(s, sf));
            f.finish(s, &["status"], &[]);
            let (ports, incomplete, cluster_ip) = spec.unwrap_or((Vec::new(), true, None));
            Resource::Service(Service {
                meta: meta?,
                ports,
                cluster_ip,
                incomplete,
            })
        }
        Kind::EndpointSlice => {
            let slice = endpoint_slice(s, &mut f);
            f.finish(s, &[], &[]);
            Resource::EndpointSlice(EndpointSlice {
                meta: meta?,
                ..slice
            })
        }
        Kind::HTTPRoute => {
            let ns = meta
                .as_ref()
                .map(|m| m.namespace.clone())
                .unwrap_or_default();
            let spec = spec_fields(&mut f, s).map(|sf| http_route_spec(s, sf, &ns));
            f.finish(s, &["status"], &[]);
            let (parent_refs, rules) = spec.unwrap_or_default();
            Resource::HTTPRoute(HttpRoute {
                meta: meta?,
                parent_refs,
                rules,
            })
        }
        Kind::GRPCRoute => {
            let ns = meta
                .as_ref()
                .map(|m| m.namespace.clone())
                .unwrap_or_default();
            let spec = spec_fields(&mut f, s).map(|sf| grpc_route_spec(s, sf, &ns));
            f.finish(s, &["status"], &[]);
            let (parent_refs, rules) = spec.unwrap_or_default();
            Resource::GRPCRoute(GrpcRoute {
                meta: meta?,
                parent_refs,
                rules,
            })
        }
        Kind::BackendPolicy => {
            let spec = spec_fields(&mut f, s).map(|sf| backend_policy_spec(s, sf));
            f.finish(s, &["status"], &[]);
            Resource::BackendPolicy(Box::new(BackendPolicy {
                meta: meta?,
                ..spec.unwrap_or_default()
            }))
        }
        Kind::RateLimitPolicy => {
            let spec = spec_fields(&mut f, s).map(|sf| rate_limit_policy_spec(s, sf));
            f.finish(s, &["status"], &[]);
            Resource::RateLimitPolicy(Box::new(RateLimitPolicy {
                meta: meta?,
                ..spec.unwrap_or_default()
            }))
        }
        Kind::ConcurrencyPolicy => {
            let spec = spec_fields(&mut f, s).map(|sf| concurrency_policy_spec(s, sf));
            f.finish(s, &["status"], &[]);
            Resource::ConcurrencyPolicy(Box::new(ConcurrencyPolicy {
                meta: meta?,
                ..spec.unwrap_or_default()
            }))
        }
        Kind::AuthorizationPolicy => {
            let spec = spec_fields(&mut f, s).map(|sf| authorization_policy_spec(s, sf));
            f.finish(s, &["status"], &[]);
            Resource::AuthorizationPolicy(Box::new(AuthorizationPolicy {
                meta: meta?,
                ..spec.unwrap_or_default()
            }))
        }
    };
    Some(resource)
}

fn spec_fields<'n>(f: &mut Fields<'n>, s: &mut Sink) -> Option<Fields<'n>> {
    if !f.has("spec") {
        f.missing(s, "spec");
    }
    f.map(s, "spec")
}

fn meta(s: &mut Sink, mut f: Fields) -> Option<Meta> {
    let name = f.required_str(s, "name");
    let namespace = f.str(s, "namespace").unwrap_or_else(|| "default".into());
    let creation_timestamp = f.str(s, "creationTimestamp");
    let labels = string_map(s, &mut f, "labels");
    let annotations = string_map(s, &mut f, "annotations");
    f.finish(s, META_SILENT, &[]);
    Some(Meta {
        name: name?,
        namespace,
        creation_timestamp,
        labels,
        annotations,
    })
}

/// `metadata.labels` / `metadata.annotations`: string values; null values are skipped.
fn string_map(s: &mut Sink, f: &mut Fields, key: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(mf) = f.map(s, key) {
        for (k, v) in &mf.entries {
            let (Some(name), false) = (k.key_text(), v.is_null()) else {
                continue;
            };
            if let Some(val) = string(s, v, &join(&mf.path, name)) {
                out.insert(name.to_string(), val);
            }
        }
    }
    out
}

/// A Service's ports, whether some port did not decode, and `spec.clusterIP`.
fn service_spec(s: &mut Sink, mut f: Fields) -> (Vec<ServicePort>, bool, Option<String>) {
    let cluster_ip = f.str(s, "clusterIP");
    let mut ports = Vec::new();
    let mut incomplete = false;
    for (n, p) in f.list(s, "ports") {
        let Some(mut pf) = Fields::new(s, n, &p) else {
            continue;
        };
        let name = pf.str(s, "name");
        let app_protocol = pf.str(s, "appProtocol");
        let port = if pf.has("port") {
            pf.int(s, "port")
        } else {
            pf.missing(s, "port");
            None
        };
        // targetPort may be a number or a name: either is fine, the proxy does not use it.
        pf.take("targetPort");
        pf.str(s, "protocol");
        pf.int(s, "nodePort");
        pf.finish(s, &[], &[]);
        match port {
            Some(port) => ports.push(ServicePort {
                name,
                port,
                app_protocol,
            }),
            None => incomplete = true,
        }
    }
    f.finish(s, SERVICE_SPEC_SILENT, &[]);
    (ports, incomplete, cluster_ip)
}

fn endpoint_slice(s: &mut Sink, f: &mut Fields) -> EndpointSlice {
    let address_type = f.str(s, "addressType").unwrap_or_else(|| {
        f.missing(s, "addressType");
        String::new()
    });
    let mut endpoints = Vec::new();
    for (n, p) in f.list(s, "endpoints") {
        let Some(mut ef) = Fields::new(s, n, &p) else {
            continue;
        };
        let mut addresses = Vec::new();
        for (an, ap) in ef.list(s, "addresses") {
            addresses.extend(string(s, an, &ap));
        }
        let mut ready = true;
        if let Some(mut cf) = ef.map(s, "conditions") {
            ready = cf.boolean(s, "ready").unwrap_or(true);
            cf.boolean(s, "serving");
            cf.boolean(s, "terminating");
            cf.finish(s, &[], &[]);
        }
        let zone = ef.str(s, "zone");
        ef.str(s, "hostname");
        ef.str(s, "nodeName");
        ef.finish(s, &["targetRef", "hints", "deprecatedTopology"], &[]);
        endpoints.push(EndpointSpec {
            addresses,
            ready,
            zone,
        });
    }
    let mut ports = Vec::new();
    for (n, p) in f.list(s, "ports") {
        let Some(mut pf) = Fields::new(s, n, &p) else {
            continue;
        };
        let port = EndpointPort {
            name: pf.str(s, "name"),
            port: pf.int(s, "port"),
            app_protocol: pf.str(s, "appProtocol"),
        };
        pf.str(s, "protocol");
        pf.finish(s, &[], &[]);
        ports.push(port);
    }
    EndpointSlice {
        meta: Meta::default(),
        address_type,
        endpoints,
        ports,
    }
}

fn parent_refs(s: &mut Sink, f: &mut Fields, ns: &str) -> Vec<ParentRef> {
    let mut refs = Vec::new();
    for (n, p) in f.list(s, "parentRefs") {
        let Some(mut pf) = Fields::new(s, n, &p) else {
            continue;
        };
        let r = (|| {
            Some(ParentRef {
                // Gateway API defaults a parentRef to a Gateway.
                group: pf
                    .str(s, "group")
                    .unwrap_or_else(|| "gateway.networking.k8s.io".into()),
                kind: pf.str(s, "kind").unwrap_or_else(|| "Gateway".into()),
                namespace: pf.str(s, "namespace").unwrap_or_else(|| ns.into()),
                port: pf.int(s, "port"),
                name: pf.required_str(s, "name")?,
            })
        })();
        pf.finish(s, &[], &["sectionName"]);
        refs.extend(r);
    }
    if !f.has("parentRefs") {
        s.warn(
            f.node.loc,
            &join(&f.path, "parentRefs"),
            "no parentRefs: this route is not attached to any Service",
        );
    }
    refs
}

fn backend_refs(s: &mut Sink, f: &mut Fields, ns: &str) -> Vec<BackendRef> {
    let mut refs = Vec::new();
    for (n, p) in f.list(s, "backendRefs") {
        let Some(mut bf) = Fields::new(s, n, &p) else {
            continue;
        };
        let group = bf.str(s, "group").unwrap_or_default();
        let kind = bf.str(s, "kind").unwrap_or_else(|| "Service".into());
        let namespace = bf.str(s, "namespace").unwrap_or_else(|| ns.into());
        let name = bf.required_str(s, "name");
        let port = if bf.has("port") {
            bf.int(s, "port")
        } else {
            bf.missing(s, "port");
            None
        };
        let weight = bf.int(s, "weight").unwrap_or(1);
        bf.finish(s, &[], &["filters"]);
        if let Some(name) = name {
            refs.push(BackendRef {
                group,
                kind,
                namespace,
                name,
                port,
                weight,
            });
        }
    }
    refs
}

fn value_matches(s: &mut Sink, f: &mut Fields, key: &str) -> Vec<ValueMatch> {
    let mut out = Vec::new();
    for (n, p) in f.list(s, key) {
        let Some(mut mf) = Fields::new(s, n, &p) else {
            continue;
        };
        let match_type = match_type(s, &mut mf);
        let name = mf.required_str(s, "name");
        let value = mf.required_str(s, "value");
        mf.finish(s, &[], &[]);
        if let (Some(match_type), Some(name), Some(value)) = (match_type, name, value) {
            out.push(ValueMatch {
                match_type,
                name,
                value,
            });
        }
    }
    out
}

fn match_type(s: &mut Sink, f: &mut Fields) -> Option<MatchType> {
    if !f.has("type") {
        return Some(MatchType::Exact);
    }
    Some(
        match enum_value(f, s, "type", "match type", &["Exact", "RegularExpression"])? {
            "Exact" => MatchType::Exact,
            _ => MatchType::RegularExpression,
        },
    )
}

fn filters(s: &mut Sink, f: &mut Fields, grpc: bool) -> Vec<Filter> {
    let mut out = Vec::new();
    let types: &[&str] = if grpc {
        &[
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestMirror",
            "ExtensionRef",
        ]
    } else {
        &[
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "URLRewrite",
            "RequestMirror",
            "RequestRedirect",
            "ExtensionRef",
            "CORS",
        ]
    };
    for (n, p) in f.list(s, "filters") {
        let Some(mut ff) = Fields::new(s, n, &p) else {
            continue;
        };
        if !ff.has("type") {
            ff.missing(s, "type");
        }
        let ty = enum_value(&mut ff, s, "type", "filter type", types);
        let filter = match ty {
            Some(t @ ("RequestHeaderModifier" | "ResponseHeaderModifier")) => {
                let key = if t == "RequestHeaderModifier" {
                    "requestHeaderModifier"
                } else {
                    "responseHeaderModifier"
                };
                let m = config_fields(s, &mut ff, key).map(|hf| header_modifier(s, hf));
                m.map(|m| {
                    if t == "RequestHeaderModifier" {
                        Filter::RequestHeaderModifier(m)
                    } else {
                        Filter::ResponseHeaderModifier(m)
                    }
                })
            }
            Some("URLRewrite") => config_fields(s, &mut ff, "urlRewrite")
                .map(|uf| Filter::URLRewrite(url_rewrite(s, uf))),
            Some(t) => {
                let loc = ff.take("type").map_or(n.loc, |(tn, _)| tn.loc);
                s.warn(
                    loc,
                    &join(&p, "type"),
                    format!("filter type {t} is not supported by Tern yet; ignored"),
                );
                Some(Filter::Unsupported(t.to_string()))
            }
            None => None,
        };
        let silent: &[&str] = match ty {
            Some("RequestMirror") => &["requestMirror"],
            Some("RequestRedirect") => &["requestRedirect"],
            Some("ExtensionRef") => &["extensionRef"],
            Some("CORS") => &["cors"],
            _ => &[],
        };
        ff.finish(s, silent, &[]);
        out.extend(filter);
    }
    out
}

/// The per-type configuration of a filter (`requestHeaderModifier: {...}`), required.
fn config_fields<'n>(s: &mut Sink, f: &mut Fields<'n>, key: &str) -> Option<Fields<'n>> {
    if !f.has(key) {
        f.missing(s, key);
        return None;
    }
    f.map(s, key)
}

fn header_modifier(s: &mut Sink, mut f: Fields) -> HeaderModifier {
    let mut pairs = |f: &mut Fields, key: &str| {
        let mut out = Vec::new();
        for (n, p) in f.list(s, key) {
            let Some(mut hf) = Fields::new(s, n, &p) else {
                continue;
            };
            let name = hf.required_str(s, "name");
            let value = hf.required_str(s, "value");
            hf.finish(s, &[], &[]);
            if let (Some(name), Some(value)) = (name, value) {
                out.push((name, value));
            }
        }
        out
    };
    let set = pairs(&mut f, "set");
    let add = pairs(&mut f, "add");
    let mut remove = Vec::new();
    for (n, p) in f.list(s, "remove") {
        remove.extend(string(s, n, &p));
    }
    f.finish(s, &[], &[]);
    HeaderModifier { set, add, remove }
}

fn url_rewrite(s: &mut Sink, mut f: Fields) -> UrlRewrite {
    let hostname = f.str(s, "hostname");
    let path = f.map(s, "path").and_then(|mut pf| {
        if !pf.has("type") {
            pf.missing(s, "type");
        }
        let ty = enum_value(
            &mut pf,
            s,
            "type",
            "path modifier type",
            &["ReplaceFullPath", "ReplacePrefixMatch"],
        );
        let m = match ty {
            Some("ReplaceFullPath") => {
                let v = pf.required_str(s, "replaceFullPath");
                v.map(PathModifier::ReplaceFullPath)
            }
            Some(_) => {
                let v = pf.required_str(s, "replacePrefixMatch");
                v.map(PathModifier::ReplacePrefixMatch)
            }
            None => None,
        };
        pf.finish(s, &[], &[]);
        m
    });
    f.finish(s, &[], &[]);
    UrlRewrite { hostname, path }
}

fn http_route_spec(s: &mut Sink, mut f: Fields, ns: &str) -> (Vec<ParentRef>, Vec<HttpRule>) {
    let parents = parent_refs(s, &mut f, ns);
    let mut rules = Vec::new();
    for (n, p) in f.list(s, "rules") {
        let Some(mut rf) = Fields::new(s, n, &p) else {
            continue;
        };
        let name = rf.str(s, "name");
        let mut matches = Vec::new();
        for (mn, mp) in rf.list(s, "matches") {
            let Some(mut mf) = Fields::new(s, mn, &mp) else {
                continue;
            };
            let mut m = HttpRouteMatch::default();
            if let Some(mut pf) = mf.map(s, "path") {
                let ty = if pf.has("type") {
                    enum_value(
                        &mut pf,
                        s,
                        "type",
                        "path match type",
                        &["Exact", "PathPrefix", "RegularExpression"],
                    )
                } else {
                    Some("PathPrefix")
                };
                m.path_type = match ty {
                    Some("Exact") => PathType::Exact,
                    Some("RegularExpression") => PathType::RegularExpression,
                    _ => PathType::PathPrefix,
                };
                m.path = pf.str(s, "value").unwrap_or_else(|| "/".into());
                pf.finish(s, &[], &[]);
            }
            m.headers = value_matches(s, &mut mf, "headers");
            m.query_params = value_matches(s, &mut mf, "queryParams");
            m.method = mf.str(s, "method");
            mf.finish(s, &[], &[]);
            matches.push(m);
        }
        if matches.is_empty() {
            matches.push(HttpRouteMatch::default());
        }
        let filters = filters(s, &mut rf, false);
        let backend_refs = backend_refs(s, &mut rf, ns);
        let mut timeouts = Timeouts::default();
        if let Some(mut tf) = rf.map(s, "timeouts") {
            timeouts.request = tf.str(s, "request");
            timeouts.backend_request = tf.str(s, "backendRequest");
            tf.finish(s, &[], &[]);
        }
        let retry = retry(s, &mut rf, false);
        rf.finish(s, &[], &["sessionPersistence"]);
        rules.push(HttpRule {
            name,
            matches,
            filters,
            backend_refs,
            timeouts,
            retry,
        });
    }
    f.finish(s, &[], &["hostnames"]);
    (parents, rules)
}

fn grpc_route_spec(s: &mut Sink, mut f: Fields, ns: &str) -> (Vec<ParentRef>, Vec<GrpcRule>) {
    let parents = parent_refs(s, &mut f, ns);
    let mut rules = Vec::new();
    for (n, p) in f.list(s, "rules") {
        let Some(mut rf) = Fields::new(s, n, &p) else {
            continue;
        };
        let name = rf.str(s, "name");
        let mut matches = Vec::new();
        for (mn, mp) in rf.list(s, "matches") {
            let Some(mut mf) = Fields::new(s, mn, &mp) else {
                continue;
            };
            let mut m = GrpcRouteMatch::default();
            if let Some(mut gf) = mf.map(s, "method") {
                let match_type = match_type(s, &mut gf);
                let service = gf.str(s, "service");
                let method = gf.str(s, "method");
                gf.finish(s, &[], &[]);
                m.method = match_type.map(|match_type| GrpcMethodMatch {
                    match_type,
                    service,
                    method,
                });
            }
            m.headers = value_matches(s, &mut mf, "headers");
            mf.finish(s, &[], &[]);
            matches.push(m);
        }
        if matches.is_empty() {
            matches.push(GrpcRouteMatch::default());
        }
        let filters = filters(s, &mut rf, true);
        let backend_refs = backend_refs(s, &mut rf, ns);
        let retry = retry(s, &mut rf, true);
        rf.finish(s, &[], &["sessionPersistence"]);
        rules.push(GrpcRule {
            name,
            matches,
            filters,
            backend_refs,
            retry,
        });
    }
    f.finish(s, &[], &["hostnames"]);
    (parents, rules)
}

/// A rule's `retry: {attempts, backoff, codes}`. HTTP codes are integers; gRPC codes are
/// integers or names (checked by validation).
fn retry(s: &mut Sink, f: &mut Fields, grpc: bool) -> Option<Retry> {
    let mut rf = f.map(s, "retry")?;
    let attempts = rf.int(s, "attempts");
    let backoff = rf.str(s, "backoff");
    let codes = rf.take("codes").map(|(n, p)| {
        list(s, n, &p)
            .into_iter()
            .map(|(cn, cp)| match cn.scalar() {
                Some(Scalar::Int(i)) => RetryCode::Number(i),
                Some(Scalar::Str(name)) if grpc => RetryCode::Name(name.to_string()),
                _ if grpc => {
                    s.error(
                        cn.loc,
                        &cp,
                        "expected a gRPC status code (a number or a name such as UNAVAILABLE)",
                    );
                    RetryCode::Invalid
                }
                _ => {
                    s.error(cn.loc, &cp, "expected an integer");
                    RetryCode::Invalid
                }
            })
            .collect()
    });
    rf.finish(s, &[], &[]);
    Some(Retry {
        attempts,
        backoff,
        codes,
    })
}

/// A policy's `spec.targetRefs` (required, at least one). Group and kind default to `""`
/// and `Service`; which kinds a policy takes is checked by validation.
fn target_refs(s: &mut Sink, f: &mut Fields) -> Vec<PolicyTargetRef> {
    let mut target_refs = Vec::new();
    let Some((n, p)) = f.take("targetRefs") else {
        f.missing(s, "targetRefs");
        return target_refs;
    };
    let items = list(s, n, &p);
    if items.is_empty() && matches!(n.kind, NodeKind::Seq(_)) {
        s.error(n.loc, &p, "at least one targetRef is required");
    }
    for (tn, tp) in items {
        let Some(mut tf) = Fields::new(s, tn, &tp) else {
            continue;
        };
        let group = tf.str(s, "group").unwrap_or_default();
        let kind = tf.str(s, "kind").unwrap_or_else(|| "Service".into());
        let name = tf.required_str(s, "name");
        let section_name = tf.str(s, "sectionName");
        tf.finish(s, &[], &[]);
        if let Some(name) = name {
            target_refs.push(PolicyTargetRef {
                group,
                kind,
                name,
                section_name,
            });
        }
    }
    target_refs
}

fn backend_policy_spec(s: &mut Sink, mut f: Fields) -> BackendPolicy {
    let target_refs = target_refs(s, &mut f);
    let retry_budget = f.map(s, "retryBudget").map(|mut bf| {
        let b = RetryBudgetSpec {
            percent: bf.int(s, "percent"),
            min_retries_per_second: bf.int(s, "minRetriesPerSecond"),
            interval: bf.str(s, "interval"),
        };
        bf.finish(s, &[], &[]);
        b
    });
    let circuit_breaker = f.map(s, "circuitBreaker").map(|mut cf| {
        let consecutive_failures = cf.int(s, "consecutiveFailures");
        let failure_rate = cf.map(s, "failureRate").map(|mut rf| {
            let r = FailureRateSpec {
                percent: rf.int(s, "percent"),
                min_requests: rf.int(s, "minRequests"),
                interval: rf.str(s, "interval"),
            };
            rf.finish(s, &[], &[]);
            r
        });
        let ejection = cf.map(s, "ejection").map(|mut ef| {
            let e = EjectionSpec {
                base: ef.str(s, "base"),
                max: ef.str(s, "max"),
                max_ejected_percent: ef.int(s, "maxEjectedPercent"),
            };
            ef.finish(s, &[], &[]);
            e
        });
        let failure_status_codes = cf.take("failureStatusCodes").map(|(n, p)| {
            list(s, n, &p)
                .into_iter()
                .map(|(cn, cp)| int(s, cn, &cp))
                .collect()
        });
        cf.finish(s, &[], &[]);
        CircuitBreakerSpec {
            consecutive_failures,
            failure_rate,
            ejection,
            failure_status_codes,
        }
    });
    let limits = f.map(s, "limits").map(|mut lf| {
        let l = LimitsSpec {
            max_connections: lf.int(s, "maxConnections"),
            max_pending_requests: lf.int(s, "maxPendingRequests"),
            max_requests: lf.int(s, "maxRequests"),
        };
        lf.finish(s, &[], &[]);
        l
    });
    let load_balancer = f.map(s, "loadBalancer").map(|lf| load_balancer(s, lf));
    let concurrency = f.map(s, "concurrency").map(|mut cf| {
        let c = concurrency_spec(s, &mut cf);
        cf.finish(s, &[], &[]);
        c
    });
    f.finish(s, &[], &[]);
    BackendPolicy {
        meta: Meta::default(),
        target_refs,
        retry_budget,
        circuit_breaker,
        limits,
        load_balancer,
        concurrency,
    }
}

const ALGORITHMS: [(&str, Algorithm); 5] = [
    ("P2CPeakEWMA", Algorithm::P2CPeakEWMA),
    ("RoundRobin", Algorithm::RoundRobin),
    ("LeastRequest", Algorithm::LeastRequest),
    ("RingHash", Algorithm::RingHash),
    ("Maglev", Algorithm::Maglev),
];

const ADAPTIVE_ALGORITHMS: [(&str, AdaptiveAlgorithm); 2] = [
    ("Gradient", AdaptiveAlgorithm::Gradient),
    ("AIMD", AdaptiveAlgorithm::AIMD),
];

/// Decodes `key` as one of `values` by name (see [`enum_value`]).
fn enum_of<T: Copy>(
    f: &mut Fields,
    s: &mut Sink,
    key: &str,
    what: &str,
    values: &[(&str, T)],
) -> Option<T> {
    let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
    let name = enum_value(f, s, key, what, &names)?;
    values.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// `BackendPolicy.spec.loadBalancer`.
fn load_balancer(s: &mut Sink, mut f: Fields) -> LoadBalancerSpec {
    let given = f.has("algorithm");
    let algorithm = enum_of(
        &mut f,
        s,
        "algorithm",
        "load balancing algorithm",
        &ALGORITHMS,
    );
    let hash = f.take("hash").map(|(n, p)| hash_spec(s, n, &p));
    let locality = f.map(s, "locality").map(|mut lf| {
        let l = LocalitySpec {
            enabled: lf.boolean(s, "enabled"),
            min_healthy_percent: lf.int(s, "minHealthyPercent"),
        };
        lf.finish(s, &[], &[]);
        l
    });
    f.finish(s, &[], &[]);
    LoadBalancerSpec {
        algorithm,
        invalid_algorithm: given && algorithm.is_none(),
        hash,
        locality,
    }
}

/// `loadBalancer.hash`: `{header: name}`, `{cookie: name}` or `{sourceIP: true}`.
fn hash_spec(s: &mut Sink, n: &Node, path: &str) -> HashSpec {
    let Some(mut f) = Fields::new(s, n, path) else {
        return HashSpec::Invalid;
    };
    let keys = ["header", "cookie", "sourceIP"];
    let given: Vec<&str> = keys.into_iter().filter(|k| f.has(k)).collect();
    let spec = match given.as_slice() {
        ["header"] => f
            .str(s, "header")
            .map_or(HashSpec::Invalid, HashSpec::Header),
        ["cookie"] => f
            .str(s, "cookie")
            .map_or(HashSpec::Invalid, HashSpec::Cookie),
        ["sourceIP"] => f
            .boolean(s, "sourceIP")
            .map_or(HashSpec::Invalid, HashSpec::SourceIP),
        [] => {
            s.error(n.loc, path, "one of header, cookie or sourceIP is required");
            HashSpec::Invalid
        }
        several => {
            for k in several {
                f.take(k);
            }
            s.error(
                n.loc,
                path,
                format!(
                    "only one of header, cookie or sourceIP may be given (got {})",
                    several.join(" and ")
                ),
            );
            HashSpec::Invalid
        }
    };
    f.finish(s, &[], &[]);
    spec
}

/// The fields of a concurrency limit, taken from `f` (`BackendPolicy.spec.concurrency`,
/// or a ConcurrencyPolicy's `spec`); the caller finishes `f`.
fn concurrency_spec(s: &mut Sink, f: &mut Fields) -> ConcurrencySpec {
    let max_concurrent = if f.has("maxConcurrent") {
        f.int(s, "maxConcurrent")
    } else {
        f.missing(s, "maxConcurrent");
        None
    };
    let max_queue = f.int(s, "maxQueue");
    let queue_timeout = f.str(s, "queueTimeout");
    let adaptive = f.map(s, "adaptive").map(|mut af| {
        let a = AdaptiveSpec {
            algorithm: enum_of(
                &mut af,
                s,
                "algorithm",
                "adaptive algorithm",
                &ADAPTIVE_ALGORITHMS,
            ),
            min_limit: af.int(s, "minLimit"),
            max_limit: af.int(s, "maxLimit"),
        };
        af.finish(s, &[], &[]);
        a
    });
    ConcurrencySpec {
        max_concurrent,
        max_queue,
        queue_timeout,
        adaptive,
    }
}

fn rate_limit_policy_spec(s: &mut Sink, mut f: Fields) -> RateLimitPolicy {
    let target_refs = target_refs(s, &mut f);
    if !f.has("rate") {
        f.missing(s, "rate");
    }
    let rate = f.map(s, "rate").map(|mut rf| {
        let requests = if rf.has("requests") {
            rf.int(s, "requests")
        } else {
            rf.missing(s, "requests");
            None
        };
        let r = RateSpec {
            requests,
            per: rf.str(s, "per"),
            burst: rf.int(s, "burst"),
        };
        rf.finish(s, &[], &[]);
        r
    });
    let key = f.take("key").and_then(|(n, p)| rate_limit_key(s, n, &p));
    f.finish(s, &[], &[]);
    RateLimitPolicy {
        meta: Meta::default(),
        target_refs,
        rate,
        key,
    }
}

/// `key: All | Route | Caller | {header: name}`.
fn rate_limit_key(s: &mut Sink, n: &Node, path: &str) -> Option<RateLimitKeySpec> {
    const EXPECTED: &str = "expected All, Route, Caller or {header: <name>}";
    if let NodeKind::Map(_) = n.kind {
        let mut f = Fields::new(s, n, path)?;
        let header = f.required_str(s, "header");
        f.finish(s, &[], &[]);
        return header.map(RateLimitKeySpec::Header);
    }
    match n.scalar() {
        Some(Scalar::Str("All")) => Some(RateLimitKeySpec::All),
        Some(Scalar::Str("Route")) => Some(RateLimitKeySpec::Route),
        Some(Scalar::Str("Caller")) => Some(RateLimitKeySpec::Caller),
        Some(Scalar::Str(v)) => {
            s.error(
                n.loc,
                path,
                format!("unknown rate limit key \"{v}\" ({EXPECTED})"),
            );
            None
        }
        _ => {
            s.error(n.loc, path, EXPECTED);
            None
        }
    }
}

fn concurrency_policy_spec(s: &mut Sink, mut f: Fields) -> ConcurrencyPolicy {
    let target_refs = target_refs(s, &mut f);
    let limit = concurrency_spec(s, &mut f);
    f.finish(s, &[], &[]);
    ConcurrencyPolicy {
        meta: Meta::default(),
        target_refs,
        limit,
    }
}

fn authorization_policy_spec(s: &mut Sink, mut f: Fields) -> AuthorizationPolicy {
    let target_refs = target_refs(s, &mut f);
    if !f.has("allow") {
        f.missing(s, "allow");
    }
    let mut allow = Vec::new();
    for (n, p) in f.list(s, "allow") {
        let Some(mut cf) = Fields::new(s, n, &p) else {
            continue;
        };
        let reported = s.diags.len();
        // Entries that are not strings stay as `None` (reported) so positions match.
        let mut strings = |cf: &mut Fields, key: &str| -> Vec<Option<String>> {
            cf.list(s, key)
                .into_iter()
                .map(|(vn, vp)| string(s, vn, &vp))
                .collect()
        };
        let identities = strings(&mut cf, "identities");
        let namespaces = strings(&mut cf, "namespaces");
        let clause = AllowClause {
            identities,
            namespaces,
            meshed: cf.boolean(s, "meshed").unwrap_or(false),
            unauthenticated: cf.boolean(s, "unauthenticated").unwrap_or(false),
            incomplete: false,
        };
        cf.finish(s, &[], &[]);
        allow.push(AllowClause {
            incomplete: s.diags.len() > reported,
            ..clause
        });
    }
    f.finish(s, &[], &[]);
    AuthorizationPolicy {
        meta: Meta::default(),
        target_refs,
        allow,
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::{diags, route};

    fn one(yaml: &str) -> String {
        let d = diags(yaml);
        assert_eq!(d.len(), 1, "{d:#?}");
        d.into_iter().next().unwrap_or_default()
    }

    #[test]
    fn type_errors() {
        let r = |rules: &str| one(&route(rules));
        assert_eq!(
            r(
                "  - backendRefs:\n    - {name: checkout-v1, port: 8080}\n    - name: checkout-v2\n      port: 8080\n      weight: ten\n"
            ),
            "routes.yaml:11:15: spec.rules[0].backendRefs[1].weight: expected an integer"
        );
        assert_eq!(
            r("  - matches: [{headers: [{name: x, value: 1}]}]\n"),
            "routes.yaml:7:43: spec.rules[0].matches[0].headers[0].value: expected a string"
        );
        assert_eq!(
            r("  - matches: {path: /x}\n"),
            "routes.yaml:7:14: spec.rules[0].matches: expected a list"
        );
        assert_eq!(
            r("  - backendRefs: [x]\n"),
            "routes.yaml:7:19: spec.rules[0].backendRefs[0]: expected a mapping"
        );
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, namespace: shop, labels: {kubernetes.io/service-name: checkout}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.9], conditions: {ready: yes}}]\n";
        assert_eq!(
            one(slice),
            "routes.yaml:5:57: endpoints[0].conditions.ready: expected true or false"
        );
    }

    #[test]
    fn unknown_and_unsupported_fields() {
        assert_eq!(
            one(&route("  - matchs: []\n")),
            "routes.yaml:7:5: spec.rules[0].matchs: unknown field \"matchs\""
        );
        assert_eq!(
            one(&route("  - sessionPersistence: {type: Cookie}\n")),
            "routes.yaml:7:5: spec.rules[0].sessionPersistence: warning: field \"sessionPersistence\" is not supported by Tern yet; ignored"
        );
        assert_eq!(
            one(&route(
                "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: x}}}]\n"
            )),
            "routes.yaml:7:22: spec.rules[0].filters[0].type: warning: filter type RequestMirror is not supported by Tern yet; ignored"
        );
        assert_eq!(
            one(&route(
                "  - backendRefs: [{name: checkout-v1, port: 8080, filters: []}]\n"
            )),
            "routes.yaml:7:51: spec.rules[0].backendRefs[0].filters: warning: field \"filters\" is not supported by Tern yet; ignored"
        );
        let meta_ok = "apiVersion: v1\nkind: Service\nmetadata:\n  name: extra\n  namespace: shop\n  labels: {a: b}\n  annotations: {c: d}\n  uid: x\n  resourceVersion: \"1\"\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\n  generation: 3\nspec:\n  type: ClusterIP\n  selector: {app: x}\n  clusterIP: 10.0.0.1\n  ports: [{port: 80, targetPort: http, protocol: TCP}]\n";
        assert_eq!(diags(meta_ok), Vec::<String>::new());
    }

    #[test]
    fn document_level_errors() {
        assert_eq!(
            one("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"),
            "routes.yaml:2:7: kind: unknown kind \"Pod\" (Tern reads Service, EndpointSlice, HTTPRoute, GRPCRoute, BackendPolicy, RateLimitPolicy, ConcurrencyPolicy and AuthorizationPolicy)"
        );
        assert_eq!(
            one(
                "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: p}\n"
            ),
            "routes.yaml:1:13: apiVersion: unsupported apiVersion \"gateway.networking.k8s.io/v1beta1\" for HTTPRoute (expected gateway.networking.k8s.io/v1)"
        );
        assert_eq!(
            one("apiVersion: v1\nkind: Service\nmetadata: {namespace: shop}\nspec: {}\n"),
            "routes.yaml:3:11: metadata: missing required field \"name\""
        );
        assert_eq!(
            one(&route("  - backendRefs: [{name: checkout-v1}]\n")),
            "routes.yaml:7:19: spec.rules[0].backendRefs[0]: missing required field \"port\""
        );
        // Empty documents are ignored.
        assert_eq!(diags("---\n---\n"), Vec::<String>::new());
    }

    #[test]
    fn syntax_error_drops_the_file() {
        let d = diags(&format!("{}---\nkey: [unclosed\n", crate::testutil::SPLIT));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].starts_with("routes.yaml:16:1: YAML syntax error: while parsing a flow sequence"),
            "{d:?}"
        );
        assert!(d[0].contains("YAML syntax error"), "{d:?}");
    }

    #[test]
    fn enum_values() {
        assert_eq!(
            one(&route("  - matches: [{path: {type: Prefix, value: /x}}]\n")),
            "routes.yaml:7:29: spec.rules[0].matches[0].path.type: unknown path match type \"Prefix\" (expected Exact, PathPrefix or RegularExpression)"
        );
        assert_eq!(
            one(&route("  - filters: [{type: Bogus}]\n")),
            "routes.yaml:7:22: spec.rules[0].filters[0].type: unknown filter type \"Bogus\" (expected RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestMirror, RequestRedirect, ExtensionRef or CORS)"
        );
    }

    #[test]
    fn retry_decoding() {
        use crate::testutil::grpc_route;
        assert_eq!(
            one(&route("  - retry: {codes: [\"503\"]}\n")),
            "routes.yaml:7:21: spec.rules[0].retry.codes[0]: expected an integer"
        );
        assert_eq!(
            one(&route("  - retry: {attempts: two}\n")),
            "routes.yaml:7:23: spec.rules[0].retry.attempts: expected an integer"
        );
        assert_eq!(
            one(&route("  - retry: {attempts: 1, perTryTimeout: 1s}\n")),
            "routes.yaml:7:26: spec.rules[0].retry.perTryTimeout: unknown field \"perTryTimeout\""
        );
        assert_eq!(
            one(&route("  - retry: [3]\n")),
            "routes.yaml:7:12: spec.rules[0].retry: expected a mapping"
        );
        assert_eq!(
            one(&grpc_route("  - retry: {codes: [{code: 14}]}\n")),
            "routes.yaml:7:21: spec.rules[0].retry.codes[0]: expected a gRPC status code (a number or a name such as UNAVAILABLE)"
        );
        // Names and numbers both decode on GRPCRoute; `retry: {}` is a retry with defaults.
        let res = crate::check_sources(&[(
            "g.yaml".into(),
            grpc_route("  - retry: {codes: [14, unavailable]}\n  - retry: {}\n  - {}\n"),
        )])
        .resources;
        let obj = res.iter().next().unwrap();
        let crate::model::Resource::GRPCRoute(g) = &obj.resource else {
            panic!("{obj:?}")
        };
        let codes = g.rules[0].retry.as_ref().unwrap().codes.as_ref().unwrap();
        assert_eq!(
            codes,
            &[
                crate::model::RetryCode::Number(14),
                crate::model::RetryCode::Name("unavailable".into())
            ]
        );
        let defaults = g.rules[1].retry.as_ref().unwrap();
        assert!(
            defaults.attempts.is_none() && defaults.backoff.is_none() && defaults.codes.is_none()
        );
        assert!(g.rules[2].retry.is_none());
    }

    #[test]
    fn annotations_decode_as_strings() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  namespace: shop\n  annotations: {x: 1, y: \"2\", z: null}\nspec: {ports: [{port: 80}]}\n";
        assert_eq!(
            one(svc),
            "routes.yaml:6:20: metadata.annotations.x: expected a string"
        );
        let res = crate::check_sources(&[("a.yaml".into(), svc.replace("x: 1, ", ""))]).resources;
        let meta = res.iter().next().unwrap().resource.meta().clone();
        assert_eq!(
            meta.annotations.into_iter().collect::<Vec<_>>(),
            [("y".to_string(), "2".to_string())]
        );
    }

    #[test]
    fn backend_policy_decoding() {
        use crate::testutil::policy;
        let p = |spec: &str| one(&policy("p", "", spec));
        assert_eq!(
            p("  retryBudget: {percent: 20}\n"),
            "routes.yaml:5:3: spec: missing required field \"targetRefs\""
        );
        assert_eq!(
            p("  targetRefs: []\n"),
            "routes.yaml:5:15: spec.targetRefs: at least one targetRef is required"
        );
        assert_eq!(
            p("  targetRefs: [{kind: Service}]\n"),
            "routes.yaml:5:16: spec.targetRefs[0]: missing required field \"name\""
        );
        assert_eq!(
            p("  targetRefs: [{name: checkout, namespace: other}]\n"),
            "routes.yaml:5:33: spec.targetRefs[0].namespace: unknown field \"namespace\""
        );
        assert_eq!(
            p(
                "  targetRefs: [{name: checkout}]\n  circuitBreaker: {failureStatusCodes: [502, x]}\n"
            ),
            "routes.yaml:6:46: spec.circuitBreaker.failureStatusCodes[1]: expected an integer"
        );
        assert_eq!(
            p("  targetRefs: [{name: checkout}]\n  limits: {maxConnections: 1k}\n"),
            "routes.yaml:6:28: spec.limits.maxConnections: expected an integer"
        );
        assert_eq!(
            p("  targetRefs: [{name: checkout}]\n  circuitBreaker: {ejection: {base: 5}}\n"),
            "routes.yaml:6:37: spec.circuitBreaker.ejection.base: expected a string"
        );
        assert_eq!(
            p("  targetRefs: [{name: checkout}]\n  outlierDetection: {}\n"),
            "routes.yaml:6:3: spec.outlierDetection: unknown field \"outlierDetection\""
        );
        assert_eq!(
            one("apiVersion: policy.tern.dev/v1\nkind: BackendPolicy\nmetadata: {name: p}\n"),
            "routes.yaml:1:13: apiVersion: unsupported apiVersion \"policy.tern.dev/v1\" for BackendPolicy (expected policy.tern.dev/v1alpha1)"
        );
        // A full policy decodes field by field; a top-level status is ignored.
        let full = policy(
            "p",
            "",
            "  targetRefs: [{group: \"\", kind: Service, name: checkout, sectionName: http}, {name: checkout-v1}]\n  retryBudget: {percent: 20, minRetriesPerSecond: 10, interval: 10s}\n  circuitBreaker:\n    consecutiveFailures: 5\n    failureRate: {percent: 50, minRequests: 20, interval: 10s}\n    ejection: {base: 5s, max: 2m, maxEjectedPercent: 50}\n    failureStatusCodes: [502, 503, 504]\n  limits: {maxConnections: 1024, maxPendingRequests: 256, maxRequests: 1024}\nstatus: {}\n",
        );
        assert_eq!(diags(&full), Vec::<String>::new());
        let res = crate::check_sources(&[("p.yaml".into(), full)]).resources;
        let crate::model::Resource::BackendPolicy(bp) = &res.iter().next().unwrap().resource else {
            panic!()
        };
        assert_eq!(bp.target_refs.len(), 2);
        assert_eq!(bp.target_refs[0].section_name.as_deref(), Some("http"));
        assert!(
            bp.target_refs[1].target_kind() == Some(crate::model::Kind::Service),
            "group and kind default to \"\" and Service"
        );
        assert_eq!(
            bp.retry_budget.as_ref().unwrap().interval.as_deref(),
            Some("10s")
        );
        let cb = bp.circuit_breaker.as_ref().unwrap();
        assert_eq!(cb.consecutive_failures, Some(5));
        assert_eq!(cb.failure_rate.as_ref().unwrap().min_requests, Some(20));
        assert_eq!(cb.ejection.as_ref().unwrap().max.as_deref(), Some("2m"));
        assert_eq!(
            cb.failure_status_codes.as_deref(),
            Some(&[Some(502), Some(503), Some(504)][..])
        );
        assert_eq!(bp.limits.as_ref().unwrap().max_pending_requests, Some(256));
    }

    #[test]
    fn duplicate_keys() {
        assert_eq!(
            one(
                "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: shop}\nspec: {ports: [{port: 80}]}\nspec: {}\n"
            ),
            "routes.yaml:5:1: spec: duplicate key \"spec\""
        );
    }
}

#[cfg(test)]
mod traffic_policy_tests {
    use crate::model::{AllowClause, HashSpec, RateLimitKeySpec, Resource};
    use crate::snapshot::{AdaptiveAlgorithm, Algorithm};
    use crate::testutil::{diags, policy, policy_of};

    const SVC: &str = "  targetRefs: [{name: checkout}]\n";
    const ROUTE: &str =
        "  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]\n";

    fn decoded(yaml: String) -> Resource {
        let res = crate::check_sources(&[("p.yaml".into(), yaml)]).resources;
        res.iter().next().unwrap().resource.clone()
    }

    /// A policy of `kind` targeting HTTPRoute `r` (absent here: one warning) with the
    /// rest of `spec`, decoded; its targetRef checked.
    fn decoded_route_policy(kind: &str, rest: &str) -> Resource {
        let yaml = policy_of(kind, "p", "", &format!("{ROUTE}{rest}"));
        assert_eq!(diags(&yaml).len(), 1, "{:?}", diags(&yaml));
        let resource = decoded(yaml);
        let refs = match &resource {
            Resource::ConcurrencyPolicy(p) => &p.target_refs,
            Resource::AuthorizationPolicy(p) => &p.target_refs,
            other => panic!("{:?}", other.kind()),
        };
        assert_eq!(refs[0].target_kind(), Some(crate::model::Kind::HTTPRoute));
        resource
    }

    #[test]
    fn load_balancer_and_concurrency_decoding() {
        let p = |spec: &str| diags(&policy("p", "", &format!("{SVC}{spec}")));
        let cases = [
            "  loadBalancer: {algorithm: Random}\n",
            // An unknown algorithm: no second message about the hash.
            "  loadBalancer: {algorithm: Random, hash: {header: x}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {header: x, cookie: y}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {header: 5}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: {sourceIP: yes}}\n",
            "  loadBalancer: {algorithm: RingHash, hash: x-user}\n",
            "  loadBalancer: {locality: {enabled: 1}, slowStart: 1}\n",
            "  concurrency: {maxQueue: 1}\n",
            "  concurrency: {maxConcurrent: 1, adaptive: {algorithm: Vegas}}\n",
            "  concurrency: {maxConcurrent: 1, limit: 2}\n",
            "  concurrency: {maxConcurrent: 1, queueTimeout: 1}\n",
        ];
        let got: Vec<Vec<String>> = cases.iter().map(|c| p(c)).collect();
        let want: [&[&str]; 12] = [
            &[
                "routes.yaml:6:29: spec.loadBalancer.algorithm: unknown load balancing algorithm \"Random\" (expected P2CPeakEWMA, RoundRobin, LeastRequest, RingHash or Maglev)",
            ],
            &[
                "routes.yaml:6:29: spec.loadBalancer.algorithm: unknown load balancing algorithm \"Random\" (expected P2CPeakEWMA, RoundRobin, LeastRequest, RingHash or Maglev)",
            ],
            &[
                "routes.yaml:6:45: spec.loadBalancer.hash: only one of header, cookie or sourceIP may be given (got header and cookie)",
            ],
            &[
                "routes.yaml:6:45: spec.loadBalancer.hash: one of header, cookie or sourceIP is required",
            ],
            &["routes.yaml:6:54: spec.loadBalancer.hash.header: expected a string"],
            &["routes.yaml:6:56: spec.loadBalancer.hash.sourceIP: expected true or false"],
            &["routes.yaml:6:45: spec.loadBalancer.hash: expected a mapping"],
            &[
                "routes.yaml:6:38: spec.loadBalancer.locality.enabled: expected true or false",
                "routes.yaml:6:42: spec.loadBalancer.slowStart: unknown field \"slowStart\"",
            ],
            &["routes.yaml:6:16: spec.concurrency: missing required field \"maxConcurrent\""],
            &[
                "routes.yaml:6:57: spec.concurrency.adaptive.algorithm: unknown adaptive algorithm \"Vegas\" (expected Gradient or AIMD)",
            ],
            &["routes.yaml:6:35: spec.concurrency.limit: unknown field \"limit\""],
            &["routes.yaml:6:49: spec.concurrency.queueTimeout: expected a string"],
        ];
        assert_eq!(got, want);

        let full = policy(
            "p",
            "",
            &format!(
                "{SVC}  loadBalancer:\n    algorithm: Maglev\n    hash: {{cookie: session}}\n    locality: {{enabled: false, minHealthyPercent: 50}}\n  concurrency:\n    maxConcurrent: 100\n    maxQueue: 10\n    queueTimeout: 250ms\n    adaptive: {{algorithm: AIMD, minLimit: 5, maxLimit: 500}}\n"
            ),
        );
        assert_eq!(diags(&full), Vec::<String>::new());
        let Resource::BackendPolicy(bp) = decoded(full) else {
            panic!()
        };
        let lb = bp.load_balancer.as_ref().unwrap();
        assert_eq!(lb.algorithm, Some(Algorithm::Maglev));
        assert_eq!(lb.hash, Some(HashSpec::Cookie("session".into())));
        let loc = lb.locality.as_ref().unwrap();
        assert_eq!(
            (loc.enabled, loc.min_healthy_percent),
            (Some(false), Some(50))
        );
        let c = bp.concurrency.as_ref().unwrap();
        assert_eq!((c.max_concurrent, c.max_queue), (Some(100), Some(10)));
        assert_eq!(c.queue_timeout.as_deref(), Some("250ms"));
        let a = c.adaptive.as_ref().unwrap();
        assert_eq!(
            (a.algorithm, a.min_limit, a.max_limit),
            (Some(AdaptiveAlgorithm::AIMD), Some(5), Some(500))
        );
        for (hash, want) in [
            ("{header: X-User}", HashSpec::Header("X-User".into())),
            ("{sourceIP: true}", HashSpec::SourceIP(true)),
        ] {
            let yaml = policy(
                "p",
                "",
                &format!("{SVC}  loadBalancer: {{algorithm: RingHash, hash: {hash}}}\n"),
            );
            let Resource::BackendPolicy(bp) = decoded(yaml) else {
                panic!()
            };
            assert_eq!(bp.load_balancer.unwrap().hash, Some(want));
        }
    }

    #[test]
    fn rate_limit_policy_decoding() {
        let p = |spec: &str| diags(&policy_of("RateLimitPolicy", "p", "", spec));
        let cases = [
            SVC.to_string(),
            format!("{SVC}  rate: {{per: 1s}}\n"),
            format!("{SVC}  rate: {{requests: 1, period: 1s}}\n"),
            format!("{SVC}  rate: {{requests: many}}\n"),
            format!("{SVC}  rate: {{requests: 1}}\n  key: Tenant\n"),
            format!("{SVC}  rate: {{requests: 1}}\n  key: [a]\n"),
            format!("{SVC}  rate: {{requests: 1}}\n  key: {{}}\n"),
            format!("{SVC}  rate: {{requests: 1}}\n  key: {{header: a, cookie: b}}\n"),
            "  rate: {requests: 1}\n".to_string(),
            format!("{SVC}  rate: {{requests: 1}}\n  limit: 5\n"),
        ];
        let got: Vec<Vec<String>> = cases.iter().map(|c| p(c)).collect();
        let want: [&[&str]; 10] = [
            &["routes.yaml:5:3: spec: missing required field \"rate\""],
            &["routes.yaml:6:9: spec.rate: missing required field \"requests\""],
            &["routes.yaml:6:23: spec.rate.period: unknown field \"period\""],
            &["routes.yaml:6:20: spec.rate.requests: expected an integer"],
            &[
                "routes.yaml:7:8: spec.key: unknown rate limit key \"Tenant\" (expected All, Route, Caller or {header: <name>})",
            ],
            &["routes.yaml:7:8: spec.key: expected All, Route, Caller or {header: <name>}"],
            &["routes.yaml:7:8: spec.key: missing required field \"header\""],
            &["routes.yaml:7:20: spec.key.cookie: unknown field \"cookie\""],
            &["routes.yaml:5:3: spec: missing required field \"targetRefs\""],
            &["routes.yaml:7:3: spec.limit: unknown field \"limit\""],
        ];
        assert_eq!(got, want);
        assert_eq!(
            diags("apiVersion: policy.tern.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: p}\n"),
            [
                "routes.yaml:1:13: apiVersion: unsupported apiVersion \"policy.tern.dev/v1\" for RateLimitPolicy (expected policy.tern.dev/v1alpha1)"
            ]
        );
        // Every key form; a top-level status is ignored.
        for (key, want) in [
            ("All", RateLimitKeySpec::All),
            ("Route", RateLimitKeySpec::Route),
            ("Caller", RateLimitKeySpec::Caller),
            (
                "{header: x-tenant}",
                RateLimitKeySpec::Header("x-tenant".into()),
            ),
        ] {
            let yaml = policy_of(
                "RateLimitPolicy",
                "p",
                "",
                &format!(
                    "{SVC}  rate: {{requests: 100, per: 1m, burst: 20}}\n  key: {key}\nstatus: {{}}\n"
                ),
            );
            assert_eq!(diags(&yaml), Vec::<String>::new(), "{key}");
            let Resource::RateLimitPolicy(rp) = decoded(yaml) else {
                panic!()
            };
            assert_eq!(rp.key, Some(want));
            let rate = rp.rate.as_ref().unwrap();
            assert_eq!(
                (rate.requests, rate.per.as_deref(), rate.burst),
                (Some(100), Some("1m"), Some(20))
            );
        }
    }

    #[test]
    fn concurrency_policy_decoding() {
        let p = |spec: &str| diags(&policy_of("ConcurrencyPolicy", "p", "", spec));
        // (Route targets that do not exist are only warnings, checked in validation.)
        assert_eq!(
            p(ROUTE),
            [
                "routes.yaml:5:3: spec: missing required field \"maxConcurrent\"",
                "routes.yaml:5:74: spec.targetRefs[0].name: warning: no HTTPRoute shop/r: policy attaches to nothing (targetRef ignored)",
            ]
        );
        assert_eq!(
            p(&format!("{ROUTE}  maxConcurrent: 1\n  concurrency: {{}}\n"))[1],
            "routes.yaml:7:3: spec.concurrency: unknown field \"concurrency\""
        );
        let Resource::ConcurrencyPolicy(cp) = decoded_route_policy(
            "ConcurrencyPolicy",
            "  maxConcurrent: 8\n  maxQueue: 0\n  queueTimeout: 2s\n  adaptive: {}\n",
        ) else {
            panic!()
        };
        assert_eq!(cp.limit.max_concurrent, Some(8));
        assert_eq!(cp.limit.max_queue, Some(0));
        assert_eq!(cp.limit.queue_timeout.as_deref(), Some("2s"));
        let a = cp.limit.adaptive.as_ref().unwrap();
        assert_eq!((a.algorithm, a.min_limit, a.max_limit), (None, None, None));
    }

    #[test]
    fn authorization_policy_decoding() {
        let p = |spec: &str| diags(&policy_of("AuthorizationPolicy", "p", "", spec));
        let cases = [
            SVC.to_string(),
            format!("{SVC}  allow: {{meshed: true}}\n"),
            format!("{SVC}  allow: [{{meshed: yes}}]\n"),
            format!("{SVC}  allow: [{{identities: spiffe://x}}]\n"),
            format!("{SVC}  allow: [{{namespaces: [shop, 5]}}]\n"),
            format!("{SVC}  allow: [{{principals: [a]}}]\n"),
            format!("{SVC}  allow: [meshed]\n"),
            "  allow: []\n".to_string(),
            "  targetRefs: [{name: checkout, namespace: other}]\n  allow: []\n".to_string(),
        ];
        let got: Vec<Vec<String>> = cases.iter().map(|c| p(c)).collect();
        let want: [&[&str]; 9] = [
            &["routes.yaml:5:3: spec: missing required field \"allow\""],
            &["routes.yaml:6:10: spec.allow: expected a list"],
            &["routes.yaml:6:20: spec.allow[0].meshed: expected true or false"],
            &["routes.yaml:6:24: spec.allow[0].identities: expected a list"],
            &["routes.yaml:6:31: spec.allow[0].namespaces[1]: expected a string"],
            &["routes.yaml:6:12: spec.allow[0].principals: unknown field \"principals\""],
            &["routes.yaml:6:11: spec.allow[0]: expected a mapping"],
            &["routes.yaml:5:3: spec: missing required field \"targetRefs\""],
            &["routes.yaml:5:33: spec.targetRefs[0].namespace: unknown field \"namespace\""],
        ];
        assert_eq!(got, want);
        let Resource::AuthorizationPolicy(ap) = decoded_route_policy(
            "AuthorizationPolicy",
            "  allow:\n  - identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]\n    namespaces: [ops]\n  - {meshed: true, unauthenticated: false}\nstatus: {}\n",
        ) else {
            panic!()
        };
        assert_eq!(
            ap.allow,
            [
                AllowClause {
                    identities: vec![Some("spiffe://cluster.local/ns/shop/sa/web".into())],
                    namespaces: vec![Some("ops".into())],
                    ..AllowClause::default()
                },
                AllowClause {
                    meshed: true,
                    ..AllowClause::default()
                },
            ]
        );
    }
}
