//! `tern-sidecar-sim`: simulates many sidecars against tern-control (the control-plane
//! scale benchmark, `benches/control/run.sh`).
//!
//! Every simulated sidecar is one `ControlPlane.Stream` RPC: it sends a Hello (workload
//! `sim-<i>`, namespace `bench`, `calls` naming K services of the generated set), and
//! answers every ConfigPush with an Ack of its version at once, without parsing the
//! documents: the point is the control plane's cost. Thousands of sidecars share one
//! tokio runtime and a few HTTP/2 connections (one tonic `Channel` per
//! `--streams-per-conn` sidecars).
//!
//! Phases:
//! 1. connect: sidecars start at `--connect-rate` per second; measured until every one has
//!    received its first push;
//! 2. steady state for `--duration` seconds; with `--change-file`, the tool itself rewrites
//!    that file every `--change-every` seconds (it bumps the `rev-N` value of the
//!    `x-bench-rev` header in the route of `--change-service`) and measures, for every
//!    sidecar whose `calls` include that service, the time from the write to the receipt
//!    of the next push (the Ack leaves right after the receipt);
//! 3. with `--storm`: every stream and connection is dropped at once and every sidecar
//!    reconnects immediately (no ramp); measured until every one has its config again
//!    (`--storm-resume`: the Hellos carry the version last received, and an accepted
//!    stream counts, since the control plane skips a push the sidecar already has).
//!
//! Rejected or failed streams (RESOURCE_EXHAUSTED, UNAVAILABLE, ...) are counted by code
//! and retried with jittered exponential backoff from 100 ms to 5 s; a sidecar whose
//! stream failed before its first push moves to the next `--control-plane` address.
//!
//! `--generate DIR` writes the benchmark's config directory instead (one file per
//! Service: Service, EndpointSlice with 2 endpoints, HTTPRoute; namespace `bench`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;
use tern_api::v1::control_plane_client::ControlPlaneClient;
use tern_api::v1::sidecar_message::Kind;
use tern_api::v1::{Ack, Hello, SidecarMessage};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Clone)]
#[command(about = "Simulates many Tern sidecars against tern-control")]
struct Args {
    /// tern-control gRPC address(es), host:port[,host:port...].
    #[arg(long, value_delimiter = ',')]
    control_plane: Vec<String>,
    /// Simulated sidecars.
    #[arg(long, default_value_t = 10_000)]
    sidecars: usize,
    /// Services each sidecar calls (Hello.calls), chosen deterministically.
    #[arg(long, default_value_t = 3)]
    services_per_sidecar: usize,
    /// Size of the generated service set (bench/svc-0 .. bench/svc-<N-1>).
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// New sidecars per second during the initial ramp.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Seconds of steady state after everyone connected (the change phase).
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// File to rewrite for the change-to-ACK measurement (must contain `rev-<n>`).
    #[arg(long)]
    change_file: Option<PathBuf>,
    /// Seconds between two changes.
    #[arg(long, default_value_t = 5.0)]
    change_every: f64,
    /// The Service the change file configures, "namespace/name".
    #[arg(long, default_value = "bench/svc-0")]
    change_service: String,
    /// Share of sidecars that also call --change-service (a popular service), besides
    /// the ones whose deterministic choice includes it.
    #[arg(long, default_value_t = 0.1)]
    hot_share: f64,
    /// After the change phase: drop every stream at once and reconnect all immediately.
    #[arg(long)]
    storm: bool,
    /// In the storm, sidecars resume: each Hello carries the version it last received
    /// (as after a control-plane restart), and an accepted stream counts as converged.
    #[arg(long)]
    storm_resume: bool,
    /// Sidecars (HTTP/2 streams) per connection.
    #[arg(long, default_value_t = 200)]
    streams_per_conn: usize,
    /// Give up waiting for the initial connect after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    connect_timeout: f64,
    /// Give up waiting for the storm to converge after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    storm_timeout: f64,
    /// Bootstrap token sent in every Hello.
    #[arg(long, env = "TERN_CONTROL_TOKEN", default_value = "")]
    token: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Write the benchmark config directory (--services services) to DIR and exit.
    #[arg(long, value_name = "DIR")]
    generate: Option<PathBuf>,
}

