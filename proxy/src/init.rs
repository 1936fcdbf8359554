//! `tern-init`'s rules: the iptables `nat` script that sends a pod's TCP traffic through
//! its sidecar (transparent interception). Pure text in, text out, so that it is tested
//! without a kernel; the `tern-init` binary runs `iptables-save` / `iptables-restore`.
//!
//! Two chains of our own, [`INBOUND_CHAIN`] (jumped to from `PREROUTING`) and
//! [`OUTPUT_CHAIN`] (from `OUTPUT`), are rewritten as a whole in one
//! `iptables-restore --noflush` transaction: declaring an existing chain in the script
//! flushes it, so running twice gives the same rules. The jumps live in built-in chains
//! that other software shares, so they are only added when `iptables-save` does not show
//! them already (and stale or duplicate jumps to our chains are deleted).
//!
//! IPv4 only: `ip6tables` is not programmed, so IPv6 traffic is not intercepted.

use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Inbound TCP (nat `PREROUTING`) goes through this chain.
pub const INBOUND_CHAIN: &str = "TERN_INBOUND";
/// Outbound TCP (nat `OUTPUT`) goes through this chain.
pub const OUTPUT_CHAIN: &str = "TERN_OUTPUT";

/// The jumps into our chains: (built-in chain, rule spec).
const JUMPS: [(&str, &str, &str); 2] = [
    ("PREROUTING", "-p tcp -j", INBOUND_CHAIN),
    ("OUTPUT", "-p tcp -j", OUTPUT_CHAIN),
];

/// Which iptables backend programs the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// nf_tables (`iptables-nft-restore`), Debian's default.
    Nft,
    /// The legacy x_tables backend (`iptables-legacy-restore`).
    Legacy,
}

impl Mode {
    pub fn restore_bin(self) -> &'static str {
        match self {
            Mode::Nft => "iptables-nft-restore",
            Mode::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn save_bin(self) -> &'static str {
        match self {
            Mode::Nft => "iptables-nft-save",
            Mode::Legacy => "iptables-legacy-save",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Nft => "nft",
            Mode::Legacy => "legacy",
        })
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    #[error("bad port {0:?}: want 1-65535 or a range FIRST-LAST")]
    Port(String),
    #[error("bad subnet {0:?}: want an IPv4 CIDR such as 10.0.0.0/8 (IPv6 is not intercepted)")]
    Subnet(String),
    #[error("inbound and outbound ports are both {0}: they must differ")]
    SamePorts(u16),
    #[error("port 0 is not a listening port")]
    ZeroPort,
}

