//! The live table: per-route (and per-backend where a route splits) rates, success and
//! latency as the `web` sidecar sees them, what retries did, web's circuit breakers, and
//! each sidecar's config version.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::metrics::{self, Sample};
use crate::circuits::{self, Circuits, Severity};

pub const REQUESTS: &str = "tern_requests_total";
pub const DURATION: &str = "tern_request_duration_seconds";

/// Requests in a window, and how many of them succeeded (2xx/3xx).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counts {
    pub total: f64,
    pub ok: f64,
}

impl Counts {
    fn add(&mut self, total: f64, ok: f64) {
        self.total += total;
        self.ok += ok;
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub counts: Counts,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendRow {
    pub rule: String,
    pub backend: String,
    /// This backend's part of its rule's requests, 0..=1 (None without requests).
    pub share: Option<f64>,
    pub stats: Stats,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteRow {
    pub route: String,
    pub stats: Stats,
    /// One row per (rule, backend), only when the route sends to more than one.
    pub backends: Vec<BackendRow>,
}

fn is_requests(s: &Sample) -> bool {
    s.name == REQUESTS || s.name == "tern_requests"
}

fn label<'a>(s: &'a Sample, name: &str, missing: &'a str) -> &'a str {
    match s.labels.get(name).map(String::as_str) {
        Some("") | None => missing,
        Some(v) => v,
    }
}

fn is_ok(s: &Sample) -> bool {
    s.labels
        .get("status_code")
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..400).contains(&c))
}

fn stats(window: &[Sample], counts: Counts, constraints: &[(&str, &str)]) -> Stats {
    let buckets = metrics::histogram_buckets(window, DURATION, constraints);
    Stats {
        counts,
        p50: metrics::quantile(0.5, &buckets),
        p99: metrics::quantile(0.99, &buckets),
    }
}

/// Groups the request deltas of one direction by route, then by (rule, backend).
pub fn route_rows(window: &[Sample], direction: &str) -> Vec<RouteRow> {
    // route -> (rule, backend) -> counts
    let mut routes: BTreeMap<&str, BTreeMap<(&str, &str), Counts>> = BTreeMap::new();
    for s in window.iter().filter(|s| is_requests(s)) {
        if s.labels.get("direction").is_some_and(|d| d != direction) {
            continue;
        }
        let route = label(s, "route_name", "(no route)");
        let rule = label(s, "route_rule", "-");
        let backend = label(s, "backend_name", "(no backend)");
        let ok = if is_ok(s) { s.value } else { 0.0 };
        routes
            .entry(route)
            .or_default()
            .entry((rule, backend))
            .or_default()
            .add(s.value, ok);
    }
    routes
        .into_iter()
        // Routes without requests in the window (e.g. a one-off curl) would only add noise.
        .filter(|(_, parts)| parts.values().any(|c| c.total > 0.0))
        .map(|(route, parts)| {
            let mut total = Counts::default();
            let mut per_rule: BTreeMap<&str, f64> = BTreeMap::new();
            for ((rule, _), c) in &parts {
                total.add(c.total, c.ok);
                *per_rule.entry(rule).or_default() += c.total;
            }
            let route_constraints = [("direction", direction), ("route_name", route)];
            let backends = if parts.len() > 1 {
                parts
                    .iter()
                    .map(|(&(rule, backend), &c)| {
                        let rule_total = per_rule[rule];
                        BackendRow {
                            rule: rule.to_string(),
                            backend: backend.to_string(),
                            share: (rule_total > 0.0).then(|| c.total / rule_total),
                            stats: stats(
                                window,
                                c,
                                &[
                                    ("direction", direction),
                                    ("route_name", route),
                                    ("route_rule", rule),
                                    ("backend_name", backend),
                                ],
                            ),
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            RouteRow {
                route: route.to_string(),
                stats: stats(window, total, &route_constraints),
                backends,
            }
        })
        .collect()
}

/// Requests of one direction in a window, whatever their route.
pub fn direction_counts(window: &[Sample], direction: &str) -> Counts {
    let mut c = Counts::default();
    for s in window.iter().filter(|s| is_requests(s)) {
        if s.labels.get("direction").is_none_or(|d| d == direction) {
            c.add(s.value, if is_ok(s) { s.value } else { 0.0 });
        }
    }
    c
}

pub const RETRY_FATES: &str = "tern_retry_fate_total";
pub const RETRIES: &str = "tern_retries_total";

/// What retrying did for one route's requests over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryRow {
    pub route: String,
    /// Retries sent (attempts after the first).
    pub retries: f64,
    /// Requests by fate (`success_first_try`, `success_after_retry`, ...).
    pub fates: BTreeMap<String, f64>,
}

impl RetryRow {
    fn total(&self) -> f64 {
        self.fates.values().sum()
    }

    fn fate(&self, f: &str) -> f64 {
        self.fates.get(f).copied().unwrap_or(0.0)
    }
}

/// Whether `s` is the counter `name` (`..._total`), also as exported without the suffix.
fn is_counter(s: &Sample, name: &str) -> bool {
    s.name == name || Some(s.name.as_str()) == name.strip_suffix("_total")
}

/// Groups `tern_retry_fate_total` and `tern_retries_total` deltas of one direction by
/// route. Only routes with requests in the window that have a fate (a retry policy) appear.
pub fn retry_rows(window: &[Sample], direction: &str) -> Vec<RetryRow> {
    let mut rows: BTreeMap<&str, RetryRow> = BTreeMap::new();
    let row = |route: &str| RetryRow {
        route: route.to_string(),
        retries: 0.0,
        fates: BTreeMap::new(),
    };
    for s in window {
        if s.labels.get("direction").is_some_and(|d| d != direction) {
            continue;
        }
        let route = label(s, "route_name", "(no route)");
        if is_counter(s, RETRY_FATES) {
            let fate = label(s, "fate", "unknown").to_string();
            *rows
                .entry(route)
                .or_insert_with(|| row(route))
                .fates
                .entry(fate)
                .or_default() += s.value;
        } else if is_counter(s, RETRIES) {
            rows.entry(route).or_insert_with(|| row(route)).retries += s.value;
        }
    }
    rows.into_values().filter(|r| r.total() > 0.0).collect()
}

impl RetryRow {
    /// Whether retrying did anything for this route in the window: a retry was sent, or a
    /// request ended other than on its first try. (Every route has fates; most requests of
    /// a route without a retry policy succeed on their first try.)
    pub fn retried(&self) -> bool {
        self.retries > 0.0 || self.total() > self.fate("success_first_try")
    }
}

/// Web's circuit breakers at the last scrape: `Err` says why `/circuits` was not there.
pub type CircuitsView = Result<Circuits, String>;

/// What one sidecar looked like at the last scrape.
#[derive(Debug, Clone)]
pub struct SidecarView {
    pub name: String,
    /// `Err` holds why the scrape failed.
    pub version: Result<String, String>,
    /// Outbound and inbound counts over the window, if metrics could be scraped.
    pub outbound: Option<Counts>,
    pub inbound: Option<Counts>,
    /// Config updates since the sidecar started: file reloads, or pushes from tern-control.
    pub reloads: Option<Reloads>,
    pub metrics_error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reloads {
    pub applied: f64,
    pub refused: f64,
}

pub const RELOADS: &str = "tern_config_reloads_total";
/// What a sidecar in managed mode counts instead of reloads.
pub const PUSHES: &str = "tern_control_pushes_total";

/// Sums `tern_config_reloads_total` and `tern_control_pushes_total` by their `result`
/// label (`applied`, `refused`): the sidecar's config updates in either mode.
pub fn reloads(samples: &[Sample]) -> Reloads {
    let mut r = Reloads::default();
    for s in samples
        .iter()
        .filter(|s| s.name == RELOADS || s.name == PUSHES)
    {
        match s.labels.get("result").map(String::as_str) {
            Some("applied") => r.applied += s.value,
            Some("refused") => r.refused += s.value,
            _ => {}
        }
    }
    r
}

pub fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 0.001 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
    }
}

fn fmt_rate(c: &Counts, secs: f64) -> String {
    format!("{:.1}", c.total / secs)
}

fn fmt_success(c: &Counts) -> String {
    if c.total > 0.0 {
        format!("{:.1}%", 100.0 * c.ok / c.total)
    } else {
        "-".into()
    }
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Shortens a content version (a hex digest) for display, as git shortens commit ids.
pub fn short_version(v: &str) -> String {
    v.chars().take(12).collect()
}

/// Everything one redraw of the live table shows.
pub struct Page<'a> {
    pub header: &'a str,
    /// `None` until two scrapes of the web sidecar exist.
    pub routes: Option<&'a [RouteRow]>,
    /// Why web's metrics are missing.
    pub web_error: Option<&'a str>,
    pub window_secs: f64,
    pub retries: &'a [RetryRow],
    /// `None` before the first scrape.
    pub circuits: Option<&'a CircuitsView>,
    /// Unix milliseconds, for "12s ago" and "in 3s".
    pub now_ms: u64,
    /// Colour open and half-open circuits (stdout is a terminal).
    pub color: bool,
    /// How to see every circuit (`ternctl circuits --admin ...`), under the section.
    pub circuits_hint: &'a str,
    pub sidecars: &'a [SidecarView],
    pub footer: &'a [String],
}

/// The RETRIES section: per route with a retry policy, retries/s and request fates.
fn render_retries(rows: &[RetryRow], window_secs: f64, out: &mut Vec<String>) {
    if rows.is_empty() {
        return;
    }
    out.push(String::new());
    out.push(format!(
        "{:<44} {:>7} {:>10} {:>12} {:>8}",
        "RETRIES (routes that retried)", "RETRY/S", "FIRST TRY", "AFTER RETRY", "FAILED"
    ));
    for r in rows {
        let total = r.total();
        let first = r.fate("success_first_try");
        let after = r.fate("success_after_retry");
        let pct = |v: f64| format!("{:.1}%", 100.0 * v / total);
        out.push(format!(
            "{:<44} {:>7.1} {:>10} {:>12} {:>8}",
            clip(&r.route, 44),
            r.retries / window_secs,
            pct(first),
            pct(after),
            pct(total - first - after),
        ));
        let failed: Vec<String> = r
            .fates
            .iter()
            .filter(|(f, v)| **v > 0.0 && !f.starts_with("success_"))
            .map(|(f, v)| format!("{v} {f}"))
            .collect();
        if !failed.is_empty() {
            out.push(format!("  failed: {}", failed.join(", ")));
        }
    }
}

/// The CIRCUITS section, from web's `/circuits`: every endpoint of a backend that has a
/// BackendPolicy, or that has an endpoint out of rotation or tripped before; the other
/// backends are summed up in one line.
fn render_circuits(page: &Page, out: &mut Vec<String>) {
    out.push(String::new());
    let c = match page.circuits {
        None => {
            out.push("CIRCUITS: (collecting)".into());
            return;
        }
        Some(Err(e)) => {
            out.push(format!("circuits: unavailable ({})", clip(e, 90)));
            return;
        }
        Some(Ok(c)) => c,
    };
    let interesting = |b: &circuits::BackendCircuits| {
        b.policy.is_some()
            || b.ejected > 0
            || b.endpoints
                .iter()
                .any(|e| e.trips > 0 || e.severity() != Severity::Closed)
    };
    let (shown, rest): (Vec<_>, Vec<_>) = c.backends.iter().partition(|b| interesting(b));
    let title = "CIRCUITS (web)";
    let header = [
        title,
        "ZONE",
        "STATE",
        "REASON",
        "SINCE",
        "NEXT PROBE",
        "OK/FAIL",
        "TRIPS",
    ];
    let rows: Vec<circuits::Row> = shown
        .iter()
        .flat_map(|b| &b.endpoints)
        .map(|e| {
            (
                e.severity(),
                vec![
                    e.address.clone(),
                    e.zone_label().into(),
                    e.state_label(),
                    e.reason_label().into(),
                    e.since_label(page.now_ms),
                    e.next_probe_label(page.now_ms),
                    e.recent_label(),
                    e.trips.to_string(),
                ],
            )
        })
        .collect();
    let mut lines = circuits::layout(&header, &rows, page.color).into_iter();
    // Rows start with a marker column (`!`, `~`) under the title's first two characters:
    // move the header's blank marker column after the title, so it starts the line.
    let head = lines.next().unwrap_or_default();
    let rest_of_head = head.get(2 + title.len()..).unwrap_or_default();
    out.push(format!("{title}  {rest_of_head}"));
    for b in &shown {
        let policy = match &b.policy {
            Some(p) => format!("BackendPolicy {p}"),
            None => "default policy".into(),
        };
        out.push(format!(
            "{}: {} of {} ejected (at most {}), {policy}",
            b.backend, b.ejected, b.endpoints_total, b.max_ejected
        ));
        out.extend(lines.by_ref().take(b.endpoints.len()));
    }
    if shown.is_empty() {
        out.push("  (no backend has a BackendPolicy or a tripped circuit)".into());
    }
    let mut note = String::new();
    if !rest.is_empty() {
        let endpoints: usize = rest.iter().map(|b| b.endpoints.len()).sum();
        let _ = write!(
            note,
            "{} other backend{} ({endpoints} endpoint{}): all closed. ",
            rest.len(),
            if rest.len() == 1 { "" } else { "s" },
            if endpoints == 1 { "" } else { "s" },
        );
    }
    if let Some(secs) = circuits::recent_interval(c) {
        let _ = write!(note, "OK/FAIL: responses over the last {secs}s.");
    }
    out.push(note.trim_end().to_string());
    out.push(page.circuits_hint.to_string());
}

/// Renders the table lines (no trailing newlines).
pub fn render(page: &Page) -> Vec<String> {
    let (header, routes, web_error, window_secs) =
        (page.header, page.routes, page.web_error, page.window_secs);
    let mut out = vec![header.to_string(), String::new()];
    let mut line = String::new();
    let _ = write!(
        line,
        "{:<44} {:>7} {:>8} {:>9} {:>9}",
        "ROUTE (as web's sidecar sees it)", "REQ/S", "SUCCESS", "P50", "P99"
    );
    out.push(line);
    match (routes, web_error) {
        (_, Some(err)) => out.push(format!("  web sidecar scrape failed: {}", clip(err, 60))),
        (None, None) => out.push("  (collecting: rates appear after two scrapes)".into()),
        (Some([]), None) => out.push("  (no requests yet)".into()),
        (Some(rows), None) => {
            for r in rows {
                out.push(format!(
                    "{:<44} {:>7} {:>8} {:>9} {:>9}",
                    clip(&r.route, 44),
                    fmt_rate(&r.stats.counts, window_secs),
                    fmt_success(&r.stats.counts),
                    fmt_secs(r.stats.p50),
                    fmt_secs(r.stats.p99),
                ));
                for b in &r.backends {
                    let share = b
                        .share
                        .map(|s| format!("{:>3.0}%", 100.0 * s))
                        .unwrap_or_else(|| "   -".into());
                    let name = format!("  rule {} {share} -> {}", b.rule, b.backend);
                    out.push(format!(
                        "{:<44} {:>7} {:>8} {:>9} {:>9}",
                        clip(&name, 44),
                        fmt_rate(&b.stats.counts, window_secs),
                        fmt_success(&b.stats.counts),
                        fmt_secs(b.stats.p50),
                        fmt_secs(b.stats.p99),
                    ));
                }
            }
        }
    }
    render_retries(page.retries, window_secs, &mut out);
    render_circuits(page, &mut out);
    out.push(String::new());
    out.push(format!(
        "{:<14} {:<15} {:<19} {:>9} {:>9} {:>8}",
        "SIDECAR", "CONFIG VERSION", "CONFIG UPDATES", "OUT REQ/S", "IN REQ/S", "IN OK"
    ));
    for s in page.sidecars {
        let version = match &s.version {
            Ok(v) => short_version(v),
            Err(_) => "(unreachable)".into(),
        };
        let rate = |c: &Option<Counts>| match c {
            Some(c) => fmt_rate(c, window_secs),
            None => "-".into(),
        };
        let reloads = match s.reloads {
            Some(r) if r.refused > 0.0 => format!("{} ok, {} refused", r.applied, r.refused),
            Some(r) => format!("{} ok", r.applied),
            None => "-".into(),
        };
        let mut line = format!(
            "{:<14} {:<15} {:<19} {:>9} {:>9} {:>8}",
            s.name,
            version,
            reloads,
            rate(&s.outbound),
            rate(&s.inbound),
            s.inbound
                .as_ref()
                .map(fmt_success)
                .unwrap_or_else(|| "-".into()),
        );
        if let Some(err) = s.metrics_error.as_ref().or(s.version.as_ref().err()) {
            let _ = write!(line, "  scrape failed: {}", clip(err, 40));
        }
        out.push(line);
    }
    out.push(String::new());
    out.extend(page.footer.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::metrics::Labels;

    fn req(route: &str, rule: &str, backend: &str, status: &str, v: f64) -> Sample {
        let labels: Labels = [
            ("direction", "outbound"),
            ("parent_name", "shop/checkout:8080"),
            ("route_name", route),
            ("route_rule", rule),
            ("backend_name", backend),
            ("status_code", status),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Sample {
            name: REQUESTS.into(),
            labels,
            value: v,
        }
    }

    #[test]
    fn rows_group_by_route_rule_backend() {
        let mut w = vec![
            req(
                "shop/checkout-split",
                "0",
                "shop/checkout-v2:8080",
                "200",
                10.0,
            ),
            req(
                "shop/checkout-split",
                "1",
                "shop/checkout-v1:8080",
                "200",
                80.0,
            ),
            req(
                "shop/checkout-split",
                "1",
                "shop/checkout-v1:8080",
                "500",
                10.0,
            ),
            req(
                "shop/checkout-split",
                "1",
                "shop/checkout-v2:8080",
                "200",
                10.0,
            ),
            req("shop/catalog", "0", "shop/catalog:8080", "200", 40.0),
        ];
        let mut inbound = req("x", "0", "y", "200", 1000.0);
        inbound.labels.insert("direction".into(), "inbound".into());
        w.push(inbound);
        let rows = route_rows(&w, "outbound");
        assert_eq!(rows.len(), 2);
        let catalog = &rows[0];
        assert_eq!(catalog.route, "shop/catalog");
        assert!(catalog.backends.is_empty());
        assert_eq!(
            catalog.stats.counts,
            Counts {
                total: 40.0,
                ok: 40.0
            }
        );
        let split = &rows[1];
        assert_eq!(
            split.stats.counts,
            Counts {
                total: 110.0,
                ok: 100.0
            }
        );
        assert_eq!(split.backends.len(), 3);
        let v1 = &split.backends[1];
        assert_eq!(
            (v1.rule.as_str(), v1.backend.as_str()),
            ("1", "shop/checkout-v1:8080")
        );
        assert_eq!(v1.share, Some(0.9));
        assert_eq!(split.backends[0].share, Some(1.0));
        assert_eq!(direction_counts(&w, "inbound").total, 1000.0);
        let lines = render(&page(Some(&rows), &[], None));
        assert!(
            lines
                .iter()
                .any(|l| l.contains("rule 1  90% -> shop/checkout-v1:8080"))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("shop/catalog") && l.contains("8.0"))
        );
    }

    fn page<'a>(
        routes: Option<&'a [RouteRow]>,
        retries: &'a [RetryRow],
        circuits: Option<&'a CircuitsView>,
    ) -> Page<'a> {
        Page {
            header: "h",
            routes,
            web_error: None,
            window_secs: 5.0,
            retries,
            circuits,
            now_ms: crate::circuits::tests::NOW,
            color: false,
            circuits_hint: "All: ternctl circuits --admin 127.0.0.1:15002",
            sidecars: &[],
            footer: &[],
        }
    }

    fn counter(name: &str, pairs: &[(&str, &str)], v: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value: v,
        }
    }

    #[test]
    fn retry_fates_per_route() {
        let fate = |route: &str, fate: &str, v: f64| {
            counter(
                RETRY_FATES,
                &[
                    ("direction", "outbound"),
                    ("route_name", route),
                    ("route_rule", "0"),
                    ("backend_name", "shop/inventory:8080"),
                    ("fate", fate),
                ],
                v,
            )
        };
        let w = vec![
            fate("shop/inventory", "success_first_try", 60.0),
            fate("shop/inventory", "success_after_retry", 15.0),
            fate("shop/inventory", "retries_exhausted", 3.0),
            fate("shop/inventory", "budget_exhausted", 2.0),
            fate("shop/inventory", "timed_out", 0.0),
            counter(
                "tern_retries",
                &[("direction", "outbound"), ("route_name", "shop/inventory")],
                20.0,
            ),
            // A route whose fates had no requests in the window is left out.
            fate("shop/idle", "success_first_try", 0.0),
        ];
        let rows = retry_rows(&w, "outbound");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].retries, 20.0);
        assert_eq!(rows[0].total(), 80.0);
        let lines = render(&page(None, &rows, None));
        let text = lines.join("\n");
        assert!(text.contains(
            "shop/inventory                                   4.0      75.0%        18.8%     6.2%"
        ));
        assert!(rows[0].retried());
        assert!(text.contains("  failed: 2 budget_exhausted, 3 retries_exhausted"));
        // No fates at all (no retry policy, or an older proxy): no section.
        let lines = render(&page(None, &[], None));
        assert!(!lines.iter().any(|l| l.starts_with("RETRIES")));
    }

    #[test]
    fn routes_that_did_not_retry() {
        let row = |first: f64, after: f64, retries: f64| RetryRow {
            route: "r".into(),
            retries,
            fates: [
                ("success_first_try".to_string(), first),
                ("success_after_retry".to_string(), after),
            ]
            .into(),
        };
        assert!(!row(10.0, 0.0, 0.0).retried());
        assert!(row(10.0, 1.0, 0.0).retried());
        assert!(row(10.0, 0.0, 1.0).retried());
    }

    #[test]
    fn circuits_section() {
        let c = crate::circuits::parse(crate::circuits::tests::SAMPLE.as_bytes()).unwrap();
        let view: CircuitsView = Ok(c);
        let lines = render(&page(None, &[], Some(&view)));
        let at = lines
            .iter()
            .position(|l| l.starts_with("CIRCUITS"))
            .unwrap();
        assert_eq!(
            lines[at..at + 7],
            [
                "CIRCUITS (web)     ZONE    STATE      REASON           SINCE      NEXT PROBE  OK/FAIL  TRIPS",
                "shop/inventory:8080: 1 of 3 ejected (at most 1), BackendPolicy shop/inventory",
                "  127.0.0.1:15041  zone-a  closed     probe_succeeded  2m00s ago  -           120/0    1",
                "~ 127.0.0.1:15051  zone-b  HALF_OPEN  consecutive      0s ago     -           80/9     4",
                "! 127.0.0.1:15061  zone-c  OPEN       probe_failed     12s ago    in 3s       0/5      2",
                "1 other backend (1 endpoint): all closed. OK/FAIL: responses over the last 10s.",
                "All: ternctl circuits --admin 127.0.0.1:15002",
            ]
        );
        // A proxy without /circuits: one line says so, the rest of the table still renders.
        let missing: CircuitsView = Err("http://127.0.0.1:15002/circuits answered 404".into());
        let lines = render(&page(None, &[], Some(&missing)));
        assert!(lines.contains(
            &"circuits: unavailable (http://127.0.0.1:15002/circuits answered 404)".to_string()
        ));
        assert!(lines.iter().any(|l| l.starts_with("SIDECAR")));
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_secs(None), "-");
        assert_eq!(fmt_secs(Some(0.0004)), "400µs");
        assert_eq!(fmt_secs(Some(0.0123)), "12.3ms");
        assert_eq!(fmt_secs(Some(2.5)), "2.50s");
    }
}
