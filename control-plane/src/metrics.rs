//! The control plane's Prometheus metrics.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sidecars_connected: Gauge,
    pub pushes: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub change_to_ack: Histogram,
    reloads: Family<Labels, Counter>,
    pub rejected_streams: Counter,
    pub certificates_issued: Counter,
    certify_refusals: Family<Labels, Counter>,
    ca_reloads: Family<Labels, Counter>,
    tls_handshakes: Family<Labels, Counter>,
    /// The current issuer's not_after, seconds since the Unix epoch (0: no CA).
    pub issuer_not_after: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tern_control");
        let sidecars_connected = Gauge::default();
        let pushes = Counter::default();
        let acks = Counter::default();
        let nacks = Counter::default();
        let change_to_ack = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0,
        ]);
        let reloads = Family::<Labels, Counter>::default();
        let rejected_streams = Counter::default();
        let certificates_issued = Counter::default();
        let certify_refusals = Family::<Labels, Counter>::default();
        let ca_reloads = Family::<Labels, Counter>::default();
        let issuer_not_after = Gauge::default();
        let tls_handshakes = Family::<Labels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the gRPC listener (--serve-tls), by result (ok, failed, timeout)",
            tls_handshakes.clone(),
        );
        registry.register(
            "sidecars_connected",
            "Sidecars with an open stream",
            sidecars_connected.clone(),
        );
        registry.register("pushes", "Config pushes sent", pushes.clone());
        registry.register("acks", "ACKs received", acks.clone());
        registry.register("nacks", "NACKs received", nacks.clone());
        registry.register(
            "change_to_ack_seconds",
            "From a config change being seen to a sidecar's ACK of a version containing it",
            change_to_ack.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result (ok, error)",
            reloads.clone(),
        );
        registry.register(
            "streams_rejected",
            "New streams refused by the admission rate limit",
            rejected_streams.clone(),
        );
        registry.register(
            "certificates_issued",
            "Sidecar certificates signed",
            certificates_issued.clone(),
        );
        registry.register(
            "certify_refusals",
            "Certify requests refused, by reason (unauthenticated, permission_denied, no_ca, bad_csr, ca_error, unavailable)",
            certify_refusals.clone(),
        );
        registry.register(
            "ca_reloads",
            "CA directory reloads by result (ok, error)",
            ca_reloads.clone(),
        );
        registry.register(
            "issuer_not_after_seconds",
            "Expiry of the current issuer certificate, seconds since the Unix epoch (0: no CA)",
            issuer_not_after.clone(),
        );
        Metrics {
            registry,
            sidecars_connected,
            pushes,
            acks,
            nacks,
            change_to_ack,
            reloads,
            rejected_streams,
            certificates_issued,
            certify_refusals,
            ca_reloads,
            tls_handshakes,
            issuer_not_after,
        }
    }

    pub fn reload(&self, ok: bool) {
        inc(&self.reloads, "result", if ok { "ok" } else { "error" });
    }

    pub fn ca_reload(&self, ok: bool) {
        inc(&self.ca_reloads, "result", if ok { "ok" } else { "error" });
    }

    /// One TLS handshake on the gRPC listener: `ok`, `failed` or `timeout`.
    pub fn tls_handshake(&self, result: &str) {
        inc(&self.tls_handshakes, "result", result);
    }

    /// A refused Certify, by reason.
    pub fn certify_refused(&self, reason: &str) {
        inc(&self.certify_refusals, "reason", reason);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn inc(family: &Family<Labels, Counter>, label: &str, value: &str) {
    family
        .get_or_create(&vec![(label.to_string(), value.to_string())])
        .inc();
}
