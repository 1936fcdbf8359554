//! `ternctl status`: every sidecar connected to a tern-control, from its admin `/sidecars`.
//!
//! One row per sidecar: the config version it applied and the one last pushed, its ACK
//! state, its last ACK, the certificate it serves (identity, expiry, issuer: `(old)`
//! when not the control plane's current issuer) and the first line of its last NACK's
//! reason. NACKed sidecars (`!`, red) and stale ones (`~`, yellow: a push unanswered for
//! more than 5 s) stand out. `--json` prints the control plane's JSON as it came.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::StatusCode;
use tern_control::server::SidecarStatus;

use crate::circuits::{Row, Severity, fmt_ago, fmt_in, layout, now_unix_ms};

pub const DEFAULT_CONTROL_PLANE: &str = "127.0.0.1:4181";
const TIMEOUT: Duration = Duration::from_secs(3);
/// A push unanswered for longer than this is stale.
const STALE_MS: u64 = 5_000;

#[derive(clap::Args)]
pub struct Args {
    /// The control plane's admin address (tern-control --admin).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_CONTROL_PLANE)]
    control_plane: String,
    /// Print the control plane's JSON as it came, instead of a table.
    #[arg(long)]
    json: bool,
}

/// How a sidecar's row is shown, and its STATE cell.
fn classify(s: &SidecarStatus, now_ms: u64) -> (Severity, String) {
    match s.state.as_str() {
        "nacked" => (Severity::Open, "NACKED".into()),
        "pending" => {
            let since = s.pushed_unix_ms.unwrap_or(s.connected_since_unix_ms);
            let waited = now_ms.saturating_sub(since);
            if waited > STALE_MS {
                (
                    Severity::HalfOpen,
                    format!("STALE ({})", fmt_ago(waited as i64)),
                )
            } else {
                (Severity::Closed, "pending".into())
            }
        }
        other => (Severity::Closed, other.to_string()),
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// The IDENTITY, EXPIRES and ISSUER cells.
fn identity_cells(s: &SidecarStatus, now_ms: u64) -> [String; 3] {
    let Some(id) = &s.identity else {
        return ["-".into(), "-".into(), "-".into()];
    };
    let expires_ms = id.not_after_unix.saturating_mul(1000) - now_ms as i64;
    let expires = if expires_ms <= 0 {
        "EXPIRED".to_string()
    } else {
        fmt_in(expires_ms)
    };
    let short: String = id.issuer_id.chars().take(8).collect();
    let issuer = if id.current_issuer {
        or_dash(&short)
    } else {
        format!("{} (old)", or_dash(&short))
    };
    [
        id.spiffe_id
            .strip_prefix("spiffe://")
            .unwrap_or(&id.spiffe_id)
            .to_string(),
        expires,
        issuer,
    ]
}

pub fn render(sidecars: &[SidecarStatus], now_ms: u64, color: bool) -> Vec<String> {
    let header = [
        "WORKLOAD",
        "NAMESPACE",
        "SERVICE",
        "APPLIED",
        "PUSHED",
        "STATE",
        "LAST ACK",
        "IDENTITY",
        "EXPIRES",
        "ISSUER",
        "NACK REASON",
    ];
    let rows: Vec<Row> = sidecars
        .iter()
        .map(|s| {
            let (severity, state) = classify(s, now_ms);
            let reason = s
                .last_nack
                .as_ref()
                .map(|n| n.reason.lines().next().unwrap_or("").to_string())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "-".into());
            let [identity, expires, issuer] = identity_cells(s, now_ms);
            (
                severity,
                vec![
                    or_dash(&s.workload),
                    or_dash(&s.namespace),
                    or_dash(&s.service),
                    or_dash(&s.applied_version),
                    or_dash(&s.pushed_version),
                    state,
                    s.last_ack_unix_ms
                        .map(|t| fmt_ago(now_ms as i64 - t as i64))
                        .unwrap_or_else(|| "-".into()),
                    identity,
                    expires,
                    issuer,
                    reason,
                ],
            )
        })
        .collect();
    let nacked = rows.iter().filter(|(s, _)| *s == Severity::Open).count();
    let stale = rows
        .iter()
        .filter(|(s, _)| *s == Severity::HalfOpen)
        .count();
    let mut summary = format!(
        "{} sidecar{}, {nacked} nacked, {stale} stale",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    let old_issuer = sidecars
        .iter()
        .filter(|s| s.identity.as_ref().is_some_and(|i| !i.current_issuer))
        .count();
    if old_issuer > 0 {
        summary.push_str(&format!(", {old_issuer} on an old issuer"));
    }
    let mut out = vec![summary];
    out.extend(layout(&header, &rows, color));
    out
}

/// Parses a `/sidecars` body, sorted by namespace and workload.
pub fn parse(body: &[u8]) -> anyhow::Result<Vec<SidecarStatus>> {
    let mut all: Vec<SidecarStatus> =
        serde_json::from_slice(body).context("the answer is not the /sidecars JSON")?;
    all.sort_by(|a, b| (&a.namespace, &a.workload).cmp(&(&b.namespace, &b.workload)));
    Ok(all)
}

async fn fetch_raw(admin: SocketAddr) -> anyhow::Result<Bytes> {
    let (status, body) = crate::client::get(admin, "/sidecars", TIMEOUT)
        .await
        .with_context(|| {
            format!(
                "cannot reach a tern-control admin endpoint. Is tern-control running with \
                 --admin {admin}? Name another one with `ternctl status --control-plane HOST:PORT`."
            )
        })?;
    match status {
        StatusCode::OK => Ok(body),
        other => {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.trim().chars().take(200).collect();
            anyhow::bail!("http://{admin}/sidecars answered {other}: {text}")
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let admin = crate::client::parse_addr(&args.control_plane)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let body = rt.block_on(fetch_raw(admin))?;
    let sidecars = if args.json {
        None
    } else {
        Some(parse(&body).with_context(|| format!("reading http://{admin}/sidecars"))?)
    };
    match print(&body, sidecars.as_deref()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        other => Ok(other.map(|()| ExitCode::SUCCESS)?),
    }
}

fn print(body: &[u8], sidecars: Option<&[SidecarStatus]>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match sidecars {
        None => {
            out.write_all(body)?;
            if !body.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
        }
        Some(s) => {
            let color = out.is_terminal() && std::env::var_os("NO_COLOR").is_none();
            for line in render(s, now_unix_ms(), color) {
                writeln!(out, "{line}")?;
            }
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"[
      {"workload": "web-1", "namespace": "shop", "service": "shop/web", "calls": ["shop/checkout"],
       "connected_since_unix_ms": 1000, "pushed_version": "bbbb", "pushed_unix_ms": 90000,
       "applied_version": "aaaa", "last_ack_unix_ms": 50000,
       "last_nack": {"version": "bbbb", "reason": "routes.yaml#1:3:5: bad\nmore", "unix_ms": 91000},
       "state": "nacked"},
      {"workload": "cat-1", "namespace": "shop", "pushed_version": "cccc", "pushed_unix_ms": 99000,
       "applied_version": "cccc", "last_ack_unix_ms": 99500, "last_nack": null, "state": "synced"},
      {"workload": "inv-1", "namespace": "shop", "pushed_version": "dddd", "pushed_unix_ms": 80000,
       "applied_version": "", "state": "pending", "extra": 1},
      {"workload": "new-1", "namespace": "shop", "pushed_version": "dddd", "pushed_unix_ms": 99000,
       "state": "pending",
       "identity": {"spiffe_id": "spiffe://cluster.local/ns/shop/sa/new", "not_after_unix": 86380,
                    "issuer_id": "0123456789abcdef", "current_issuer": false}},
      {"workload": "new-2", "namespace": "shop", "pushed_version": "dddd", "pushed_unix_ms": 99000,
       "state": "pending",
       "identity": {"spiffe_id": "spiffe://cluster.local/ns/shop/sa/new", "not_after_unix": 50,
                    "issuer_id": "fedcba9876543210", "current_issuer": true}}
    ]"#;

    #[test]
    fn table_from_sample() {
        let s = parse(SAMPLE.as_bytes()).unwrap();
        let lines = render(&s, 100_000, false);
        assert_eq!(
            lines[0],
            "5 sidecars, 1 nacked, 1 stale, 1 on an old issuer"
        );
        assert!(lines[1].contains("IDENTITY "), "{}", lines[1]);
        assert!(lines[1].contains(" EXPIRES "), "{}", lines[1]);
        assert!(lines[1].starts_with("  WORKLOAD"), "{}", lines[1]);
        let row = |w: &str| lines.iter().find(|l| l.contains(w)).unwrap().clone();
        assert!(row("cat-1").starts_with("  cat-1"));
        assert!(row("cat-1").contains("synced"));
        assert!(row("cat-1").contains("0s ago"));
        assert!(row("inv-1").starts_with("~ inv-1"));
        assert!(row("inv-1").contains("STALE (20s ago)"));
        assert!(row("new-1").starts_with("  new-1"));
        assert!(
            row("new-1").contains("cluster.local/ns/shop/sa/new  in 23h58m  01234567 (old)  "),
            "{}",
            row("new-1")
        );
        assert!(
            row("new-2").contains("EXPIRED    fedcba98 "),
            "{}",
            row("new-2")
        );
        assert!(row("web-1").starts_with("! web-1"));
        assert!(row("web-1").contains("NACKED"));
        assert!(row("web-1").ends_with("routes.yaml#1:3:5: bad"));
        assert!(row("web-1").contains("50s ago"));
    }

    #[test]
    fn colour_marks_nacked_and_stale_rows() {
        let s = parse(SAMPLE.as_bytes()).unwrap();
        let lines = render(&s, 100_000, true);
        let coloured = lines.iter().filter(|l| l.contains("\x1b[")).count();
        assert_eq!(coloured, 2);
    }

    #[tokio::test]
    async fn unreachable_is_an_error_that_says_what_to_do() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = fetch_raw(addr).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("--control-plane HOST:PORT"),
            "{e:#}"
        );
    }
}
