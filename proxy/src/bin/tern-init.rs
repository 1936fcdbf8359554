//! `tern-init`: programs iptables in the current network namespace (a pod's; run it there,
//! e.g. with `ip netns exec` or as a Kubernetes init container) so that the pod's TCP
//! traffic goes through its tern-proxy: inbound to the proxy's inbound port, outbound to
//! its outbound port, except the proxy's own connections. The rules themselves are
//! [`tern_proxy::init`]; this binary reads the nat table with `iptables-save` and applies
//! one `iptables-restore --noflush` transaction.

use std::io::{ErrorKind, Write};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tern_proxy::init::{self, Ipv4Net, Mode, NatState, PortRange, Rules};

#[derive(Parser)]
#[command(
    name = "tern-init",
    version,
    about = "Redirects a pod's TCP traffic to its tern-proxy with iptables (IPv4)",
    long_about = "Redirects a pod's TCP traffic to its tern-proxy with iptables (IPv4 only: \
                  ip6tables is not programmed). Writes the nat chains TERN_INBOUND (from \
                  PREROUTING) and TERN_OUTPUT (from OUTPUT) in one iptables-restore \
                  --noflush transaction; running it again gives the same rules."
)]
struct Args {
    /// The proxy's inbound port: inbound TCP is redirected to it.
    #[arg(long, env = "TERN_INIT_INBOUND_PORT", default_value_t = 4143)]
    inbound_port: u16,
    /// The proxy's outbound port: outbound TCP is redirected to it.
    #[arg(long, env = "TERN_INIT_OUTBOUND_PORT", default_value_t = 4140)]
    outbound_port: u16,
    /// The UID the proxy runs as: its connections are not redirected.
    #[arg(long, env = "TERN_INIT_PROXY_UID", default_value_t = 2102)]
    proxy_uid: u32,
    /// The proxy's admin port: never redirected inbound, so Prometheus and probes reach
    /// the sidecar itself (0: none).
    #[arg(long, env = "TERN_INIT_ADMIN_PORT", default_value_t = 4191)]
    admin_port: u16,
    /// More inbound ports not redirected (comma-separated, ranges as 9000-9100).
    #[arg(long, env = "TERN_INIT_SKIP_INBOUND_PORTS")]
    skip_inbound_ports: Vec<String>,
    /// Outbound destination ports not redirected (comma-separated, ranges as 9000-9100).
    #[arg(long, env = "TERN_INIT_SKIP_OUTBOUND_PORTS")]
    skip_outbound_ports: Vec<String>,
    /// Outbound destination IPv4 subnets not redirected (comma-separated CIDRs).
    #[arg(long, env = "TERN_INIT_SKIP_SUBNETS")]
    skip_subnets: Vec<String>,
    /// iptables backend: nft (iptables-nft-restore) or legacy (iptables-legacy-restore).
    #[arg(long, env = "TERN_INIT_MODE", value_enum, default_value_t = Mode::Nft)]
    mode: Mode,
    /// Print the iptables-restore script instead of applying it.
    #[arg(long)]
    dry_run: bool,
    /// Remove tern's chains and the jumps to them instead of installing them.
    #[arg(long)]
    clean: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-init: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let mode = args.mode;
    let now = if args.dry_run {
        // A dry run may not be allowed to read the table (not root, no iptables): then it
        // shows the script for a namespace without tern rules.
        read_nat(mode).unwrap_or_else(|e| {
            eprintln!("tern-init: cannot read the nat table ({e:#}); assuming it is empty");
            NatState::default()
        })
    } else {
        read_nat(mode)?
    };

    if args.clean {
        let Some(script) = init::clean_script(&now) else {
            eprintln!("tern-init: no tern rules to clean [{mode}]");
            return Ok(());
        };
        if args.dry_run {
            print!("{script}");
            return Ok(());
        }
        restore(mode, &script)?;
        let after = read_nat(mode)?;
        if !after.chains.is_empty() || !after.jumps.is_empty() {
            bail!("rules still present after cleaning: {after:?}");
        }
        eprintln!(
            "tern-init: removed {} and {} [{mode}]",
            init::INBOUND_CHAIN,
            init::OUTPUT_CHAIN
        );
        return Ok(());
    }

    let mut skip_inbound_ports =
        init::parse_list::<PortRange>(&args.skip_inbound_ports).context("--skip-inbound-ports")?;
    if args.admin_port != 0 {
        let admin: PortRange = args.admin_port.to_string().parse()?;
        if !skip_inbound_ports.contains(&admin) {
            skip_inbound_ports.insert(0, admin);
        }
    }
    let rules = Rules {
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        proxy_uid: args.proxy_uid,
        skip_inbound_ports,
        skip_outbound_ports: init::parse_list::<PortRange>(&args.skip_outbound_ports)
            .context("--skip-outbound-ports")?,
        skip_subnets: init::parse_list::<Ipv4Net>(&args.skip_subnets).context("--skip-subnets")?,
    };
    rules.validate()?;
    let script = rules.apply_script(&now);
    if args.dry_run {
        print!("{script}");
        return Ok(());
    }
    restore(mode, &script)?;
    let after = read_nat(mode)?;
    if !after.installed() {
        bail!("iptables-restore succeeded but the rules are not in place: {after:?}");
    }
    eprintln!("tern-init: {} [{mode}]", rules.summary());
    Ok(())
}

/// Our part of the nat table now.
fn read_nat(mode: Mode) -> Result<NatState> {
    let out = exec(mode.save_bin(), &["-t", "nat"], None)?;
    Ok(NatState::parse_save(&out))
}

fn restore(mode: Mode, script: &str) -> Result<()> {
    exec(mode.restore_bin(), &["--noflush"], Some(script))
        .with_context(|| format!("applying this script:\n{}", script.trim_end()))?;
    Ok(())
}

/// Runs an iptables tool; its stdout, or an error that carries its stderr.
fn exec(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                anyhow::anyhow!(
                    "{bin} not found in PATH: install iptables (Debian/Ubuntu: apt-get install \
                     iptables), or choose the other backend with --mode"
                )
            } else {
                anyhow::anyhow!("running {bin}: {e}")
            }
        })?;
    // Small scripts: the tool reads all of its input before it writes much. A tool that
    // exits early breaks the pipe; its exit status and stderr then say why.
    let written = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => pipe.write_all(input.as_bytes()),
        _ => Ok(()),
    };
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {bin}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{bin} {} failed ({}): {}",
            args.join(" "),
            out.status,
            stderr.trim()
        );
    }
    written.with_context(|| format!("writing to {bin}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
