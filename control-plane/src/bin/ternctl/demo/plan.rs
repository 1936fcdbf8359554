//! The demo's fixed port plan and where its config directory comes from.
//!
//! App `i` (see [`APPS`]) uses `base + 10*i + offset`: sidecar outbound +0, inbound +1,
//! admin +2, the app itself +5. The example config in `examples/demo` is written for the
//! default base; for another base it is copied with its ports rewritten.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub const DEFAULT_BASE_PORT: u16 = 15000;
pub const NAMESPACE: &str = "shop";

const OUTBOUND: u16 = 0;
const INBOUND: u16 = 1;
const ADMIN: u16 = 2;
const APP: u16 = 5;
const STRIDE: u16 = 10;

/// The demo's apps in port-plan order. `web` has no process of its own: the traffic
/// generator plays its application and sends through web's sidecar. The three
/// `inventory-*` apps are the endpoints of the one `inventory` Service.
pub const APPS: [&str; 7] = [
    "web",
    "checkout-v1",
    "checkout-v2",
    "catalog",
    "inventory-a",
    "inventory-b",
    "inventory-c",
];

/// The broken instance: it starts failing every request (500), so the circuit breaker of
/// web's sidecar ejects it and the inventory route's retries hide the failures.
pub const BROKEN: &str = "inventory-c";
/// The fail rate `BROKEN` starts with (`tern-demo-app --fail-rate`).
pub const BROKEN_FAIL_RATE: &str = "1";

