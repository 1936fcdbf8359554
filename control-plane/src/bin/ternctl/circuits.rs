//! `ternctl circuits`: a sidecar's per-endpoint circuit breakers, from its admin `/circuits`.
//!
//! Prints one row per (backend, endpoint): state, why it is in that state, since when, when
//! the next probe is due, and the recent successes and failures the breaker counted. Open
//! and half-open endpoints are marked (`!` and `~`, state in upper case) and coloured when
//! stdout is a terminal. `--json` prints the proxy's JSON as it came.
//!
//! The types and formatting helpers are shared with the demo's live summary.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;

pub const DEFAULT_ADMIN: &str = "127.0.0.1:4191";
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub struct Args {
    /// The sidecar's admin address (tern-proxy --admin).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
    admin: String,
    /// Print the proxy's JSON as it came, instead of a table.
    #[arg(long)]
    json: bool,
}

/// `GET /circuits`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Circuits {
    /// The config version the breakers belong to.
    pub version: Option<String>,
    pub backends: Vec<BackendCircuits>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct BackendCircuits {
    /// `namespace/service:port`.
    pub backend: String,
    /// The BackendPolicy that applies (`namespace/name`); `None` when defaults apply.
    pub policy: Option<String>,
    pub endpoints_total: u64,
    pub ejected: u64,
    /// At most this many endpoints may be ejected at once (`maxEjectedPercent`).
    pub max_ejected: u64,
    pub endpoints: Vec<EndpointCircuit>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct EndpointCircuit {
    pub address: String,
    pub zone: Option<String>,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Why it is in this state: `consecutive`, `rate`, `probe_failed`, `probe_succeeded`;
    /// `None` if it never tripped.
    pub reason: Option<String>,
    pub since_unix_ms: Option<u64>,
    /// When an open endpoint gets its next probe request.
    pub next_probe_unix_ms: Option<u64>,
    pub consecutive_failures: u64,
    pub trips: u64,
    pub recent: Option<Recent>,
}

/// Responses the breaker counted over its recent window.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Recent {
    pub success: u64,
    pub failure: u64,
    pub interval_seconds: f64,
}

/// How an endpoint's state is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Closed,
    HalfOpen,
    Open,
}

impl EndpointCircuit {
    pub fn severity(&self) -> Severity {
        match self.state.as_str() {
            "open" => Severity::Open,
            "half_open" | "half-open" => Severity::HalfOpen,
            _ => Severity::Closed,
        }
    }

    /// The state as shown: upper case when the endpoint is (partly) out of rotation.
    pub fn state_label(&self) -> String {
        match self.severity() {
            Severity::Closed => self.state.clone(),
            _ => self.state.to_uppercase(),
        }
    }

    pub fn reason_label(&self) -> &str {
        self.reason.as_deref().unwrap_or("-")
    }

    pub fn zone_label(&self) -> &str {
        self.zone.as_deref().unwrap_or("-")
    }

    pub fn since_label(&self, now_ms: u64) -> String {
        match self.since_unix_ms {
            Some(t) => fmt_ago(now_ms as i64 - t as i64),
            None => "-".into(),
        }
    }

    pub fn next_probe_label(&self, now_ms: u64) -> String {
        match self.next_probe_unix_ms {
            Some(t) => fmt_in(t as i64 - now_ms as i64),
            None => "-".into(),
        }
    }

    pub fn recent_label(&self) -> String {
        match self.recent {
            Some(r) => format!("{}/{}", r.success, r.failure),
            None => "-".into(),
        }
    }
}

impl Severity {
    /// One-character marker for the first column.
    pub fn marker(self) -> char {
        match self {
            Severity::Closed => ' ',
            Severity::HalfOpen => '~',
            Severity::Open => '!',
        }
    }

    fn color(self) -> Option<&'static str> {
        match self {
            Severity::Closed => None,
            Severity::HalfOpen => Some("\x1b[33m"),
            Severity::Open => Some("\x1b[31;1m"),
        }
    }
}

