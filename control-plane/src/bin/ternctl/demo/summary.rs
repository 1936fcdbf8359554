//! The live table: per-route (and per-backend where a route splits) rates, success and
//! latency as the `web` sidecar sees them, plus each sidecar's config version.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::metrics::{self, Sample};

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

/// What one sidecar looked like at the last scrape.
#[derive(Debug, Clone)]
pub struct SidecarView {
    pub name: String,
    /// `Err` holds why the scrape failed.
    pub version: Result<String, String>,
    /// Outbound and inbound counts over the window, if metrics could be scraped.
    pub outbound: Option<Counts>,
    pub inbound: Option<Counts>,
    /// Config reloads since the sidecar started.
    pub reloads: Option<Reloads>,
    pub metrics_error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reloads {
    pub applied: f64,
    pub refused: f64,
}

pub const RELOADS: &str = "tern_config_reloads_total";

/// Sums `tern_config_reloads_total` by its `result` label (`applied`, `refused`).
pub fn reloads(samples: &[Sample]) -> Reloads {
    let mut r = Reloads::default();
    for s in samples.iter().filter(|s| s.name == RELOADS) {
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

/// Renders the table lines (no trailing newlines). `routes` is `None` until two scrapes
/// of the web sidecar exist; `web_error` says why web's metrics are missing.
pub fn render(
    header: &str,
    routes: Option<&[RouteRow]>,
    web_error: Option<&str>,
    window_secs: f64,
    sidecars: &[SidecarView],
    footer: &[String],
) -> Vec<String> {
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
    out.push(String::new());
    out.push(format!(
        "{:<14} {:<15} {:<19} {:>9} {:>9} {:>8}",
        "SIDECAR", "CONFIG VERSION", "RELOADS", "OUT REQ/S", "IN REQ/S", "IN OK"
    ));
    for s in sidecars {
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
    out.extend(footer.iter().cloned());
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
        let lines = render("h", Some(&rows), None, 5.0, &[], &[]);
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

    #[test]
    fn durations() {
        assert_eq!(fmt_secs(None), "-");
        assert_eq!(fmt_secs(Some(0.0004)), "400µs");
        assert_eq!(fmt_secs(Some(0.0123)), "12.3ms");
        assert_eq!(fmt_secs(Some(2.5)), "2.50s");
    }
}
