//! Rate limiting (RateLimitPolicy): token buckets (GCRA, the governor crate) shared by
//! every connection and worker of the sidecar, enforced by the server's inbound sidecar.
//!
//! One limiter per policy, keyed by what the policy says a bucket is per: everything,
//! the route rule, the caller, or a header value. Keys are 64-bit hashes (no allocation
//! per request), and the number of tracked keys is bounded: beyond `MAX_KEYS`, buckets
//! that are full again (indistinguishable from new ones) are dropped.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use rustc_hash::FxHashMap;
use tern_config::snapshot::{ObjectRef, RateLimit, RateLimitKey, Rule};

use crate::balance::hash::key_hash;
use crate::metrics::Metrics;

/// Keys tracked per policy before idle ones are dropped.
pub const MAX_KEYS: usize = 10_000;

type Keyed = RateLimiter<u64, DefaultKeyedStateStore<u64>, DefaultClock>;
type Single = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// How many checks pass between two counts of a keyed limiter's keys (counting locks
/// every shard of its map).
const COUNT_KEYS_EVERY: u32 = 64;

enum Limiter {
    /// One bucket for everything (`key: all`): no map to look the bucket up in.
    Single(Single),
    Keyed {
        limiter: Keyed,
        checks: AtomicU32,
    },
}

pub struct Bucket {
    pub config: Arc<RateLimit>,
    limiter: Limiter,
    /// `RateLimit-Policy` (IETF draft-ietf-httpapi-ratelimit-headers).
    policy_header: HeaderValue,
    /// The policy's `namespace/name`, for errors and metric labels.
    pub name: Arc<str>,
    /// `tern_rate_limit` counters (allowed, limited) by route name, resolved once each:
    /// resolving a label set per request cost more than the check.
    counters: Mutex<FxHashMap<Arc<str>, [Counter; 2]>>,
}

impl Bucket {
    pub fn new(config: Arc<RateLimit>) -> Self {
        let requests = NonZeroU32::new(config.requests.max(1)).unwrap_or(NonZeroU32::MIN);
        let period = config.per.max(Duration::from_micros(1)) / requests.get();
        // The bucket holds `burst` requests, or one period's worth when burst is 0.
        let burst = NonZeroU32::new(config.burst).unwrap_or(requests);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(requests))
            .allow_burst(burst);
        let name: Arc<str> = config.source.to_string().into();
        let policy_header = HeaderValue::from_str(&format!(
            "\"{}\";q={};w={}",
            config.source.name,
            config.requests,
            config.per.as_secs().max(1)
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("\"default\""));
        let limiter = match config.key {
            RateLimitKey::All => Limiter::Single(RateLimiter::direct(quota)),
            _ => Limiter::Keyed {
                limiter: RateLimiter::keyed(quota),
                checks: AtomicU32::new(0),
            },
        };
        Bucket {
            limiter,
            config,
            policy_header,
            name,
            counters: Mutex::default(),
        }
    }

    /// Counts a decision on `route` (empty: no route rule) in `tern_rate_limit`.
    pub fn count(&self, metrics: &Metrics, route: &Arc<str>, limited: bool) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let pair = match counters.get(route) {
            Some(pair) => pair,
            None => counters
                .entry(route.clone())
                .or_insert_with(|| metrics.rate_limit(&self.name, route, self.key_kind())),
        };
        pair[usize::from(limited)].inc();
    }

    pub fn key_kind(&self) -> &'static str {
        match self.config.key {
            RateLimitKey::All => "all",
            RateLimitKey::Route => "route",
            RateLimitKey::Caller => "caller",
            RateLimitKey::Header(_) => "header",
        }
    }

    /// The bucket key of a request.
    /// The bucket key of a request; `caller` is the connection's
    /// [`crate::server::Conn::caller_key`] (its client identity, else source IP).
    pub fn key(&self, rule: Option<&Rule>, caller: u64, headers: &HeaderMap) -> u64 {
        match &self.config.key {
            RateLimitKey::All => 0,
            RateLimitKey::Route => rule.map_or(0, |r| {
                key_hash(r.route.as_bytes()) ^ (r.rule_index as u64).wrapping_mul(0x9e37_79b9)
            }),
            RateLimitKey::Caller => caller,
            RateLimitKey::Header(name) => headers.get(name).map_or(1, |v| key_hash(v.as_bytes())),
        }
    }

    /// Takes a token for `key`, or says how long until one is free.
    pub fn check(&self, key: u64) -> Result<(), Duration> {
        let wait = |not_until: governor::NotUntil<_>| {
            not_until.wait_time_from(DefaultClock::default().now())
        };
        match &self.limiter {
            Limiter::Single(limiter) => limiter.check().map_err(wait),
            Limiter::Keyed { limiter, checks } => {
                let result = limiter.check_key(&key).map_err(wait);
                if checks.fetch_add(1, Ordering::Relaxed) % COUNT_KEYS_EVERY == 0
                    && limiter.len() > MAX_KEYS
                {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                result
            }
        }
    }

    /// The headers of a 429: when to retry, and the policy in IETF form.
    pub fn limited_headers(&self, wait: Duration, headers: &mut HeaderMap) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let secs = secs.max(1);
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        headers.insert("ratelimit-policy", self.policy_header.clone());
        if let Ok(v) =
            HeaderValue::from_str(&format!("\"{}\";r=0;t={secs}", self.config.source.name))
        {
            headers.insert("ratelimit", v);
        }
    }
}