/// `ms` milliseconds in the past, as `12s ago`, `3m05s ago`, `2h10m ago` or `4d ago`.
pub fn fmt_ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m{:02}s ago", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m ago", s / 3600, s % 3600 / 60),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `ms` milliseconds in the future, as `in 3s`, `in 1m30s`, `in 23h05m` or `in 80d`
/// (rounded up); `due` when the time has come.
pub fn fmt_in(ms: i64) -> String {
    if ms <= 0 {
        return "due".into();
    }
    let s = (ms + 999) / 1000;
    match s {
        0..60 => format!("in {s}s"),
        60..3600 => format!("in {}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("in {}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("in {}d", s / 86400),
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Parses a `/circuits` body; backends sorted by name for a stable display.
pub fn parse(body: &[u8]) -> anyhow::Result<Circuits> {
    let mut c: Circuits =
        serde_json::from_slice(body).context("the answer is not the /circuits JSON")?;
    c.backends.sort_by(|a, b| a.backend.cmp(&b.backend));
    Ok(c)
}

/// Fetches `/circuits` from a sidecar's admin endpoint: the body of a 200, or an error that
/// says what went wrong (unreachable, or a proxy without `/circuits`).
pub async fn fetch_raw(admin: SocketAddr, timeout: Duration) -> anyhow::Result<Bytes> {
    let (status, body) = crate::client::get(admin, "/circuits", timeout)
        .await
        .map_err(|e| Unreachable(format!("{e:#}")))?;
    match status {
        StatusCode::OK => Ok(body),
        StatusCode::NOT_FOUND => anyhow::bail!(
            "http://{admin}/circuits answered 404: this tern-proxy predates circuit breakers"
        ),
        other => {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.trim().chars().take(200).collect();
            anyhow::bail!("http://{admin}/circuits answered {other}: {text}")
        }
    }
}

/// Nothing answered HTTP at the admin address (refused, timed out, not HTTP).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach a tern-proxy admin endpoint: {0}")]
pub struct Unreachable(String);

/// A table cell list with the severity that styles its row.
pub type Row = (Severity, Vec<String>);

/// Lays out rows in left-aligned columns; each line starts with the row's marker. Rows of
/// open and half-open endpoints are coloured when `color` is set.
pub fn layout(header: &[&str], rows: &[Row], color: bool) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for (_, cells) in rows {
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |marker: char, cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        out.push(marker);
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            out.push_str(if i == 0 { " " } else { "  " });
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}"));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = vec![line(' ', &mut header.iter().copied())];
    for (severity, cells) in rows {
        let text = line(severity.marker(), &mut cells.iter().map(String::as_str));
        match severity.color().filter(|_| color) {
            Some(c) => out.push(format!("{c}{text}\x1b[0m")),
            None => out.push(text),
        }
    }
    out
}

/// The breakers' recent window in seconds, if every endpoint reports the same one.
pub fn recent_interval(c: &Circuits) -> Option<f64> {
    let mut it = c
        .backends
        .iter()
        .flat_map(|b| &b.endpoints)
        .filter_map(|e| e.recent.map(|r| r.interval_seconds));
    let first = it.next()?;
    it.all(|s| s == first).then_some(first)
}

/// The `ternctl circuits` table and its notes, at time `now_ms` (Unix milliseconds).
pub fn render(c: &Circuits, now_ms: u64, color: bool) -> Vec<String> {
    let header = [
        "BACKEND",
        "ENDPOINT",
        "ZONE",
        "STATE",
        "REASON",
        "SINCE",
        "NEXT PROBE",
        "OK/FAIL",
        "TRIPS",
    ];
    let mut rows: Vec<Row> = Vec::new();
    for b in &c.backends {
        for e in &b.endpoints {
            rows.push((
                e.severity(),
                vec![
                    b.backend.clone(),
                    e.address.clone(),
                    e.zone_label().into(),
                    e.state_label(),
                    e.reason_label().into(),
                    e.since_label(now_ms),
                    e.next_probe_label(now_ms),
                    e.recent_label(),
                    e.trips.to_string(),
                ],
            ));
        }
    }
    let mut out = vec![format!(
        "config version {}",
        c.version.as_deref().unwrap_or("(none)")
    )];
    out.push(String::new());
    if rows.is_empty() {
        out.push("no backends: this sidecar has no outbound backends in its config".into());
        return out;
    }
    out.extend(layout(&header, &rows, color));
    out.push(String::new());
    // One line per backend worth a look; the plain ones (default policy, nothing ejected)
    // are counted together.
    let mut plain = 0;
    for b in &c.backends {
        let policy = match &b.policy {
            Some(p) => format!("BackendPolicy {p}"),
            None if b.ejected == 0 => {
                plain += 1;
                continue;
            }
            None => "default policy".into(),
        };
        out.push(format!(
            "{}: {} of {} endpoint{} ejected (at most {} at once), {policy}",
            b.backend,
            b.ejected,
            b.endpoints_total,
            if b.endpoints_total == 1 { "" } else { "s" },
            b.max_ejected,
        ));
    }
    if plain > 0 {
        out.push(format!(
            "{plain} {}backend{} on the default policy, none ejected",
            if plain < c.backends.len() {
                "other "
            } else {
                ""
            },
            if plain == 1 { "" } else { "s" },
        ));
    }
    let window = match recent_interval(c) {
        Some(s) => format!("the last {s}s"),
        None => "each breaker's recent window".into(),
    };
    out.push(format!(
        "OK/FAIL: responses over {window}. ! open (ejected), ~ half_open (probing)."
    ));
    out
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let admin = crate::client::parse_addr(&args.admin)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let body = rt.block_on(fetch_raw(admin, TIMEOUT)).map_err(|e| {
        if e.is::<Unreachable>() {
            anyhow::anyhow!(
                "{e}\nIs tern-proxy running, with its admin endpoint (tern-proxy --admin) on \
                 {admin}? Name another one with `ternctl circuits --admin HOST:PORT`."
            )
        } else {
            e
        }
    })?;
    let circuits = if args.json {
        None
    } else {
        Some(parse(&body).with_context(|| format!("reading http://{admin}/circuits"))?)
    };
    match print(&body, circuits.as_ref()) {
        // `ternctl circuits --json | head` is fine.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        other => Ok(other.map(|()| ExitCode::SUCCESS)?),
    }
}

/// Prints the table of `circuits`, or with `None` the raw JSON `body`.
fn print(body: &[u8], circuits: Option<&Circuits>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match circuits {
        None => {
            out.write_all(body)?;
            if !body.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
        }
        Some(c) => {
            let color = out.is_terminal() && std::env::var_os("NO_COLOR").is_none();
            for line in render(c, now_unix_ms(), color) {
                writeln!(out, "{line}")?;
            }
        }
    }
    out.flush()
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub const NOW: u64 = 1_795_000_012_000;

    /// A `/circuits` answer as the proxy writes it: one backend with an open endpoint, a
    /// half-open one and a healthy one, and a backend on defaults whose endpoint never
    /// tripped (null zone, reason and next probe).
    pub const SAMPLE: &str = r#"{
      "version": "3f2a9c01d4e5b677",
      "backends": [
        {
          "backend": "shop/inventory:8080",
          "policy": "shop/inventory",
          "endpoints_total": 3, "ejected": 1, "max_ejected": 1,
          "endpoints": [
            {"address": "127.0.0.1:15041", "zone": "zone-a", "state": "closed",
             "reason": "probe_succeeded", "since_unix_ms": 1794999892000,
             "next_probe_unix_ms": null, "consecutive_failures": 0, "trips": 1,
             "recent": {"success": 120, "failure": 0, "interval_seconds": 10.0}},
            {"address": "127.0.0.1:15051", "zone": "zone-b", "state": "half_open",
             "reason": "consecutive", "since_unix_ms": 1795000011500,
             "next_probe_unix_ms": null, "consecutive_failures": 3, "trips": 4,
             "recent": {"success": 80, "failure": 9, "interval_seconds": 10.0}},
            {"address": "127.0.0.1:15061", "zone": "zone-c", "state": "open",
             "reason": "probe_failed", "since_unix_ms": 1795000000000,
             "next_probe_unix_ms": 1795000014200, "consecutive_failures": 5, "trips": 2,
             "recent": {"success": 0, "failure": 5, "interval_seconds": 10.0}}
          ]
        },
        {
          "backend": "shop/catalog:8080",
          "policy": null,
          "endpoints_total": 1, "ejected": 0, "max_ejected": 0,
          "endpoints": [
            {"address": "127.0.0.1:15031", "zone": null, "state": "closed",
             "reason": null, "since_unix_ms": 1794996400000,
             "next_probe_unix_ms": null, "consecutive_failures": 0, "trips": 0,
             "recent": {"success": 40, "failure": 0, "interval_seconds": 10.0}}
          ]
        }
      ]
    }"#;

    #[test]
    fn table_from_sample() {
        let c = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(c.backends[0].backend, "shop/catalog:8080", "sorted by name");
        let lines = render(&c, NOW, false);
        let text = lines.join("\n");
        assert_eq!(lines[0], "config version 3f2a9c01d4e5b677");
        let table = [
            "  BACKEND              ENDPOINT         ZONE    STATE      REASON           SINCE      NEXT PROBE  OK/FAIL  TRIPS",
            "  shop/catalog:8080    127.0.0.1:15031  -       closed     -                1h00m ago  -           40/0     0",
            "  shop/inventory:8080  127.0.0.1:15041  zone-a  closed     probe_succeeded  2m00s ago  -           120/0    1",
            "~ shop/inventory:8080  127.0.0.1:15051  zone-b  HALF_OPEN  consecutive      0s ago     -           80/9     4",
            "! shop/inventory:8080  127.0.0.1:15061  zone-c  OPEN       probe_failed     12s ago    in 3s       0/5      2",
        ];
        assert_eq!(lines[2..7], table);
        assert!(text.contains("1 other backend on the default policy, none ejected"));
        assert!(text.contains(
            "shop/inventory:8080: 1 of 3 endpoints ejected (at most 1 at once), BackendPolicy \
             shop/inventory"
        ));
        assert!(text.contains("OK/FAIL: responses over the last 10s."));
        assert!(!text.contains('\x1b'), "no colour without a terminal");
    }

    #[test]
    fn colour_marks_open_and_half_open_rows_only() {
        let c = parse(SAMPLE.as_bytes()).unwrap();
        let lines = render(&c, NOW, true);
        let coloured: Vec<&String> = lines.iter().filter(|l| l.contains('\x1b')).collect();
        assert_eq!(coloured.len(), 2);
        assert!(coloured[0].starts_with("\x1b[33m~ ") && coloured[0].ends_with("\x1b[0m"));
        assert!(coloured[1].starts_with("\x1b[31;1m! "));
    }

    #[test]
    fn missing_and_unknown_fields_are_tolerated() {
        // An endpoint with only an address and a state, an unknown extra field, no recent.
        let c = parse(
            br#"{"version": null, "backends": [{"backend": "b", "extra": 1,
                 "endpoints": [{"address": "10.0.0.1:80", "state": "open"}]}]}"#,
        )
        .unwrap();
        let lines = render(&c, NOW, false);
        assert_eq!(lines[0], "config version (none)");
        assert_eq!(
            lines[3],
            "! b        10.0.0.1:80  -     OPEN   -       -      -           -        0"
        );
        assert!(
            lines
                .last()
                .unwrap()
                .contains("each breaker's recent window")
        );
        let empty = render(&parse(br#"{"backends": []}"#).unwrap(), NOW, false);
        assert!(empty[2].starts_with("no backends"));
        assert!(parse(b"<html>not found</html>").is_err());
    }

    #[test]
    fn relative_times() {
        assert_eq!(fmt_ago(-5), "0s ago");
        assert_eq!(fmt_ago(12_999), "12s ago");
        assert_eq!(fmt_ago(125_000), "2m05s ago");
        assert_eq!(fmt_ago(7_800_000), "2h10m ago");
        assert_eq!(fmt_ago(4 * 86_400_000), "4d ago");
        assert_eq!(fmt_in(0), "due");
        assert_eq!(fmt_in(-3000), "due");
        assert_eq!(fmt_in(1), "in 1s");
        assert_eq!(fmt_in(3000), "in 3s");
        assert_eq!(fmt_in(90_000), "in 1m30s");
    }

    #[tokio::test]
    async fn unreachable_and_old_proxies_are_errors() {
        // Nothing listens on a port we bound and closed.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = fetch_raw(addr, Duration::from_secs(2)).await.unwrap_err();
        assert!(format!("{e:#}").contains(&format!("http://{addr}/circuits")));

        // An admin endpoint without /circuits (an older proxy) answers 404.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found")
                .await;
        });
        let e = fetch_raw(addr, Duration::from_secs(2)).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("answered 404: this tern-proxy predates circuit breakers")
        );
    }
}
