//! Hop-by-hop headers (RFC 9110 section 7.6.1) and the request-target rewrite between
//! HTTP/1.1 and HTTP/2.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

use tern_config::snapshot::Protocol;

use crate::rescue::ProxyError;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// True for an HTTP/1.1 upgrade request (WebSocket and friends).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `TE` (except `trailers`, which gRPC needs end to
/// end), `Proxy-Authorization` (meant for this proxy) and `Upgrade`. With `upgrade`, the
/// `Upgrade` header and `Connection: upgrade` are kept so the upgrade passes through.
///
/// Hot path: one pass over the names (standard names compare as enums) finds which are
/// present; only those are removed, and the common `Connection` tokens (`keep-alive`,
/// `close`) are recognised without parsing a header name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut present = 0u8;
    for name in headers.keys() {
        present |= hop_by_hop_bit(name);
    }
    if present != 0 {
        if present & CONNECTION_BIT != 0 {
            remove_connection_listed(headers, upgrade);
        }
        if present & KEEP_ALIVE_BIT != 0 {
            headers.remove(&KEEP_ALIVE);
        }
        if present & PROXY_CONNECTION_BIT != 0 {
            headers.remove(&PROXY_CONNECTION);
        }
        if present & TRANSFER_ENCODING_BIT != 0 {
            headers.remove(header::TRANSFER_ENCODING);
        }
        if present & PROXY_AUTHORIZATION_BIT != 0 {
            headers.remove(header::PROXY_AUTHORIZATION);
        }
        if present & TE_BIT != 0
            && headers
                .get(header::TE)
                .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            headers.remove(header::TE);
        }
        if present & UPGRADE_BIT != 0 && !upgrade {
            headers.remove(header::UPGRADE);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn remove_connection_listed(headers: &mut HeaderMap, upgrade: bool) {
    let mut values = headers.get_all(header::CONNECTION).iter();
    let first = values.next().cloned();
    // Rare: several Connection lines. Collecting them is fine then.
    let rest: Vec<HeaderValue> = values.cloned().collect();
    headers.remove(header::CONNECTION);
    for value in first.iter().chain(rest.iter()) {
        let Ok(list) = value.to_str() else { continue };
        for token in list.split(',') {
            let token = token.trim();
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || (upgrade && token.eq_ignore_ascii_case("upgrade"))
            {
                continue;
            }
            if token.eq_ignore_ascii_case("keep-alive") {
                headers.remove(&KEEP_ALIVE);
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                // Never let a Connection token strip end-to-end framing we need.
                if name != header::TE {
                    headers.remove(&name);
                }
            }
        }
    }
}

const CONNECTION_BIT: u8 = 1;
const KEEP_ALIVE_BIT: u8 = 2;
const PROXY_CONNECTION_BIT: u8 = 4;
const TRANSFER_ENCODING_BIT: u8 = 8;
const TE_BIT: u8 = 16;
const UPGRADE_BIT: u8 = 32;
const PROXY_AUTHORIZATION_BIT: u8 = 64;

fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        CONNECTION_BIT
    } else if name == header::TRANSFER_ENCODING {
        TRANSFER_ENCODING_BIT
    } else if name == header::TE {
        TE_BIT
    } else if name == header::UPGRADE {
        UPGRADE_BIT
    } else if name == header::PROXY_AUTHORIZATION {
        PROXY_AUTHORIZATION_BIT
    } else if name == KEEP_ALIVE {
        KEEP_ALIVE_BIT
    } else if name == PROXY_CONNECTION {
        PROXY_CONNECTION_BIT
    } else {
        0
    }
}

/// Whether `headers` has a `name` that is not a standard header. A scan, not a hash: a
/// non-standard name is compared only to other non-standard names, and a request has few
/// headers (hashing the name costs more than the whole scan).
fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.keys().any(|k| k == name)
}

/// The authority a request is addressed to: the absolute-form target or `:authority`
/// first, then `Host`.
pub fn authority<B>(req: &Request<B>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
}

/// Splits `host[:port]` (bracketed IPv6 literals included).
pub fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), ProxyError> {
    let bad = ProxyError::BadRequest("malformed Host or :authority");
    // Byte scans, not `str` patterns: this runs for every routed request, on short input.
    let after_userinfo = authority
        .bytes()
        .rposition(|b| b == b'@')
        .map_or(0, |i| i + 1);
    let authority = &authority[after_userinfo..];
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(bad)?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(ProxyError::BadRequest("malformed Host or :authority")),
        }
    } else {
        match authority.bytes().position(|b| b == b':') {
            Some(i) => (&authority[..i], Some(&authority[i + 1..])),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => Some(parse_port(p).ok_or(ProxyError::BadRequest(
            "malformed port in Host or :authority",
        ))?),
        None => None,
    };
    if host.is_empty() {
        return Err(ProxyError::BadRequest("empty host in Host or :authority"));
    }
    Ok((host, port))
}

/// A port: one or more digits (RFC 3986 section 3.2.3), at most 65535.
fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() {
        return None;
    }
    let mut n: u32 = 0;
    for b in p.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u32::from(b - b'0');
        if n > u32::from(u16::MAX) {
            return None;
        }
    }
    u16::try_from(n).ok()
}