/// One received push: when, in which phase (0 = initial, 1 = storm), its version.
struct PushRec {
    at: Instant,
    generation: u8,
    version: String,
}

struct SimState {
    pushes: Vec<Mutex<Vec<PushRec>>>,
    /// Sidecars that received a first push, per generation.
    connected: [AtomicUsize; 2],
    /// Failed or rejected streams per generation, by gRPC code (0..=16).
    errors: [[AtomicU64; 17]; 2],
    push_count: AtomicU64,
    push_bytes: AtomicU64,
    push_docs: AtomicU64,
}

impl SimState {
    fn new(n: usize) -> Self {
        SimState {
            pushes: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            connected: Default::default(),
            errors: Default::default(),
            push_count: AtomicU64::new(0),
            push_bytes: AtomicU64::new(0),
            push_docs: AtomicU64::new(0),
        }
    }

    fn errors_json(&self, generation: usize) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (code, n) in self.errors[generation].iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let name = format!("{:?}", tonic::Code::from_i32(code as i32));
                m.insert(name, json!(n));
            }
        }
        serde_json::Value::Object(m)
    }
}

fn service_name(i: usize) -> String {
    format!("bench/svc-{i}")
}

/// The services sidecar `i` calls: K consecutive ones from `i*K`, plus the changed
/// service for a `hot_share` of the sidecars (spread evenly).
fn calls_of(i: usize, args: &Args) -> Vec<String> {
    let s = args.services.max(1);
    let mut calls: Vec<String> = (0..args.services_per_sidecar.min(s))
        .map(|j| service_name((i * args.services_per_sidecar + j) % s))
        .collect();
    if args.hot_share > 0.0 {
        let stride = ((1.0 / args.hot_share).round() as usize).max(1);
        if i.is_multiple_of(stride) && !calls.contains(&args.change_service) {
            if calls.is_empty() {
                calls.push(args.change_service.clone());
            } else {
                calls[0] = args.change_service.clone();
            }
        }
    }
    calls
}

fn hello_of(i: usize, args: &Args) -> Hello {
    Hello {
        workload: format!("sim-{i}"),
        namespace: "bench".into(),
        service_account: "sim".into(),
        zone: format!("zone-{}", i % 3),
        region: "bench".into(),
        service: String::new(),
        calls: calls_of(i, args),
        applied_version: String::new(),
        token: args.token.clone(),
        identity: None,
    }
}

