//! The `tern-proxy` binary: flags and environment -> [`tern_proxy::Settings`] -> run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};

#[derive(Parser)]
#[command(name = "tern-proxy", version, about = "Tern sidecar proxy")]
#[command(group(ArgGroup::new("source").required(true).args(["config_dir", "control_plane"])))]
struct Args {
    /// Directory of *.yaml config files, watched for changes.
    #[arg(long, env = "TERN_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// gRPC addresses (host:port, comma-separated) of tern-control replicas: the config
    /// comes from the control plane instead of a directory.
    #[arg(long, env = "TERN_CONTROL_PLANE", value_delimiter = ',')]
    control_plane: Vec<String>,
    /// Where the last config applied from the control plane is kept, so that the sidecar
    /// boots and serves from it when no control plane answers.
    #[arg(long, env = "TERN_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// This sidecar's instance name for the control plane (default: hostname-pid).
    #[arg(long, env = "TERN_WORKLOAD")]
    workload: Option<String>,
    /// Its own Service, namespace/name (for inbound policy).
    #[arg(long, env = "TERN_SERVICE")]
    service: Option<String>,
    /// Services it calls, namespace/name, comma-separated (default: every Service).
    #[arg(long, env = "TERN_CALLS", value_delimiter = ',')]
    calls: Vec<String>,
    /// Its ServiceAccount.
    #[arg(long, env = "TERN_SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    /// File holding the bootstrap token that authenticates this sidecar's certificate
    /// requests (`ternctl ca token` makes one). Read at each request, so it may be rotated.
    #[arg(long, env = "TERN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM trust anchors for TLS to the control plane (e.g. the CA directory's anchors.pem):
    /// with it, the control-plane connection is TLS, its certificate checked against these
    /// anchors and the trust bundle the control plane last pushed.
    #[arg(long, env = "TERN_CONTROL_PLANE_ANCHORS", value_name = "FILE")]
    control_plane_anchors: Option<PathBuf>,
    /// The SPIFFE ID the control plane must present over TLS (default:
    /// spiffe://<trust domain>/ns/tern-system/sa/tern-control).
    #[arg(
        long,
        env = "TERN_CONTROL_PLANE_IDENTITY",
        value_name = "SPIFFE_ID",
        requires = "control_plane_anchors",
        value_parser = parse_spiffe_id
    )]
    control_plane_identity: Option<tern_config::identity::SpiffeId>,
    /// Where the application sends its outbound requests.
    #[arg(long, env = "TERN_OUTBOUND", default_value = "127.0.0.1:4140")]
    outbound: SocketAddr,
    /// Where other sidecars send requests for the local application.
    #[arg(long, env = "TERN_INBOUND", default_value = "0.0.0.0:4143")]
    inbound: SocketAddr,
    /// The local application.
    #[arg(long, env = "TERN_APP", default_value = "127.0.0.1:8080")]
    app: SocketAddr,
    /// Admin listener: /metrics, /ready, /live, /config.
    #[arg(long, env = "TERN_ADMIN", default_value = "127.0.0.1:4191")]
    admin: SocketAddr,
    /// The namespace bare service names resolve in first.
    #[arg(long, env = "TERN_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Worker threads, each with its own listeners and pools (default: available CPUs).
    #[arg(long, env = "TERN_WORKERS")]
    workers: Option<usize>,
    /// How long SIGTERM waits for requests in flight (e.g. 30s, 500ms).
    #[arg(long, env = "TERN_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Request bodies up to this many bytes are buffered so that retries can replay them;
    /// larger ones are streamed and not retried.
    #[arg(long, env = "TERN_RETRY_BUFFER", default_value_t = 64 * 1024)]
    retry_buffer: usize,
    /// Write one JSON line per request to stdout (route, backend, endpoint, status,
    /// attempts, duration, tern-error).
    #[arg(long, env = "TERN_ACCESS_LOG")]
    access_log: bool,
    /// The zone this sidecar runs in (topology.kubernetes.io/zone): traffic stays in it
    /// while it has enough healthy endpoints.
    #[arg(long, env = "TERN_ZONE")]
    zone: Option<String>,
    /// The region this sidecar runs in (topology.kubernetes.io/region).
    #[arg(long, env = "TERN_REGION")]
    region: Option<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. info or tern_proxy=debug.
    #[arg(long, env = "TERN_LOG", default_value = "info")]
    log: String,
}

