//! Prometheus text parsing, counter deltas and histogram quantiles for the live summary.
//!
//! Labels are handled generically, by name: nothing here depends on label order or on the
//! exact label set the proxy exports beyond the names the summary groups by.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

pub type Labels = BTreeMap<String, String>;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

/// Parses the Prometheus (or OpenMetrics) text exposition format. Comment lines and lines
/// that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(r) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(r)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value: parse_value(value)?,
    })
}

/// Parses `a="x",b="y"}` (the opening brace already consumed); returns the rest after `}`.
fn parse_labels(mut s: &str) -> Option<(Labels, &str)> {
    let mut labels = Labels::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// The counter increase of every series between two scrapes. A series absent from `old`
/// counts from zero; a series that went down (the process restarted) counts from zero too.
pub fn deltas(old: &[Sample], new: &[Sample]) -> Vec<Sample> {
    let before: HashMap<(&str, &Labels), f64> = old
        .iter()
        .map(|s| ((s.name.as_str(), &s.labels), s.value))
        .collect();
    new.iter()
        .map(|s| {
            let prev = before
                .get(&(s.name.as_str(), &s.labels))
                .copied()
                .unwrap_or(0.0);
            let value = if s.value >= prev {
                s.value - prev
            } else {
                s.value
            };
            Sample { value, ..s.clone() }
        })
        .collect()
}

/// Whether `labels` satisfies every constraint whose label it has. Constraints on labels the
/// series does not carry are ignored, so a histogram without `route_rule` still matches a
/// row that is split by rule.
pub fn matches_where_present(labels: &Labels, constraints: &[(&str, &str)]) -> bool {
    constraints
        .iter()
        .all(|(k, v)| labels.get(*k).is_none_or(|actual| actual == v))
}

/// Sums the `<name>_bucket` series matching `constraints` into cumulative (le, count)
/// buckets sorted by bound.
pub fn histogram_buckets(
    samples: &[Sample],
    name: &str,
    constraints: &[(&str, &str)],
) -> Vec<(f64, f64)> {
    let bucket_name = format!("{name}_bucket");
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for s in samples {
        if s.name != bucket_name || !matches_where_present(&s.labels, constraints) {
            continue;
        }
        let Some(le) = s.labels.get("le").and_then(|v| parse_value(v)) else {
            continue;
        };
        match by_le.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += s.value,
            None => by_le.push((le, s.value)),
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
}

/// The `q` quantile (0..=1) of cumulative histogram buckets, by linear interpolation inside
/// the bucket that holds the rank (as Prometheus' `histogram_quantile`). The lowest bucket
/// starts at 0. If the rank falls in the `+Inf` bucket, the highest finite bound is returned.
/// `None` when the histogram is empty.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for &(le, count) in buckets {
        if count >= rank && count > lower_count {
            if le.is_infinite() {
                return Some(lower_bound);
            }
            let fraction = (rank - lower_count) / (count - lower_count);
            return Some(lower_bound + (le - lower_bound) * fraction);
        }
        if le.is_finite() {
            lower_bound = le;
        }
        lower_count = count;
    }
    Some(lower_bound)
}

/// Scrapes kept for one sidecar, to compute rates over a sliding window.
#[derive(Debug, Default)]
pub struct History {
    scrapes: VecDeque<(Instant, Vec<Sample>)>,
}

impl History {
    /// Records a scrape and drops those older than needed for `window` scrapes of history.
    pub fn push(&mut self, at: Instant, samples: Vec<Sample>, window: usize) {
        self.scrapes.push_back((at, samples));
        while self.scrapes.len() > window + 1 {
            self.scrapes.pop_front();
        }
    }

