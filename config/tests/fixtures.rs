//! Fixture directories: a broken one whose diagnostics must match
//! `fixtures/broken.expected` line for line, and a valid one that compiles cleanly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tern_config::identity::SpiffeId;
use tern_config::snapshot::{Algorithm, Authorization, Decision, HashKey, MtlsMode, authorize};
use tern_config::{ConfigError, load_dir};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn broken_fixture_diagnostics_match_exactly() {
    let err = load_dir(&fixture("broken")).expect_err("broken fixture must not load");
    let ConfigError::Invalid { diagnostics } = err else {
        panic!("expected Invalid, got {err}");
    };
    let got: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    let expected_text = std::fs::read_to_string(fixture("broken.expected")).unwrap();
    let expected: Vec<&str> = expected_text.lines().filter(|l| !l.is_empty()).collect();
    if std::env::var_os("TERN_BLESS").is_some() {
        std::fs::write(fixture("broken.expected"), got.join("\n") + "\n").unwrap();
        return;
    }
    assert_eq!(got, expected, "\nactual:\n{}", got.join("\n"));
}

#[test]
fn valid_fixture_compiles_cleanly() {
    let compiled = match load_dir(&fixture("valid")) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
    let snap = &compiled.snapshot;
    assert_eq!(snap.services.len(), 3);
    let http = snap
        .resolve("checkout.shop.svc.cluster.local", Some(8080), "default")
        .unwrap();
    assert_eq!(http.http.len(), 3);
    assert!(http.default_rule.is_none());
    let grpc = snap.resolve("checkout", Some(9090), "shop").unwrap();
    assert_eq!(grpc.grpc.len(), 1);
    assert_eq!(snap.json["version"], snap.version.as_str());

    // Retry: the annotated HTTPRoute's rule with `retry`, and the GRPCRoute extension.
    let rule = |i: usize| {
        &http
            .http
            .iter()
            .find(|h| h.rule.rule_index == i)
            .unwrap()
            .rule
    };
    let retry = rule(1).retry.as_ref().expect("rule 1 has retry");
    assert_eq!(
        (
            retry.attempts,
            retry.backoff,
            &retry.codes[..],
            retry.non_idempotent
        ),
        (3, Duration::from_millis(50), &[502, 503][..], true)
    );
    assert!(rule(0).retry.is_none());
    let retry = grpc.grpc[0]
        .rule
        .retry
        .as_ref()
        .expect("grpc rule has retry");
    assert_eq!(retry.grpc_codes, [4, 8, 14]);
    assert!(retry.codes.is_empty() && retry.non_idempotent);

    // BackendPolicy: service-wide on checkout-v2, its grpc port overridden by sectionName.
    let backend = |name: &str| {
        snap.backends
            .iter()
            .find(|b| &*b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    };
    let v2_http = &backend("shop/checkout-v2:8080").policy;
    assert_eq!(
        v2_http.source.as_ref().unwrap().to_string(),
        "shop/checkout-v2"
    );
    assert_eq!(v2_http.limits.max_pending_requests, 256);
    assert_eq!(
        v2_http.circuit_breaker.ejection.max,
        Duration::from_secs(120)
    );
    let v2_grpc = &backend("shop/checkout-v2:9090").policy;
    assert_eq!(
        v2_grpc.source.as_ref().unwrap().to_string(),
        "shop/checkout-v2-grpc"
    );
    assert_eq!(v2_grpc.circuit_breaker.consecutive_failures, Some(3));
    assert_eq!(v2_grpc.limits, Default::default());
    assert!(backend("shop/checkout-v1:8080").policy.source.is_none());

    // Load balancing and backpressure on checkout-v2's HTTP port (its gRPC port's policy
    // leaves them out: the defaults).
    assert_eq!(v2_http.load_balancer.algorithm, Algorithm::RingHash);
    assert_eq!(
        v2_http.load_balancer.hash,
        Some(HashKey::Header(http::HeaderName::from_static("x-user")))
    );
    let c = v2_http.concurrency.as_ref().expect("a concurrency limit");
    assert_eq!((c.max_concurrent, c.max_queue), (100, 100));
    assert_eq!(
        c.adaptive.map(|a| (a.min_limit, a.max_limit)),
        Some((1, 1000))
    );
    assert_eq!(v2_grpc.load_balancer, Default::default());
    assert!(v2_grpc.concurrency.is_none());

    // RateLimitPolicy: checkout's HTTP port and the GRPCRoute's rule share one limit.
    let limit = http.rate_limit.as_ref().expect("http port is rate limited");
    assert_eq!(limit.source.to_string(), "shop/api-limit");
    assert_eq!((limit.requests, limit.burst), (100, 20));
    assert!(Arc::ptr_eq(
        limit,
        grpc.grpc[0].rule.rate_limit.as_ref().unwrap()
    ));
    assert!(grpc.rate_limit.is_none());
    assert!(http.http.iter().all(|h| h.rule.rate_limit.is_none()));

    // ConcurrencyPolicy: every rule of the split.
    for h in &http.http {
        let c = h
            .rule
            .concurrency
            .as_ref()
            .expect("split rules are limited");
        assert_eq!((c.max_concurrent, c.max_queue), (50, 10));
        assert_eq!(c.queue_timeout, Duration::from_millis(500));
    }
    assert!(grpc.grpc[0].rule.concurrency.is_none());
    assert_eq!(
        snap.json["services"][0]["ports"][0]["rateLimit"]["source"],
        "shop/api-limit"
    );

    // AuthorizationPolicy: both of checkout's ports, its HTTP port by sectionName too, and
    // the GRPCRoute's rule; the split's rules have none of their own.
    let names = |a: &Option<Arc<Authorization>>| {
        a.as_ref().map(|a| {
            a.policies
                .iter()
                .map(|p| p.name.to_string())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(
        names(&http.authorization).unwrap(),
        ["shop/checkout-callers", "shop/checkout-http-probes"]
    );
    assert_eq!(
        names(&grpc.authorization).unwrap(),
        ["shop/checkout-callers"]
    );
    assert_eq!(
        names(&grpc.grpc[0].rule.authorization).unwrap(),
        ["shop/checkout-grpc-meshed"]
    );
    assert!(http.http.iter().all(|h| h.rule.authorization.is_none()));
    let ops = SpiffeId::parse("spiffe://cluster.local/ns/ops/sa/deployer").unwrap();
    let batch = SpiffeId::parse("spiffe://cluster.local/ns/batch/sa/job").unwrap();
    let svc = grpc.authorization.as_deref();
    let rule = grpc.grpc[0].rule.authorization.as_deref();
    let allowed_by = |d: Decision| match d {
        Decision::Allowed(p) => p.name.to_string(),
        other => format!("{other:?}"),
    };
    // The route's policy is asked first; the Service's apply too.
    assert_eq!(
        allowed_by(authorize(svc, rule, Some(&batch))),
        "shop/checkout-grpc-meshed"
    );
    assert_eq!(
        allowed_by(authorize(svc, rule, Some(&ops))),
        "shop/checkout-grpc-meshed"
    );
    assert_eq!(authorize(svc, rule, None), Decision::Denied);
    let svc = http.authorization.as_deref();
    assert_eq!(
        allowed_by(authorize(svc, None, Some(&ops))),
        "shop/checkout-callers"
    );
    assert_eq!(
        allowed_by(authorize(svc, None, None)),
        "shop/checkout-http-probes"
    );
    assert_eq!(authorize(None, None, Some(&batch)), Decision::Unrestricted);

    // mTLS mode, clusterIP, endpoint identities.
    assert_eq!((http.mtls, grpc.mtls), (MtlsMode::Strict, MtlsMode::Strict));
    let v2 = snap.resolve("checkout-v2", Some(8080), "shop").unwrap();
    assert_eq!(v2.mtls, MtlsMode::Permissive);
    let at = |a: &str| {
        snap.resolve_addr(a.parse().unwrap())
            .map(|sp| (sp.service.name.clone(), sp.port))
    };
    assert_eq!(at("10.96.0.10:9090"), Some(("checkout".into(), 9090)));
    assert_eq!(at("10.2.0.1:9090"), Some(("checkout-v2".into(), 9090)));
    assert_eq!(at("10.1.0.2:8080"), Some(("checkout-v1".into(), 8080)));
    assert_eq!(at("10.96.0.10:1"), None);
    let identity = backend("shop/checkout-v2:8080").endpoints[0]
        .identity
        .clone()
        .unwrap();
    assert_eq!(
        (
            identity.namespace.as_str(),
            identity.service_account.as_str()
        ),
        ("shop", "checkout")
    );
    assert!(
        backend("shop/checkout-v1:8080")
            .endpoints
            .iter()
            .all(|e| e.identity.is_none())
    );
}

#[test]
fn empty_dir_is_an_empty_snapshot() {
    let dir = std::env::temp_dir().join(format!("tern-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let compiled = load_dir(&dir).unwrap();
    assert!(compiled.snapshot.services.is_empty());
    assert!(compiled.warnings.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_dir_is_an_io_error() {
    let err = load_dir(&fixture("does-not-exist")).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }), "{err}");
}