/// Every policy's bucket, built per config version; a bucket whose settings did not
/// change is carried over with its state.
#[derive(Default)]
pub struct RateLimiters {
    by_policy: FxHashMap<ObjectRef, Arc<Bucket>>,
}

impl RateLimiters {
    pub fn new<'a>(
        limits: impl Iterator<Item = &'a Arc<RateLimit>>,
        previous: Option<&RateLimiters>,
    ) -> Self {
        let mut by_policy = FxHashMap::default();
        for config in limits {
            if by_policy.contains_key(&config.source) {
                continue;
            }
            let bucket = match previous.and_then(|p| p.by_policy.get(&config.source)) {
                Some(b) if *b.config == **config => b.clone(),
                _ => Arc::new(Bucket::new(config.clone())),
            };
            by_policy.insert(config.source.clone(), bucket);
        }
        RateLimiters { by_policy }
    }

    pub fn is_empty(&self) -> bool {
        self.by_policy.is_empty()
    }

    pub fn get(&self, config: &RateLimit) -> Option<&Arc<Bucket>> {
        self.by_policy.get(&config.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, burst: u32, key: RateLimitKey) -> Arc<RateLimit> {
        Arc::new(RateLimit {
            source: ObjectRef {
                namespace: "shop".into(),
                name: "api".into(),
            },
            requests,
            per: Duration::from_secs(1),
            burst,
            key,
        })
    }

    #[test]
    fn burst_then_paced_with_a_wait_time() {
        let b = Bucket::new(limit(10, 3, RateLimitKey::All));
        for _ in 0..3 {
            assert!(b.check(0).is_ok());
        }
        let wait = b.check(0).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        let mut h = HeaderMap::new();
        b.limited_headers(wait, &mut h);
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["ratelimit-policy"], "\"api\";q=10;w=1");
        assert_eq!(h["ratelimit"], "\"api\";r=0;t=1");
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let b = Bucket::new(limit(1, 1, RateLimitKey::Caller));
        let a = b.key(None, 1, &HeaderMap::new());
        let c = b.key(None, 2, &HeaderMap::new());
        assert_ne!(a, c);
        assert!(b.check(a).is_ok());
        assert!(b.check(a).is_err());
        assert!(b.check(c).is_ok());
    }

    #[test]
    fn tracked_keys_stay_bounded() {
        let b = Bucket::new(limit(1_000_000, 1, RateLimitKey::Caller));
        for k in 0..(MAX_KEYS as u64 * 3) {
            let _ = b.check(k);
        }
        let Limiter::Keyed { limiter, .. } = &b.limiter else {
            panic!("a caller key is keyed")
        };
        let bound = MAX_KEYS + COUNT_KEYS_EVERY as usize;
        assert!(limiter.len() <= bound, "{}", limiter.len());
    }

    #[test]
    fn one_bucket_for_everything_and_decisions_counted_by_route() {
        let b = Bucket::new(limit(2, 2, RateLimitKey::All));
        assert!(matches!(b.limiter, Limiter::Single(_)));
        let metrics = Metrics::new();
        let (route, none): (Arc<str>, Arc<str>) = (Arc::from("shop/api"), Arc::from(""));
        for _ in 0..3 {
            let limited = b.check(b.key(None, 7, &HeaderMap::new())).is_err();
            b.count(&metrics, &route, limited);
        }
        b.count(&metrics, &none, false);
        let text = metrics.encode();
        let line = |route: &str, result: &str| {
            format!(
                "tern_rate_limit_total{{policy=\"shop/api\",route_name=\"{route}\",\
                 key_kind=\"all\",result=\"{result}\"}}"
            )
        };
        assert!(
            text.contains(&format!("{} 2", line("shop/api", "allowed"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1", line("shop/api", "limited"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1", line("", "allowed"))),
            "{text}"
        );
    }

    #[test]
    fn unchanged_policies_keep_their_state() {
        let cfg = limit(1, 1, RateLimitKey::All);
        let first = RateLimiters::new([&cfg].into_iter(), None);
        assert!(first.get(&cfg).unwrap().check(0).is_ok());
        let second = RateLimiters::new([&cfg].into_iter(), Some(&first));
        assert!(second.get(&cfg).unwrap().check(0).is_err());
        let changed = limit(2, 1, RateLimitKey::All);
        let third = RateLimiters::new([&changed].into_iter(), Some(&second));
        assert!(third.get(&changed).unwrap().check(0).is_ok());
    }
}
