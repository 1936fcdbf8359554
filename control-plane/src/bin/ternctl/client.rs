//! A small HTTP/1.1 client for sidecar admin endpoints (readiness, /config, /metrics,
//! /circuits): one request per fresh connection, with an overall timeout.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One HTTP/1.1 request on a fresh connection, with an overall timeout.
pub async fn request(
    method: Method,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let work = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .with_context(|| format!("http://{addr}{path}: no answer within {timeout:?}"))?
        .with_context(|| format!("http://{addr}{path}"))
}

pub async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    request(Method::GET, addr, path, timeout).await
}

/// Parses an admin address as a user types it: `127.0.0.1:4191`, `localhost:4191`, or
/// `http://127.0.0.1:4191/` (scheme and trailing slash are ignored).
pub fn parse_addr(s: &str) -> anyhow::Result<SocketAddr> {
    let trimmed = s.trim();
    let bare = trimmed
        .strip_prefix("http://")
        .unwrap_or(trimmed)
        .trim_end_matches('/');
    if let Ok(addr) = bare.parse() {
        return Ok(addr);
    }
    anyhow::ensure!(
        bare.contains(':'),
        "{s:?} is not an address: expected HOST:PORT, e.g. 127.0.0.1:4191"
    );
    bare.to_socket_addrs()
        .with_context(|| format!("resolving {bare}"))?
        .next()
        .with_context(|| format!("{bare} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses() {
        let want: SocketAddr = "127.0.0.1:4191".parse().unwrap();
        assert_eq!(parse_addr("127.0.0.1:4191").unwrap(), want);
        assert_eq!(parse_addr("http://127.0.0.1:4191/").unwrap(), want);
        assert_eq!(parse_addr(" 127.0.0.1:4191 ").unwrap(), want);
        assert!(parse_addr("localhost:4191").unwrap().ip().is_loopback());
        assert!(parse_addr("4191").is_err());
        assert!(parse_addr("127.0.0.1").is_err());
    }
}