/// Ports of one app and its sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub name: &'static str,
    /// Whether a `tern-demo-app` runs on `app` (false for `web`).
    pub has_app: bool,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub app: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct PortPlan {
    pub base: u16,
    pub slots: Vec<Slot>,
    /// tern-control's gRPC listener and admin endpoint (after the last slot).
    pub control: SocketAddr,
    pub control_admin: SocketAddr,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

impl PortPlan {
    pub fn new(base: u16) -> anyhow::Result<Self> {
        // The slots, then tern-control's two ports.
        let span = STRIDE * APPS.len() as u16 + 1;
        if base < 1024 || base.checked_add(span).is_none() {
            anyhow::bail!(
                "--base-port {base} is out of range: the demo uses ports {base}..{base}+{span}, \
                 which must lie within 1024..=65535"
            );
        }
        let slots = APPS
            .iter()
            .enumerate()
            .map(|(i, &name)| {
                let b = base + STRIDE * i as u16;
                Slot {
                    name,
                    has_app: name != "web",
                    outbound: local(b + OUTBOUND),
                    inbound: local(b + INBOUND),
                    admin: local(b + ADMIN),
                    app: local(b + APP),
                }
            })
            .collect();
        let after = base + STRIDE * APPS.len() as u16;
        Ok(Self {
            base,
            slots,
            control: local(after),
            control_admin: local(after + 1),
        })
    }

    pub fn slot(&self, name: &str) -> &Slot {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .expect("slot names come from APPS")
    }

    /// Every port the demo listens on, with a description for error messages.
    pub fn listening_ports(&self) -> Vec<(u16, String)> {
        let mut out = vec![
            (self.control.port(), "tern-control gRPC".to_string()),
            (self.control_admin.port(), "tern-control admin".to_string()),
        ];
        for s in &self.slots {
            out.push((s.outbound.port(), format!("{} sidecar outbound", s.name)));
            out.push((s.inbound.port(), format!("{} sidecar inbound", s.name)));
            out.push((s.admin.port(), format!("{} sidecar admin", s.name)));
            if s.has_app {
                out.push((s.app.port(), format!("{} app", s.name)));
            }
        }
        out
    }

    /// Maps every port of the default plan to the same role in this plan.
    pub fn rewrite_map(&self) -> anyhow::Result<HashMap<u16, u16>> {
        let default = PortPlan::new(DEFAULT_BASE_PORT)?;
        let mut map = HashMap::new();
        for (d, s) in default.slots.iter().zip(&self.slots) {
            for (a, b) in [
                (d.outbound, s.outbound),
                (d.inbound, s.inbound),
                (d.admin, s.admin),
                (d.app, s.app),
            ] {
                map.insert(a.port(), b.port());
            }
        }
        Ok(map)
    }
}

/// Fails with a message naming the first port that something else already listens on.
pub fn check_ports_free(plan: &PortPlan) -> anyhow::Result<()> {
    for (port, what) in plan.listening_ports() {
        if let Err(e) = std::net::TcpListener::bind(local(port)) {
            anyhow::bail!(
                "port {port} ({what}) is busy: {e}. Stop whatever listens on it \
                 (`ss -ltnp 'sport = :{port}'` shows who), or pick other ports with \
                 `ternctl demo --base-port PORT` (the demo uses PORT..PORT+{})",
                STRIDE * APPS.len() as u16 + 1
            );
        }
    }
    Ok(())
}

/// Replaces every whole number in `text` that is a key of `map` by its value. Numbers that
/// are part of a dotted address or a longer token (`127.0.0.1`, `v15000`) are left alone.
pub fn rewrite_ports(text: &str, map: &HashMap<u16, u16>) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let token = &text[start..i];
            let glued = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'.');
            let standalone =
                !glued(start.checked_sub(1).and_then(|p| bytes.get(p))) && !glued(bytes.get(i));
            match token.parse::<u16>().ok().and_then(|p| map.get(&p)) {
                Some(new) if standalone => out.push_str(&new.to_string()),
                _ => out.push_str(token),
            }
        } else {
            // Copy one whole UTF-8 character.
            let ch = text[i..].chars().next().expect("i is a char boundary");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The example config, compiled in so the demo works from any directory.
pub const EMBEDDED_EXAMPLE: [(&str, &str); 4] = [
    (
        "services.yaml",
        include_str!("../../../../../examples/demo/services.yaml"),
    ),
    (
        "endpoints.yaml",
        include_str!("../../../../../examples/demo/endpoints.yaml"),
    ),
    (
        "routes.yaml",
        include_str!("../../../../../examples/demo/routes.yaml"),
    ),
    (
        "policies.yaml",
        include_str!("../../../../../examples/demo/policies.yaml"),
    ),
];

/// Where the config came from, for the start-up message.
#[derive(Debug)]
pub enum ConfigSource {
    /// Used in place: edits apply live.
    InPlace(PathBuf),
    /// Copied from `from` into `to` with ports rewritten for a non-default base port.
    Rewritten { from: PathBuf, to: PathBuf },
    /// Not found on disk: the compiled-in example was written to this directory.
    Embedded(PathBuf),
}

impl ConfigSource {
    /// The directory the sidecars watch.
    pub fn dir(&self) -> &Path {
        match self {
            ConfigSource::InPlace(d) => d,
            ConfigSource::Rewritten { to, .. } => to,
            ConfigSource::Embedded(d) => d,
        }
    }
}

/// Finds `examples/demo`: in the current directory or one of its parents, else relative to
/// the executable (`target/release/ternctl` -> `../../examples/demo`).
pub fn find_example_dir(exe_dir: &Path) -> Option<PathBuf> {
    let rel = Path::new("examples").join("demo");
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let candidate = dir.join(&rel);
            if candidate.is_dir() {
                return Some(candidate);
            }
        }
    }
    let candidate = exe_dir.join("..").join("..").join(&rel);
    candidate.is_dir().then_some(candidate)
}