fn jitter(d: Duration) -> Duration {
    // Between half and all of the backoff.
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

async fn run_sidecar(
    id: usize,
    generation: u8,
    state: Arc<SimState>,
    channels: Arc<Vec<Channel>>,
    hello: Hello,
) {
    let mut backoff = Duration::from_millis(100);
    let mut addr = id % channels.len();
    let mut first = true;
    loop {
        let mut client =
            ControlPlaneClient::new(channels[addr].clone()).max_decoding_message_size(256 << 20);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let _ = tx.try_send(SidecarMessage {
            kind: Some(Kind::Hello(hello.clone())),
        });
        let mut got_push = false;
        let status = match client.stream(ReceiverStream::new(rx)).await {
            Err(status) => status,
            Ok(response) => {
                if !hello.applied_version.is_empty() && first {
                    // Resuming with a version: the control plane may skip the first push,
                    // so an accepted stream counts as having the config.
                    first = false;
                    state.connected[generation as usize].fetch_add(1, Ordering::Relaxed);
                    state.pushes[id].lock().unwrap().push(PushRec {
                        at: Instant::now(),
                        generation,
                        version: hello.applied_version.clone(),
                    });
                }
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(push)) => {
                            let at = Instant::now();
                            got_push = true;
                            let ack = SidecarMessage {
                                kind: Some(Kind::Ack(Ack {
                                    version: push.version.clone(),
                                })),
                            };
                            let _ = tx.send(ack).await;
                            if first {
                                first = false;
                                state.connected[generation as usize]
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            state.push_count.fetch_add(1, Ordering::Relaxed);
                            state
                                .push_docs
                                .fetch_add(push.documents.len() as u64, Ordering::Relaxed);
                            let bytes: usize = push.documents.iter().map(|d| d.yaml.len()).sum();
                            state.push_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                            state.pushes[id].lock().unwrap().push(PushRec {
                                at,
                                generation,
                                version: push.version,
                            });
                        }
                        Ok(None) => {
                            break tonic::Status::unavailable("stream closed by the server");
                        }
                        Err(status) => break status,
                    }
                }
            }
        };
        let code = (status.code() as usize).min(16);
        state.errors[generation as usize][code].fetch_add(1, Ordering::Relaxed);
        if got_push {
            backoff = Duration::from_millis(100);
        } else {
            addr = (addr + 1) % channels.len();
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One channel per address for each group of `streams_per_conn` sidecars.
fn make_channels(args: &Args) -> anyhow::Result<Vec<Arc<Vec<Channel>>>> {
    let groups = args.sidecars.div_ceil(args.streams_per_conn.max(1));
    let mut out = Vec::with_capacity(groups);
    for g in 0..groups {
        let mut chans = Vec::new();
        for k in 0..args.control_plane.len() {
            // Groups start on different addresses so the load spreads over replicas.
            let addr = &args.control_plane[(g + k) % args.control_plane.len()];
            let uri = if addr.contains("://") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
            let ep = Endpoint::from_shared(uri)
                .with_context(|| format!("bad address {addr}"))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
                .initial_connection_window_size(Some(16 << 20))
                .initial_stream_window_size(Some(1 << 20));
            chans.push(ep.connect_lazy());
        }
        out.push(Arc::new(chans));
    }
    Ok(out)
}

fn spawn_one(
    i: usize,
    generation: u8,
    applied_version: String,
    args: &Args,
    state: &Arc<SimState>,
    groups: &[Arc<Vec<Channel>>],
) -> JoinHandle<()> {
    let g = i / args.streams_per_conn.max(1);
    let hello = Hello {
        applied_version,
        ..hello_of(i, args)
    };
    tokio::spawn(run_sidecar(
        i,
        generation,
        state.clone(),
        groups[g].clone(),
        hello,
    ))
}

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[idx])
}