    /// Deltas between the oldest and newest kept scrape, and the seconds between them.
    /// With one scrape only, there is nothing to compare yet.
    pub fn window(&self) -> Option<(Vec<Sample>, f64)> {
        let (t0, first) = self.scrapes.front()?;
        let (t1, last) = self.scrapes.back()?;
        let secs = t1.duration_since(*t0).as_secs_f64();
        (self.scrapes.len() > 1 && secs > 0.0).then(|| (deltas(first, last), secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_prometheus_text() {
        let text = r#"
# HELP tern_requests Requests.
# TYPE tern_requests counter
tern_requests_total{direction="outbound",route_name="shop/checkout-split",route_rule="1",backend_name="shop/checkout-v1:8080",status_code="200"} 42
tern_requests_total{status_code="503", direction = "outbound" ,route_name="a\"b\\c\nd"} 7 1700000000000
tern_request_duration_seconds_bucket{direction="outbound",le="+Inf"} 3
tern_up 1
tern_request_duration_seconds_sum{} 1.5e-3
garbage{x="unterminated} 1
# EOF
"#;
        let s = parse(text);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "tern_requests_total");
        assert_eq!(s[0].labels["backend_name"], "shop/checkout-v1:8080");
        assert_eq!(s[0].labels["route_rule"], "1");
        assert_eq!(s[0].value, 42.0);
        assert_eq!(s[1].labels["route_name"], "a\"b\\c\nd");
        assert_eq!(s[1].labels["direction"], "outbound");
        assert_eq!(s[1].value, 7.0);
        assert_eq!(s[2].labels["le"], "+Inf");
        assert_eq!(
            s[3],
            Sample {
                name: "tern_up".into(),
                labels: Labels::new(),
                value: 1.0
            }
        );
        assert_eq!(s[4].value, 0.0015);
    }

    #[test]
    fn deltas_handle_new_series_and_resets() {
        let a = |v: f64, st: &str| Sample {
            name: "c".into(),
            labels: labels(&[("s", st)]),
            value: v,
        };
        let old = vec![a(10.0, "200"), a(5.0, "500")];
        let new = vec![a(15.0, "200"), a(2.0, "500"), a(4.0, "404")];
        let d = deltas(&old, &new);
        assert_eq!(
            d.iter().map(|s| s.value).collect::<Vec<_>>(),
            [5.0, 2.0, 4.0]
        );
    }

    #[test]
    fn quantile_interpolates_inside_buckets() {
        // 100 observations: 50 in (0, 0.01], 40 in (0.01, 0.1], 10 in (0.1, 1].
        let b = [
            (0.01, 50.0),
            (0.1, 90.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-12);
        assert!((quantile(0.25, &b).unwrap() - 0.005).abs() < 1e-12);
        // rank 70 is 20/40 of the way through (0.01, 0.1].
        assert!((quantile(0.7, &b).unwrap() - 0.055).abs() < 1e-12);
        // rank 99 is 9/10 of the way through (0.1, 1].
        assert!((quantile(0.99, &b).unwrap() - 0.91).abs() < 1e-12);
        assert_eq!(quantile(0.5, &[]), None);
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
    }

    #[test]
    fn quantile_in_inf_bucket_is_highest_bound() {
        let b = [(0.1, 1.0), (0.5, 2.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, &b), Some(0.5));
        // Empty leading buckets are skipped, not interpolated over.
        let b = [
            (0.001, 0.0),
            (0.002, 0.0),
            (0.004, 4.0),
            (f64::INFINITY, 4.0),
        ];
        assert!((quantile(0.5, &b).unwrap() - 0.003).abs() < 1e-12);
    }

    #[test]
    fn buckets_sum_matching_series_by_le() {
        let bucket = |route: &str, backend: &str, le: &str, v: f64| Sample {
            name: "h_bucket".into(),
            labels: labels(&[("route_name", route), ("backend_name", backend), ("le", le)]),
            value: v,
        };
        let samples = vec![
            bucket("r", "a", "0.1", 1.0),
            bucket("r", "a", "+Inf", 2.0),
            bucket("r", "b", "0.1", 3.0),
            bucket("r", "b", "+Inf", 3.0),
            bucket("other", "a", "0.1", 100.0),
            bucket("other", "a", "+Inf", 100.0),
        ];
        // route_rule is not a label of these series, so that constraint is ignored.
        let all = histogram_buckets(&samples, "h", &[("route_name", "r"), ("route_rule", "1")]);
        assert_eq!(all, vec![(0.1, 4.0), (f64::INFINITY, 5.0)]);
        let a = histogram_buckets(&samples, "h", &[("route_name", "r"), ("backend_name", "a")]);
        assert_eq!(a, vec![(0.1, 1.0), (f64::INFINITY, 2.0)]);
    }

    #[test]
    fn history_window() {
        let s = |v: f64| {
            vec![Sample {
                name: "c".into(),
                labels: Labels::new(),
                value: v,
            }]
        };
        let t = Instant::now();
        let mut h = History::default();
        h.push(t, s(1.0), 2);
        assert!(h.window().is_none());
        h.push(t + std::time::Duration::from_secs(1), s(3.0), 2);
        h.push(t + std::time::Duration::from_secs(2), s(6.0), 2);
        h.push(t + std::time::Duration::from_secs(3), s(10.0), 2);
        let (d, secs) = h.window().unwrap();
        assert_eq!(d[0].value, 7.0);
        assert_eq!(secs, 2.0);
    }
}
