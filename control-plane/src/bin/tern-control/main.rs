//! tern-control: Tern's control plane. Watches a config directory and streams each
//! sidecar its scoped config over gRPC, recording ACKs and NACKs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tern_control::server::Settings;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "tern-control", version, about = "Tern's control plane")]
struct Args {
    /// Config directory (*.yaml / *.yml, the same YAML as tern-proxy's file mode), watched.
    #[arg(long, env = "TERN_CONTROL_CONFIG_DIR")]
    config_dir: PathBuf,
    /// gRPC listener for sidecars.
    #[arg(long, env = "TERN_CONTROL_LISTEN", default_value = "127.0.0.1:4180")]
    listen: SocketAddr,
    /// Admin listener: /metrics, /sidecars, /ready, /live.
    #[arg(long, env = "TERN_CONTROL_ADMIN", default_value = "127.0.0.1:4181")]
    admin: SocketAddr,
    /// Quiet period after a change before pushing it (e.g. 100ms, 1s).
    #[arg(long, env = "TERN_CONTROL_DEBOUNCE", default_value = "100ms", value_parser = parse_duration)]
    debounce: Duration,
    /// Longest a change waits while changes keep coming.
    #[arg(long, env = "TERN_CONTROL_MAX_DELAY", default_value = "1s", value_parser = parse_duration)]
    max_delay: Duration,
    /// New sidecar streams admitted per second; the excess get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TERN_CONTROL_ADMIT_RATE", default_value_t = 1000)]
    admit_rate: u32,
    /// CA directory: anchors.pem (trust anchors), issuer.crt and issuer.key (PEM), watched.
    /// With it, tern-control signs sidecar certificates (Certify) and pushes the trust.
    #[arg(
        long,
        env = "TERN_CONTROL_CA_DIR",
        value_name = "DIR",
        requires = "tokens"
    )]
    ca_dir: Option<PathBuf>,
    /// Tokens file: a YAML list of {token, namespace, serviceAccount, workload (optional)},
    /// watched. With it, every stream's Hello must carry a token good for its identity.
    #[arg(long, env = "TERN_CONTROL_TOKENS", value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Trust domain of the SPIFFE IDs signed.
    #[arg(long, env = "TERN_CONTROL_TRUST_DOMAIN", default_value = tern_control::ca::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of sidecar certificates (e.g. 24h, 90m, 7d).
    #[arg(long, env = "TERN_CONTROL_CERT_LIFETIME", default_value = "24h", value_parser = parse_lifetime)]
    cert_lifetime: Duration,
    /// Serve the gRPC API over TLS 1.3 with a certificate tern-control issues itself from
    /// its CA (spiffe://<trust domain>/ns/<namespace>/sa/tern-control), re-issued when the
    /// issuer changes. No client certificate is asked for. The admin endpoint stays HTTP.
    #[arg(long, env = "TERN_SERVE_TLS", requires = "ca_dir")]
    serve_tls: bool,
    /// The namespace tern-control runs in, for its own SPIFFE ID (with --serve-tls).
    #[arg(long, env = "TERN_CONTROL_NAMESPACE", default_value = tern_control::tls::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Log filter (tracing EnvFilter syntax): info, debug, tern_control=debug, ...
    #[arg(long, env = "TERN_CONTROL_LOG", default_value = "info")]
    log: String,
}

/// `100ms`, `1s`, `1.5s`, `2m`, or a bare number of milliseconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 100ms, 1s)"))?;
    let secs = match unit {
        "" | "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        other => return Err(format!("unknown unit {other:?} in {s:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    tern_control::ca::parse_lifetime(s)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-control: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.config_dir.is_dir(),
        "--config-dir {}: not a directory",
        args.config_dir.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let grpc = tern_control::bind(args.listen)
            .await
            .with_context(|| format!("binding --listen {}", args.listen))?;
        let admin = tern_control::bind(args.admin)
            .await
            .with_context(|| format!("binding --admin {}", args.admin))?;
        tracing::info!(listen = %args.listen, admin = %args.admin, dir = %args.config_dir.display(), "tern-control starting");
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        let settings = Settings {
            debounce: args.debounce,
            max_delay: args.max_delay,
            admit_rate: args.admit_rate,
            ca_dir: args.ca_dir,
            tokens: args.tokens,
            trust_domain: args.trust_domain,
            cert_lifetime: args.cert_lifetime,
            serve_tls: args.serve_tls,
            namespace: args.namespace,
        };
        tern_control::run(settings, args.config_dir, grpc, admin, shutdown).await?;
        tracing::info!("tern-control stopped");
        Ok(())
    })
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn flags() {
        let a = Args::try_parse_from(["tern-control", "--config-dir", "/tmp"]).unwrap();
        assert_eq!(a.listen.to_string(), "127.0.0.1:4180");
        assert_eq!(a.admin.to_string(), "127.0.0.1:4181");
        assert_eq!(a.debounce, Duration::from_millis(100));
        assert_eq!(a.max_delay, Duration::from_secs(1));
        assert_eq!(a.admit_rate, 1000);
        assert_eq!(a.ca_dir, None);
        assert_eq!(a.trust_domain, "cluster.local");
        assert_eq!(a.cert_lifetime, Duration::from_secs(24 * 3600));
        // A CA needs tokens to know whom it certifies.
        assert!(
            Args::try_parse_from(["tern-control", "--config-dir", "/tmp", "--ca-dir", "/ca"])
                .is_err()
        );
        let a = Args::try_parse_from([
            "tern-control",
            "--config-dir",
            "/tmp",
            "--ca-dir",
            "/ca",
            "--tokens",
            "/t.yaml",
            "--cert-lifetime",
            "2h",
        ])
        .unwrap();
        assert_eq!(a.cert_lifetime, Duration::from_secs(7200));
        assert!(!a.serve_tls);
        assert_eq!(a.namespace, "tern-system");
        // TLS needs the CA to issue its certificate.
        assert!(
            Args::try_parse_from(["tern-control", "--config-dir", "/tmp", "--serve-tls"]).is_err()
        );
        let a = Args::try_parse_from([
            "tern-control",
            "--config-dir",
            "/tmp",
            "--ca-dir",
            "/ca",
            "--tokens",
            "/t.yaml",
            "--serve-tls",
            "--namespace",
            "mesh",
        ])
        .unwrap();
        assert!(a.serve_tls);
        assert_eq!(a.namespace, "mesh");
    }
}