/// One TCP port or an inclusive range (`8000-8100` or `8000:8100`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = InitError;

    fn from_str(s: &str) -> Result<Self, InitError> {
        let bad = || InitError::Port(s.to_string());
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(bad()),
            Ok(p) => Ok(p),
        };
        let (first, last) = match s.split_once(['-', ':']) {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    /// In iptables' syntax (`--dport 8000:8100`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// An IPv4 network; host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`), a bare address
/// is a /32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Ipv4Net {
    type Err = InitError;

    fn from_str(s: &str) -> Result<Self, InitError> {
        let bad = || InitError::Subnet(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Ok(Ipv4Net {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses flag values that may each hold a comma- or space-separated list; empty items
/// are ignored (so `--skip-inbound-ports=` means none).
pub fn parse_list<T: FromStr<Err = InitError>>(values: &[String]) -> Result<Vec<T>, InitError> {
    values
        .iter()
        .flat_map(|v| v.split([',', ' ']))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::parse)
        .collect()
}

/// What to intercept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// The proxy's inbound listener (bound on 0.0.0.0): inbound TCP is redirected to it.
    pub inbound_port: u16,
    /// The proxy's outbound listener (127.0.0.1 is enough): outbound TCP is redirected to it.
    pub outbound_port: u16,
    /// The proxy runs as this UID; its own connections are not redirected (else every
    /// connection it makes upstream would loop back into itself).
    pub proxy_uid: u32,
    pub skip_inbound_ports: Vec<PortRange>,
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_subnets: Vec<Ipv4Net>,
}

impl Rules {
    pub fn validate(&self) -> Result<(), InitError> {
        if self.inbound_port == 0 || self.outbound_port == 0 {
            return Err(InitError::ZeroPort);
        }
        if self.inbound_port == self.outbound_port {
            return Err(InitError::SamePorts(self.inbound_port));
        }
        Ok(())
    }

    /// One line, for logs.
    pub fn summary(&self) -> String {
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(",")
            }
        };
        format!(
            "inbound TCP -> :{} (skipping ports {}); outbound TCP -> :{} (skipping uid {}, \
             loopback, ports {}, subnets {})",
            self.inbound_port,
            list(
                self.skip_inbound_ports
                    .iter()
                    .map(|p| p.to_string())
                    .collect()
            ),
            self.outbound_port,
            self.proxy_uid,
            list(
                self.skip_outbound_ports
                    .iter()
                    .map(|p| p.to_string())
                    .collect()
            ),
            list(self.skip_subnets.iter().map(|n| n.to_string()).collect()),
        )
    }

    /// The rules of our two chains, as `-A` lines, in order.
    pub fn chain_rules(&self) -> Vec<String> {
        let mut out = Vec::new();
        let inb = INBOUND_CHAIN;
        for p in &self.skip_inbound_ports {
            out.push(format!("-A {inb} -p tcp --dport {p} -j RETURN"));
        }
        out.push(format!(
            "-A {inb} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));

        let outc = OUTPUT_CHAIN;
        out.push(format!(
            "-A {outc} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        // 127.0.0.0/8, and connections to the pod's own addresses, leave through lo.
        out.push(format!("-A {outc} -o lo -j RETURN"));
        for p in &self.skip_outbound_ports {
            out.push(format!("-A {outc} -p tcp --dport {p} -j RETURN"));
        }
        for n in &self.skip_subnets {
            out.push(format!("-A {outc} -d {n} -j RETURN"));
        }
        out.push(format!(
            "-A {outc} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        out
    }

    /// The `iptables-restore --noflush` script that installs the rules, given the nat
    /// table as it is now.
    pub fn apply_script(&self, now: &NatState) -> String {
        let mut s = header("apply");
        s.push_str("*nat\n");
        // With --noflush, declaring an existing chain flushes it: a rewrite, not an append.
        let _ = writeln!(s, ":{INBOUND_CHAIN} - [0:0]");
        let _ = writeln!(s, ":{OUTPUT_CHAIN} - [0:0]");
        let mut keep = [false; JUMPS.len()];
        for (chain, spec) in &now.jumps {
            match JUMPS.iter().position(|j| is_jump(j, chain, spec)) {
                Some(i) if !keep[i] => keep[i] = true,
                _ => {
                    let _ = writeln!(s, "-D {chain} {spec}");
                }
            }
        }
        for rule in self.chain_rules() {
            s.push_str(&rule);
            s.push('\n');
        }
        for (i, (chain, spec, target)) in JUMPS.iter().enumerate() {
            if !keep[i] {
                let _ = writeln!(s, "-A {chain} {spec} {target}");
            }
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// The script that removes our jumps and chains; `None` when there is nothing to remove.
pub fn clean_script(now: &NatState) -> Option<String> {
    if now.jumps.is_empty() && now.chains.is_empty() {
        return None;
    }
    let mut s = header("clean");
    s.push_str("*nat\n");
    for (chain, spec) in &now.jumps {
        let _ = writeln!(s, "-D {chain} {spec}");
    }
    for chain in &now.chains {
        let _ = writeln!(s, "-F {chain}");
    }
    for chain in &now.chains {
        let _ = writeln!(s, "-X {chain}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

fn header(what: &str) -> String {
    format!(
        "# tern-init {what} ({} {}): for iptables-restore --noflush\n",
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION")
    )
}

fn is_jump(jump: &(&str, &str, &str), chain: &str, spec: &str) -> bool {
    let (want_chain, want_spec, target) = jump;
    chain == *want_chain && normalize(spec) == normalize(&format!("{want_spec} {target}"))
}

fn normalize(spec: &str) -> String {
    spec.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Our part of the nat table, read from `iptables-save -t nat`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatState {
    /// Our chains that exist.
    pub chains: Vec<String>,
    /// Rules of other chains that jump to ours: (chain, spec after `-A CHAIN`).
    pub jumps: Vec<(String, String)>,
}

impl NatState {
    pub fn parse_save(text: &str) -> NatState {
        let ours = |c: &str| c == INBOUND_CHAIN || c == OUTPUT_CHAIN;
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in text.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if !in_nat {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next().filter(|c| ours(c)) {
                    state.chains.push(name.to_string());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let Some((chain, spec)) = rule.split_once(' ') else {
                    continue;
                };
                let words: Vec<&str> = spec.split_whitespace().collect();
                let jumps_to_ours = words
                    .windows(2)
                    .any(|w| matches!(w[0], "-j" | "-g" | "--jump" | "--goto") && ours(w[1]));
                if jumps_to_ours && !ours(chain) {
                    state
                        .jumps
                        .push((chain.to_string(), spec.trim().to_string()));
                }
            }
        }
        state
    }

    /// Whether both jumps and both chains are in place.
    pub fn installed(&self) -> bool {
        self.chains.len() == 2
            && JUMPS
                .iter()
                .all(|j| self.jumps.iter().any(|(c, s)| is_jump(j, c, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy_uid: 2102,
            skip_inbound_ports: vec!["4191".parse().unwrap()],
            skip_outbound_ports: vec![],
            skip_subnets: vec![],
        }
    }

    fn body(script: &str) -> Vec<&str> {
        script.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn default_script_on_a_fresh_namespace() {
        let script = rules().apply_script(&NatState::default());
        assert_eq!(
            body(&script),
            [
                "*nat",
                ":TERN_INBOUND - [0:0]",
                ":TERN_OUTPUT - [0:0]",
                "-A TERN_INBOUND -p tcp --dport 4191 -j RETURN",
                "-A TERN_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                "-A TERN_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "-A TERN_OUTPUT -o lo -j RETURN",
                "-A TERN_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
                "-A PREROUTING -p tcp -j TERN_INBOUND",
                "-A OUTPUT -p tcp -j TERN_OUTPUT",
                "COMMIT",
            ]
        );
        assert!(script.starts_with("# tern-init apply"));
    }

    #[test]
    fn ports_subnets_and_uid() {
        let r = Rules {
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uid: 1337,
            skip_inbound_ports: parse_list(&["4191,22".into(), "9000-9100".into()]).unwrap(),
            skip_outbound_ports: parse_list(&["443 5432".into()]).unwrap(),
            skip_subnets: parse_list(&["10.96.0.0/12,169.254.169.254".into()]).unwrap(),
        };
        let rules = r.chain_rules();
        assert_eq!(
            rules,
            [
                "-A TERN_INBOUND -p tcp --dport 4191 -j RETURN",
                "-A TERN_INBOUND -p tcp --dport 22 -j RETURN",
                "-A TERN_INBOUND -p tcp --dport 9000:9100 -j RETURN",
                "-A TERN_INBOUND -p tcp -j REDIRECT --to-ports 15006",
                "-A TERN_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A TERN_OUTPUT -o lo -j RETURN",
                "-A TERN_OUTPUT -p tcp --dport 443 -j RETURN",
                "-A TERN_OUTPUT -p tcp --dport 5432 -j RETURN",
                "-A TERN_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A TERN_OUTPUT -d 169.254.169.254/32 -j RETURN",
                "-A TERN_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
        // The uid exemption comes before any REDIRECT: the proxy's own connections must
        // never loop back into it.
        let uid = rules
            .iter()
            .position(|l| l.contains("--uid-owner"))
            .unwrap();
        let redirect = rules
            .iter()
            .position(|l| l.starts_with("-A TERN_OUTPUT") && l.contains("REDIRECT"))
            .unwrap();
        assert!(uid < redirect);
        assert!(r.summary().contains("uid 1337"), "{}", r.summary());
    }

    #[test]
    fn rerun_keeps_existing_jumps_and_drops_duplicates() {
        let saved = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Tue Nov 24 00:00:00 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j TERN_INBOUND
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:TERN_INBOUND - [0:0]
:TERN_OUTPUT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j TERN_INBOUND
-A PREROUTING -s 10.0.0.0/8 -j OTHER
-A OUTPUT -p tcp -j TERN_OUTPUT
-A OUTPUT -p tcp  -j TERN_OUTPUT
-A OUTPUT -p udp -j TERN_OUTPUT
-A TERN_INBOUND -p tcp -m tcp --dport 4191 -j RETURN
-A TERN_OUTPUT -p tcp -j REDIRECT --to-ports 4140
COMMIT
";
        let now = NatState::parse_save(saved);
        assert_eq!(now.chains, ["TERN_INBOUND", "TERN_OUTPUT"]);
        assert_eq!(now.jumps.len(), 4, "{now:?}");
        assert!(now.installed());
        let script = rules().apply_script(&now);
        let lines = body(&script);
        // Jumps present once are kept; the duplicate and the foreign-protocol one go.
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with("-A PREROUTING") || l.starts_with("-A OUTPUT"))
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("-D"))
                .collect::<Vec<_>>(),
            [
                &"-D OUTPUT -p tcp  -j TERN_OUTPUT",
                &"-D OUTPUT -p udp -j TERN_OUTPUT"
            ]
        );
        // Our chains are redeclared (= flushed by --noflush restore) and refilled.
        assert!(lines.contains(&":TERN_INBOUND - [0:0]"));
        assert!(lines.contains(&"-A TERN_INBOUND -p tcp -j REDIRECT --to-ports 4143"));
    }

    #[test]
    fn same_script_whenever_installed() {
        // Idempotence at the script level: the state after an apply yields an apply that
        // only rewrites our chains.
        let r = rules();
        let fresh = r.apply_script(&NatState::default());
        let after = NatState::parse_save(&fresh);
        assert!(after.installed());
        let again = r.apply_script(&after);
        let expect: Vec<&str> = body(&fresh)
            .into_iter()
            .filter(|l| !l.starts_with("-A PREROUTING") && !l.starts_with("-A OUTPUT"))
            .collect();
        assert_eq!(body(&again), expect);
    }

    #[test]
    fn clean() {
        assert_eq!(clean_script(&NatState::default()), None);
        let now = NatState::parse_save(&rules().apply_script(&NatState::default()));
        let script = clean_script(&now).unwrap();
        assert_eq!(
            body(&script),
            [
                "*nat",
                "-D PREROUTING -p tcp -j TERN_INBOUND",
                "-D OUTPUT -p tcp -j TERN_OUTPUT",
                "-F TERN_INBOUND",
                "-F TERN_OUTPUT",
                "-X TERN_INBOUND",
                "-X TERN_OUTPUT",
                "COMMIT",
            ]
        );
        // A half-removed install (chain left, jump gone) is still cleaned.
        let half = NatState {
            chains: vec![OUTPUT_CHAIN.into()],
            jumps: vec![],
        };
        assert_eq!(
            body(&clean_script(&half).unwrap()),
            ["*nat", "-F TERN_OUTPUT", "-X TERN_OUTPUT", "COMMIT"]
        );
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::Nft.restore_bin(), "iptables-nft-restore");
        assert_eq!(Mode::Nft.save_bin(), "iptables-nft-save");
        assert_eq!(Mode::Legacy.restore_bin(), "iptables-legacy-restore");
        assert_eq!(Mode::Legacy.save_bin(), "iptables-legacy-save");
        assert_eq!(Mode::Legacy.to_string(), "legacy");
    }

    #[test]
    fn parsing() {
        let p: PortRange = "8000:8100".parse().unwrap();
        assert_eq!((p.first, p.last), (8000, 8100));
        assert_eq!(p.to_string(), "8000:8100");
        for bad in ["0", "65536", "x", "10-5", "", "1-"] {
            assert_eq!(
                bad.parse::<PortRange>(),
                Err(InitError::Port(bad.into())),
                "{bad}"
            );
        }
        let n: Ipv4Net = "10.1.2.3/8".parse().unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert_eq!(
            "0.0.0.0/0".parse::<Ipv4Net>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        for bad in ["10.0.0.0/33", "fd00::/8", "10.0.0/8", "10.0.0.0/x"] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        assert_eq!(
            parse_list::<PortRange>(&["".into(), " , ".into()]),
            Ok(vec![])
        );
        let mut r = rules();
        r.outbound_port = 4143;
        assert_eq!(r.validate(), Err(InitError::SamePorts(4143)));
        r.outbound_port = 0;
        assert_eq!(r.validate(), Err(InitError::ZeroPort));
        assert_eq!(rules().validate(), Ok(()));
    }
}