/// Rewrites a request for the upstream's protocol: origin-form target plus `Host` for
/// HTTP/1.1, absolute target (`:scheme`, `:authority`) and no `Host` for HTTP/2.
/// Says, on a request carried between sidecars over HTTP/2, that the application spoke
/// HTTP/1.1: the server's sidecar sends it to its application as HTTP/1.1 again.
pub static ORIG_PROTO: HeaderName = HeaderName::from_static("tern-orig-proto");

/// [`for_upstream`] for `wire`, marking a request whose application protocol (`app`) is
/// HTTP/1.1 but travels as HTTP/2 between sidecars.
pub fn for_sidecar<B>(
    req: &mut Request<B>,
    wire: Protocol,
    app: Protocol,
) -> Result<(), ProxyError> {
    for_upstream(req, wire)?;
    if wire == Protocol::H2c && app == Protocol::Http1 {
        req.headers_mut()
            .insert(&ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    } else if has(req.headers(), &ORIG_PROTO) {
        req.headers_mut().remove(&ORIG_PROTO);
    }
    Ok(())
}

pub fn for_upstream<B>(req: &mut Request<B>, protocol: Protocol) -> Result<(), ProxyError> {
    if protocol == Protocol::Http1
        && req.version() <= Version::HTTP_11
        && req.uri().authority().is_none()
    {
        // HTTP/1 in origin form, its Host as parsed (the parser allows only one): nothing
        // to rewrite.
        *req.version_mut() = Version::HTTP_11;
        return Ok(());
    }
    if protocol == Protocol::H2c
        && req.uri().scheme() == Some(&http::uri::Scheme::HTTP)
        && req.uri().authority().is_some()
        && req.uri().path_and_query().is_some()
    {
        // Already absolute, as an HTTP/2 client's requests are: the target stays as it
        // is (rebuilding it would copy and parse the authority again).
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
        return Ok(());
    }
    let authority = match req.uri().authority() {
        Some(a) => Some(HeaderValue::from_str(a.as_str()).map_err(|_| bad_authority())?),
        None => req.headers().get(header::HOST).cloned(),
    };
    match protocol {
        Protocol::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            if req.uri().authority().is_some() || req.uri().scheme().is_some() {
                let pq = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
                *req.uri_mut() = Uri::from(pq);
            }
            if let Some(a) = authority {
                req.headers_mut().insert(header::HOST, a);
            }
        }
        Protocol::H2c => {
            *req.version_mut() = Version::HTTP_2;
            let a = authority.ok_or(ProxyError::MissingAuthority)?;
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some(
                http::uri::Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(
                    a.as_bytes(),
                ))
                .map_err(|_| bad_authority())?,
            );
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            *req.uri_mut() = Uri::from_parts(parts).map_err(|_| bad_authority())?;
            req.headers_mut().remove(header::HOST);
        }
    }
    Ok(())
}

fn bad_authority() -> ProxyError {
    ProxyError::BadRequest("malformed Host or :authority")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_and_fixed_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::TE, "gzip".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("checkout").unwrap(), ("checkout", None));
        assert_eq!(
            split_host_port("checkout.shop:8080").unwrap(),
            ("checkout.shop", Some(8080))
        );
        assert_eq!(split_host_port("[::1]:80").unwrap(), ("::1", Some(80)));
        assert!(split_host_port("a:99999").is_err());
        assert!(split_host_port(":80").is_err());
        assert!(split_host_port("a:").is_err());
        assert!(split_host_port("a:+80").is_err());
        assert!(split_host_port("a:8x").is_err());
        assert_eq!(split_host_port("a:080").unwrap(), ("a", Some(80)));
        assert_eq!(split_host_port("a:65535").unwrap(), ("a", Some(65535)));
        assert!(split_host_port("a:65536").is_err());
        assert_eq!(split_host_port("u:p@h:1").unwrap(), ("h", Some(1)));
        assert_eq!(split_host_port("[::1]").unwrap(), ("::1", None));
        assert!(split_host_port("[::1]x").is_err());
    }

    #[test]
    fn h1_to_h2_target() {
        let mut req = Request::builder()
            .uri("/api?x=1")
            .header(header::HOST, "checkout:8080")
            .body(())
            .unwrap();
        for_upstream(&mut req, Protocol::H2c).unwrap();
        assert_eq!(req.uri(), "http://checkout:8080/api?x=1");
        assert!(!req.headers().contains_key(header::HOST));

        let mut req = Request::builder()
            .uri("http://checkout:8080/api")
            .body(())
            .unwrap();
        for_upstream(&mut req, Protocol::Http1).unwrap();
        assert_eq!(req.uri(), "/api");
        assert_eq!(req.headers()[header::HOST], "checkout:8080");
    }

    #[test]
    fn h2_to_h2_target() {
        // Already absolute: kept as is, Host dropped.
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://checkout:8080/api?x=1")
            .header(header::HOST, "other")
            .body(())
            .unwrap();
        for_upstream(&mut req, Protocol::H2c).unwrap();
        assert_eq!(req.uri(), "http://checkout:8080/api?x=1");
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(!req.headers().contains_key(header::HOST));

        // Another scheme is rewritten to the plain one spoken to the upstream.
        let mut req = Request::builder()
            .uri("https://checkout/api")
            .body(())
            .unwrap();
        for_upstream(&mut req, Protocol::H2c).unwrap();
        assert_eq!(req.uri(), "http://checkout/api");
    }
}
