//! Routing: authority -> Service port -> rule (Gateway API precedence, precompiled in the
//! snapshot) -> weighted backend, then the rule's request filters.

use std::sync::Arc;

use http::{HeaderValue, Request, Uri, header};
use tern_config::snapshot::{Backend, Matched, PathRewrite, Rule, ServicePort, UrlRewrite};

use crate::headers;
use crate::rescue::ProxyError;
use crate::state::Active;

pub struct Routed<'a> {
    pub parent: &'a Arc<ServicePort>,
    pub matched: Matched<'a>,
}

/// Finds the Service port and rule for a request, borrowing from the snapshot only: by
/// the address the client dialled when the connection was intercepted, else by the
/// request's authority.
pub fn route<'a, B>(
    active: &'a Active,
    req: &Request<B>,
    namespace: &str,
    original_dst: Option<std::net::SocketAddr>,
) -> Result<Routed<'a>, ProxyError> {
    let named = || -> Result<&'a Arc<ServicePort>, ProxyError> {
        let authority = headers::authority(req).ok_or(ProxyError::MissingAuthority)?;
        let (host, port) = headers::split_host_port(authority)?;
        Ok(active.snapshot.resolve(host, port, namespace)?)
    };
    let parent = match original_dst.and_then(|dst| active.port_at(dst, || named().ok())) {
        Some(sp) => sp,
        None => named()?,
    };
    let uri = req.uri();
    let matched = parent
        .route(req.method(), uri.path(), uri.query(), req.headers())
        .ok_or_else(|| ProxyError::NoRoute {
            parent: active.parent_label(parent),
            method: req.method().clone(),
            path: uri.path().to_string(),
        })?;
    Ok(Routed { parent, matched })
}

/// Picks a backend of the rule by weight.
pub fn pick_backend(rule: &Rule) -> Option<&Arc<Backend>> {
    let total = rule.backends.total;
    if total == 0 {
        return None;
    }
    rule.backends.pick(fastrand::u32(..total))
}

/// Applies `RequestHeaderModifier` and `URLRewrite`.
pub fn apply_request_filters<B>(
    req: &mut Request<B>,
    rule: &Rule,
    prefix: Option<&str>,
) -> Result<(), ProxyError> {
    if !rule.request_headers.is_empty() {
        rule.request_headers.apply(req.headers_mut());
    }
    if let Some(rewrite) = &rule.url_rewrite {
        rewrite_url(req, rewrite, prefix)?;
    }
    Ok(())
}

fn rewrite_url<B>(
    req: &mut Request<B>,
    rewrite: &UrlRewrite,
    prefix: Option<&str>,
) -> Result<(), ProxyError> {
    let bad = || ProxyError::BadRequest("URL rewrite produced an invalid request target");
    let path = match &rewrite.path {
        Some(PathRewrite::ReplaceFullPath(p)) => Some(p.clone()),
        Some(PathRewrite::ReplacePrefixMatch(p)) => {
            prefix.map(|prefix| replace_prefix(req.uri().path(), prefix, p))
        }
        None => None,
    };
    if rewrite.hostname.is_none() && path.is_none() {
        return Ok(());
    }
    let mut target = path.unwrap_or_else(|| req.uri().path().to_string());
    if let Some(q) = req.uri().query() {
        target.push('?');
        target.push_str(q);
    }
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    if let Some(host) = &rewrite.hostname {
        // The authority moves to Host; the upstream rewrite derives `:authority` from it.
        parts.scheme = None;
        parts.authority = None;
        req.headers_mut().insert(header::HOST, host.clone());
    } else if let Some(a) = &parts.authority {
        // Keep the original authority reachable once the target is origin-form.
        let a = HeaderValue::from_str(a.as_str()).map_err(|_| bad())?;
        req.headers_mut().insert(header::HOST, a);
        parts.scheme = None;
        parts.authority = None;
    }
    parts.path_and_query = Some(target.parse().map_err(|_| bad())?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| bad())?;
    Ok(())
}

/// Gateway API `ReplacePrefixMatch`: `/foo/bar` with prefix `/foo` and replacement `/baz`
/// becomes `/baz/bar`; with replacement `/` it becomes `/bar`.
fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.get(prefix.len()..).unwrap_or("");
    let mut out = String::with_capacity(replacement.len() + rest.len());
    out.push_str(replacement.trim_end_matches('/'));
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_replacement_follows_gateway_api() {
        assert_eq!(replace_prefix("/foo/bar", "/foo", "/baz"), "/baz/bar");
        assert_eq!(replace_prefix("/foo/bar", "/foo", "/"), "/bar");
        assert_eq!(replace_prefix("/foo", "/foo", "/"), "/");
        assert_eq!(replace_prefix("/foo", "/foo", "/baz"), "/baz");
        assert_eq!(replace_prefix("/x/y", "/", "/v2"), "/v2/x/y");
        assert_eq!(replace_prefix("/foo/", "/foo/", "/baz"), "/baz/");
    }

    #[test]
    fn rewrite_keeps_query_and_moves_authority_to_host() {
        let mut req = Request::builder()
            .uri("http://checkout.shop:8080/old/x?q=1")
            .body(())
            .unwrap();
        let rw = UrlRewrite {
            hostname: None,
            path: Some(PathRewrite::ReplacePrefixMatch("/new".into())),
        };
        rewrite_url(&mut req, &rw, Some("/old")).unwrap();
        assert_eq!(req.uri(), "/new/x?q=1");
        assert_eq!(req.headers()[header::HOST], "checkout.shop:8080");

        let rw = UrlRewrite {
            hostname: Some(HeaderValue::from_static("other.example")),
            path: Some(PathRewrite::ReplaceFullPath("/full".into())),
        };
        rewrite_url(&mut req, &rw, None).unwrap();
        assert_eq!(req.uri(), "/full?q=1");
        assert_eq!(req.headers()[header::HOST], "other.example");
    }
}