fn default_workload() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sidecar".into());
    format!("{host}-{}", std::process::id())
}

fn parse_spiffe_id(s: &str) -> Result<tern_config::identity::SpiffeId, String> {
    tern_config::identity::SpiffeId::parse(s).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tern_config::validate::parse_duration(s)
}

fn main() -> ExitCode {
    // First, before any other thread exists.
    tern_proxy::resident::tune_allocator();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let control_tls = args.control_plane_anchors.map(|anchors_file| {
        std::sync::Arc::new(tern_proxy::tls::control_plane::ControlPlaneTls {
            anchors_file,
            identity: args.control_plane_identity,
        })
    });
    if let Some(tls) = &control_tls
        && let Err(err) = tern_proxy::tls::control_plane::read_anchors(&tls.anchors_file)
    {
        eprintln!("tern-proxy: {err}");
        return ExitCode::FAILURE;
    }
    let source = match args.config_dir {
        Some(dir) => {
            if args.state_dir.is_some() {
                tracing::warn!("--state-dir is only used with --control-plane; ignored");
            }
            tern_proxy::ConfigSource::Dir(dir)
        }
        None => tern_proxy::ConfigSource::ControlPlane(tern_proxy::control::ControlSettings {
            addresses: args
                .control_plane
                .iter()
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
            state_dir: args.state_dir,
            workload: args.workload.unwrap_or_else(default_workload),
            service: args.service.unwrap_or_default(),
            calls: args
                .calls
                .iter()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            service_account: args.service_account,
            token_file: args.token_file,
            tls: control_tls,
        }),
    };
    let settings = tern_proxy::Settings {
        source,
        outbound: args.outbound,
        inbound: args.inbound,
        app: args.app,
        admin: args.admin,
        namespace: args.namespace,
        workers,
        drain_timeout: args.drain_timeout,
        limits: tern_proxy::Limits::default(),
        retry_buffer: args.retry_buffer,
        access_log: args.access_log,
        place: tern_proxy::balance::locality::Place {
            zone: args.zone,
            region: args.region,
        },
    };
    match tern_proxy::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tern-proxy: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("tern-proxy").chain(args.iter().copied()))
    }

    #[test]
    fn exactly_one_config_source() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--config-dir", "c", "--control-plane", "a:1"]).is_err());
        assert!(parse(&["--config-dir", "c"]).is_ok());
        let a = parse(&[
            "--control-plane",
            "a:1,b:2",
            "--state-dir",
            "s",
            "--calls",
            "shop/a,shop/b",
        ])
        .unwrap();
        assert_eq!(a.control_plane, ["a:1", "b:2"]);
        assert_eq!(a.calls, ["shop/a", "shop/b"]);
        assert_eq!(a.service_account, "default");
        assert!(default_workload().ends_with(&format!("-{}", std::process::id())));
        assert!(a.control_plane_anchors.is_none());
        // The identity only makes sense with TLS, and must be a SPIFFE ID.
        assert!(
            parse(&[
                "--control-plane",
                "a:1",
                "--control-plane-identity",
                "spiffe://cluster.local/ns/mesh/sa/tern-control"
            ])
            .is_err()
        );
        let a = parse(&[
            "--control-plane",
            "a:1",
            "--control-plane-anchors",
            "ca/anchors.pem",
            "--control-plane-identity",
            "spiffe://cluster.local/ns/mesh/sa/tern-control",
        ])
        .unwrap();
        assert_eq!(
            a.control_plane_anchors,
            Some(PathBuf::from("ca/anchors.pem"))
        );
        assert!(a.control_plane_identity.unwrap().is("mesh", "tern-control"));
        assert!(
            parse(&[
                "--control-plane",
                "a:1",
                "--control-plane-anchors",
                "x.pem",
                "--control-plane-identity",
                "tern-control"
            ])
            .is_err()
        );
    }
}