fn dist_json(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    json!({
        "count": v.len(),
        "p50_ms": pct(&v, 0.50),
        "p90_ms": pct(&v, 0.90),
        "p99_ms": pct(&v, 0.99),
        "max_ms": v.last(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn wait_connected(
    state: &SimState,
    generation: usize,
    n: usize,
    timeout: Duration,
    what: &str,
) {
    let start = Instant::now();
    let mut last_print = Instant::now();
    while state.connected[generation].load(Ordering::Relaxed) < n && start.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "sim: {what}: {}/{} sidecars have their config after {:.1} s",
                state.connected[generation].load(Ordering::Relaxed),
                n,
                start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Per sidecar, the time from `since` to its first push of `generation`.
fn first_push_times(state: &SimState, generation: u8, since: Instant) -> Vec<f64> {
    state
        .pushes
        .iter()
        .filter_map(|p| {
            let p = p.lock().unwrap();
            p.iter()
                .find(|r| r.generation == generation)
                .map(|r| ms(r.at.saturating_duration_since(since)))
        })
        .collect()
}

/// Bumps the `rev-<n>` marker in the change file to `rev-<n+1>`; returns the instant the
/// write began.
fn rewrite_change_file(path: &Path) -> anyhow::Result<Instant> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(pos) = text.find("rev-") else {
        bail!("{} has no rev-<n> marker to change", path.display());
    };
    let digits_end = text[pos + 4..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(text.len(), |e| pos + 4 + e);
    let rev: u64 = text[pos + 4..digits_end].parse().unwrap_or(0) + 1;
    let new = format!("{}rev-{rev}{}", &text[..pos], &text[digits_end..]);
    let tmp = path.with_extension("yaml.tmp-bench");
    let at = Instant::now();
    std::fs::write(&tmp, new)?;
    std::fs::rename(&tmp, path)?;
    Ok(at)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn own_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn generate(dir: &Path, services: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..services {
        let (a, b) = (i / 250, i % 250);
        let mut y = String::new();
        let _ = write!(
            y,
            "# Generated by tern-sidecar-sim --generate (control-plane scale benchmark).
apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  ports: [{{name: http, port: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{i}-1
  namespace: bench
  labels: {{kubernetes.io/service-name: svc-{i}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [\"10.{a}.{b}.1\"]
  conditions: {{ready: true}}
  zone: zone-0
- addresses: [\"10.{a}.{b}.2\"]
  conditions: {{ready: true}}
  zone: zone-1
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: svc-{i}, port: 8080}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{{name: x-bench-rev, value: rev-0}}]
    backendRefs: [{{name: svc-{i}, port: 8080}}]
    timeouts: {{request: 5s}}
"
        );
        std::fs::write(dir.join(format!("svc-{i}.yaml")), y)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.generate {
        generate(dir, args.services)?;
        eprintln!("sim: wrote {} services to {}", args.services, dir.display());
        return Ok(());
    }
    if args.control_plane.is_empty() {
        bail!("--control-plane ADDR is required");
    }
    if args.sidecars == 0 {
        bail!("--sidecars must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(args.clone()))?;
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    // Do not wait for the sidecar tasks to wind down.
    rt.shutdown_background();
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    let n = args.sidecars;
    let state = Arc::new(SimState::new(n));
    let subscribers: Vec<usize> = (0..n)
        .filter(|&i| calls_of(i, &args).contains(&args.change_service))
        .collect();
    let mut report = serde_json::Map::new();
    report.insert("sidecars".into(), json!(n));
    report.insert(
        "services_per_sidecar".into(),
        json!(args.services_per_sidecar),
    );
    report.insert("control_plane".into(), json!(args.control_plane));
    report.insert("streams_per_conn".into(), json!(args.streams_per_conn));
    report.insert("change_subscribers".into(), json!(subscribers.len()));

    // Phase 1: ramp.
    let groups = make_channels(&args)?;
    let t_connect = Instant::now();
    let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(n);
    let rate = if args.connect_rate > 0.0 {
        args.connect_rate
    } else {
        f64::INFINITY
    };
    while tasks.len() < n {
        let due = ((t_connect.elapsed().as_secs_f64() * rate) as usize + 1).min(n);
        while tasks.len() < due {
            tasks.push(spawn_one(
                tasks.len(),
                0,
                String::new(),
                &args,
                &state,
                &groups,
            ));
        }
        if tasks.len() < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let ramp_s = t_connect.elapsed().as_secs_f64();
    wait_connected(
        &state,
        0,
        n,
        Duration::from_secs_f64(args.connect_timeout),
        "connect",
    )
    .await;
    let connected = state.connected[0].load(Ordering::Relaxed);
    let firsts = first_push_times(&state, 0, t_connect);
    report.insert(
        "connect".into(),
        json!({
            "connected": connected,
            "ramp_s": ramp_s,
            "all_connected_s": if connected == n { firsts.iter().cloned().fold(0.0, f64::max) / 1000.0 } else { f64::NAN },
            "last_first_push_s": firsts.iter().cloned().fold(0.0, f64::max) / 1000.0,
            "errors": state.errors_json(0),
        }),
    );
    eprintln!(
        "sim: {connected}/{n} connected in {:.2} s",
        t_connect.elapsed().as_secs_f64()
    );

    // Phase 2: steady state, with changes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pushes_before = state.push_count.load(Ordering::Relaxed);
    let t_steady = Instant::now();
    let mut changes: Vec<Instant> = Vec::new();
    let mut changes_wall: Vec<f64> = Vec::new();
    if let Some(file) = &args.change_file {
        let every = Duration::from_secs_f64(args.change_every.max(0.1));
        loop {
            let at = t_steady + every * (changes.len() as u32);
            if at.duration_since(t_steady).as_secs_f64() >= args.duration && !changes.is_empty() {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            let written = rewrite_change_file(file)?;
            changes_wall.push(unix_now() - written.elapsed().as_secs_f64());
            changes.push(written);
        }
        // Let the last change arrive.
        let grace = every.min(Duration::from_secs(5));
        let last = *changes.last().unwrap();
        tokio::time::sleep_until((last + grace).into()).await;
    } else {
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    }
    let t_end = Instant::now();
    let steady_pushes = state.push_count.load(Ordering::Relaxed) - pushes_before;
    // Pushes that repeat the version the sidecar already had on the same stream phase.
    let repeated_pushes: usize = state
        .pushes
        .iter()
        .map(|p| {
            let p = p.lock().unwrap();
            p.windows(2)
                .filter(|w| w[0].generation == w[1].generation && w[0].version == w[1].version)
                .count()
        })
        .sum();

    if !changes.is_empty() {
        let mut lat = Vec::new();
        let mut per_change = Vec::new();
        let mut unscoped = 0usize;
        let is_sub: Vec<bool> = {
            let mut v = vec![false; n];
            for &s in &subscribers {
                v[s] = true;
            }
            v
        };
        for (k, &t) in changes.iter().enumerate() {
            let end = changes.get(k + 1).copied().unwrap_or(t_end);
            let mut this = Vec::new();
            for (i, p) in state.pushes.iter().enumerate() {
                let p = p.lock().unwrap();
                let in_window = p
                    .iter()
                    .filter(|r| r.generation == 0 && r.at >= t && r.at < end);
                if is_sub[i] {
                    if let Some(r) = in_window.min_by_key(|r| r.at) {
                        this.push(ms(r.at - t));
                    }
                } else {
                    unscoped += in_window.count();
                }
            }
            per_change.push(json!({
                "written_unix_s": changes_wall[k],
                "converged": this.len(),
                "max_ms": this.iter().cloned().fold(0.0, f64::max),
            }));
            lat.extend(this);
        }
        let converged_all = per_change
            .iter()
            .all(|c| c["converged"].as_u64() == Some(subscribers.len() as u64));
        report.insert(
            "change".into(),
            json!({
                "changes": changes.len(),
                "subscribers": subscribers.len(),
                "every_s": args.change_every,
                "all_converged": converged_all,
                "latency": dist_json(lat),
                "per_change": per_change,
                "pushes_to_non_subscribers": unscoped,
            }),
        );
    }
    report.insert(
        "steady".into(),
        json!({
            "seconds": t_end.duration_since(t_steady).as_secs_f64(),
            "pushes": steady_pushes,
            "repeated_version_pushes": repeated_pushes,
            "errors": state.errors_json(0),
        }),
    );

    // Phase 3: reconnect storm.
    if args.storm {
        for t in &tasks {
            t.abort();
        }
        for t in tasks.drain(..) {
            let _ = t.await;
        }
        drop(groups);
        let groups = make_channels(&args)?;
        let t_storm = Instant::now();
        for i in 0..n {
            let applied = if args.storm_resume {
                let p = state.pushes[i].lock().unwrap();
                p.last().map(|r| r.version.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            tasks.push(spawn_one(i, 1, applied, &args, &state, &groups));
        }
        wait_connected(
            &state,
            1,
            n,
            Duration::from_secs_f64(args.storm_timeout),
            "storm",
        )
        .await;
        let reconnected = state.connected[1].load(Ordering::Relaxed);
        let times = first_push_times(&state, 1, t_storm);
        let conv = times.iter().cloned().fold(0.0, f64::max) / 1000.0;
        report.insert(
            "storm".into(),
            json!({
                "reconnected": reconnected,
                "resume": args.storm_resume,
                "converged_s": if reconnected == n { conv } else { f64::NAN },
                "last_first_push_s": conv,
                "per_sidecar": dist_json(times),
                "errors": state.errors_json(1),
            }),
        );
        eprintln!("sim: storm: {reconnected}/{n} reconnected in {conv:.2} s");
    }
    for t in &tasks {
        t.abort();
    }
    report.insert(
        "totals".into(),
        json!({
            "pushes": state.push_count.load(Ordering::Relaxed),
            "push_documents": state.push_docs.load(Ordering::Relaxed),
            "push_yaml_bytes": state.push_bytes.load(Ordering::Relaxed),
            "sim_peak_rss_mb": own_rss_mb(),
        }),
    );
    // Sorted keys for stable output.
    let sorted: BTreeMap<_, _> = report.into_iter().collect();
    Ok(serde_json::to_value(sorted)?)
}