/// Picks the directory the sidecars will watch. `work` is the demo's temp directory.
pub fn prepare_config(
    explicit: Option<&Path>,
    exe_dir: &Path,
    plan: &PortPlan,
    work: &Path,
) -> anyhow::Result<ConfigSource> {
    let found = match explicit {
        Some(dir) => {
            if !dir.is_dir() {
                anyhow::bail!("--config {}: not a directory", dir.display());
            }
            Some(dir.to_path_buf())
        }
        None => find_example_dir(exe_dir),
    };
    let default_ports = plan.base == DEFAULT_BASE_PORT;
    match found {
        Some(dir) if default_ports => Ok(ConfigSource::InPlace(absolute(&dir))),
        Some(dir) => {
            let to = work.join("config");
            std::fs::create_dir_all(&to)?;
            let map = plan.rewrite_map()?;
            let entries = std::fs::read_dir(&dir)
                .with_context(|| format!("reading config directory {}", dir.display()))?;
            for entry in entries {
                let path = entry?.path();
                let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
                if !path.is_file() || !is_yaml {
                    continue;
                }
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let name = path.file_name().expect("a file has a name");
                std::fs::write(to.join(name), rewrite_ports(&text, &map))?;
            }
            Ok(ConfigSource::Rewritten {
                from: absolute(&dir),
                to,
            })
        }
        None => {
            let to = work.join("config");
            std::fs::create_dir_all(&to)?;
            let map = plan.rewrite_map()?;
            for (name, text) in EMBEDDED_EXAMPLE {
                std::fs::write(to.join(name), rewrite_ports(text, &map))?;
            }
            Ok(ConfigSource::Embedded(to))
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan() {
        let plan = PortPlan::new(DEFAULT_BASE_PORT).unwrap();
        let v1 = plan.slot("checkout-v1");
        assert_eq!(v1.outbound.port(), 15010);
        assert_eq!(v1.inbound.port(), 15011);
        assert_eq!(v1.admin.port(), 15012);
        assert_eq!(v1.app.port(), 15015);
        assert_eq!(plan.slot("web").outbound.port(), 15000);
        assert_eq!(plan.slot("catalog").inbound.port(), 15031);
        assert!(!plan.slot("web").has_app);
        assert_eq!(plan.slot(BROKEN).app.port(), 15065);
        assert_eq!(plan.slot("inventory-a").inbound.port(), 15041);
        assert_eq!(plan.control.port(), 15070);
        assert_eq!(plan.control_admin.port(), 15071);
        // web has no app, so 7*3 + 6 ports, plus tern-control's two, all distinct.
        let ports = plan.listening_ports();
        assert_eq!(ports.len(), 29);
        let mut uniq: Vec<u16> = ports.iter().map(|(p, _)| *p).collect();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 29);
    }

    #[test]
    fn plan_range_is_checked() {
        assert!(PortPlan::new(80).is_err());
        assert!(PortPlan::new(65530).is_err());
        assert!(PortPlan::new(65535 - 71).is_ok());
        assert!(PortPlan::new(65535 - 70).is_err());
    }

    #[test]
    fn rewrite_only_plan_ports() {
        let plan = PortPlan::new(20000).unwrap();
        let map = plan.rewrite_map().unwrap();
        let text = "port: 15011 # inbound\nports: [{name: http, port: 15031}]\n\
                    port: 8080\naddr: 127.0.0.1\nv15011 15011.5 150110 é15021";
        let out = rewrite_ports(text, &map);
        assert_eq!(
            out,
            "port: 20011 # inbound\nports: [{name: http, port: 20031}]\n\
             port: 8080\naddr: 127.0.0.1\nv15011 15011.5 150110 é20021"
        );
    }

    #[test]
    fn example_endpoints_follow_the_plan() {
        let plan = PortPlan::new(DEFAULT_BASE_PORT).unwrap();
        let endpoints = EMBEDDED_EXAMPLE[1].1;
        for slot in &plan.slots {
            let needle = format!("port: {}", slot.inbound.port());
            assert!(endpoints.contains(&needle), "{needle} missing");
        }
        let routes = EMBEDDED_EXAMPLE[2].1;
        assert!(routes.contains("name: checkout-split"));
        assert!(routes.contains("weight: 90"));
        // Rewriting for another base moves every endpoint port.
        let other = PortPlan::new(31000).unwrap();
        let rewritten = rewrite_ports(endpoints, &other.rewrite_map().unwrap());
        for slot in &other.slots {
            let needle = format!("port: {}", slot.inbound.port());
            assert!(rewritten.contains(&needle), "{needle} missing");
        }
        assert!(!rewritten.contains("port: 150"));
    }

    fn compile(base: u16) -> tern_config::Compiled {
        let map = PortPlan::new(base).unwrap().rewrite_map().unwrap();
        let sources: Vec<(String, String)> = EMBEDDED_EXAMPLE
            .iter()
            .map(|(name, text)| (name.to_string(), rewrite_ports(text, &map)))
            .collect();
        tern_config::load_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn example_compiles_cleanly_and_routes_to_sidecar_inbounds() {
        use http::{HeaderMap, Method};
        for base in [DEFAULT_BASE_PORT, 20000] {
            let compiled = compile(base);
            assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
            let snap = &compiled.snapshot;
            let plan = PortPlan::new(base).unwrap();
            let inbound = |name: &str| plan.slot(name).inbound;

            let checkout = snap
                .resolve("checkout.shop", Some(8080), NAMESPACE)
                .unwrap();
            let mut headers = HeaderMap::new();
            let split = checkout
                .route(&Method::GET, "/api/items", None, &headers)
                .unwrap();
            assert_eq!(&*split.rule.route, "shop/checkout-split");
            assert_eq!(split.rule.backends.total, 100);
            let addrs: Vec<_> = split
                .rule
                .backends
                .entries
                .iter()
                .map(|(_, b)| b.endpoints[0].addr)
                .collect();
            assert_eq!(addrs, [inbound("checkout-v1"), inbound("checkout-v2")]);
            headers.insert("x-canary", "1".parse().unwrap());
            let canary = checkout
                .route(&Method::GET, "/api/items", None, &headers)
                .unwrap();
            assert_eq!(canary.rule.rule_index, 0);
            assert_eq!(
                canary.rule.backends.entries[0].1.endpoints[0].addr,
                inbound("checkout-v2")
            );

            let catalog = snap.resolve("catalog", None, NAMESPACE).unwrap();
            let rule = catalog
                .route(&Method::GET, "/products/1", None, &HeaderMap::new())
                .unwrap()
                .rule;
            assert!(!rule.request_headers.is_empty());
            assert!(rule.timeouts.request.is_some());
            assert_eq!(
                rule.backends.entries[0].1.endpoints[0].addr,
                inbound("catalog")
            );
            // inventory: three endpoints in three zones, a retry policy on its route and
            // the BackendPolicy's quick circuit breaker on its backend.
            let inventory = snap.resolve("inventory", Some(8080), NAMESPACE).unwrap();
            let rule = inventory
                .route(&Method::GET, "/stock/7", None, &HeaderMap::new())
                .unwrap()
                .rule;
            assert_eq!(&*rule.route, "shop/inventory");
            let retry = rule.retry.as_ref().expect("the inventory route retries");
            assert_eq!(retry.attempts, 2);
            assert!(retry.codes.contains(&500), "the demo app fails with 500");
            let backend = &rule.backends.entries[0].1;
            let mut eps: Vec<_> = backend
                .endpoints
                .iter()
                .map(|e| (e.addr, e.zone.as_deref().map(str::to_string)))
                .collect();
            eps.sort();
            let zoned = |name: &str, zone: &str| (inbound(name), Some(zone.to_string()));
            assert_eq!(
                eps,
                [
                    zoned("inventory-a", "zone-a"),
                    zoned("inventory-b", "zone-b"),
                    zoned(BROKEN, "zone-c"),
                ]
            );
            let policy = &backend.policy;
            assert_eq!(
                policy.source.as_ref().map(|s| s.to_string()).as_deref(),
                Some("shop/inventory")
            );
            let cb = &policy.circuit_breaker;
            assert_eq!(cb.consecutive_failures, Some(3));
            assert!(cb.failure_status_codes.contains(&500));
            assert_eq!(cb.ejection.base, std::time::Duration::from_secs(5));
            assert_eq!(cb.ejection.max_ejected_percent, 50);

            let web = snap.resolve("web", Some(8080), NAMESPACE).unwrap();
            let rule = web
                .route(&Method::GET, "/", None, &HeaderMap::new())
                .unwrap()
                .rule;
            assert_eq!(rule.backends.entries[0].1.endpoints[0].addr, inbound("web"));
        }
    }
}
