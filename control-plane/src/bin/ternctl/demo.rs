//! `ternctl demo`: a small service mesh on this machine, no cluster needed.
//!
//! Starts a `tern-demo-app` per app (checkout-v1, checkout-v2, catalog, and inventory-a, -b
//! and -c, the three endpoints of `inventory`, of which inventory-c is broken), each behind
//! its own `tern-proxy` sidecar, plus a sidecar for `web`, whose application is an
//! in-process traffic generator. `tern-control` watches the config directory
//! (`examples/demo` by default) and pushes each sidecar its scoped config (managed mode;
//! `--file-mode` has every sidecar watch the directory itself instead), so editing it
//! changes routing live. In managed mode tern-control also runs a CA (created fresh in
//! the work directory) and each sidecar gets a bootstrap token for its certificate
//! requests. A table redrawn every
//! second shows what web's sidecar sees, from its `/metrics` and `/circuits`. Everything
//! started stops with the demo.
//!
//! See docs/demo.md for the port plan and things to try.

mod identity;
mod metrics;
mod plan;
mod procs;
mod summary;
mod traffic;

use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::StatusCode;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use plan::{ConfigSource, DEFAULT_BASE_PORT, NAMESPACE, PortPlan};
use procs::Procs;
use summary::SidecarView;

/// Rates and quantiles are computed over this many one-second scrapes.
const WINDOW_SCRAPES: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);

#[derive(clap::Args)]
pub struct Args {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Config directory the sidecars watch [default: examples/demo].
    ///
    /// Used in place with the default base port, so edits apply live; with another base
    /// port it is copied to a temporary directory with its ports rewritten.
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// First port of the port plan: app i uses PORT+10*i (sidecar outbound), +1 (inbound),
    /// +2 (admin) and +5 (the app), for web, checkout-v1, checkout-v2, catalog, inventory-a,
    /// inventory-b and inventory-c.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_BASE_PORT)]
    base_port: u16,
    /// Sidecars watch the config directory themselves instead of getting their config
    /// from tern-control.
    #[arg(long)]
    file_mode: bool,
    /// Requests per second the traffic generator sends through web's sidecar (0: none).
    #[arg(long, value_name = "N", default_value_t = 60)]
    rps: u32,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the ternctl executable")?;
    let exe_dir = exe
        .parent()
        .context("the ternctl executable has no parent directory")?
        .to_path_buf();
    let bins = Binaries::find(&exe_dir)?;
    let plan = PortPlan::new(args.base_port)?;
    plan::check_ports_free(&plan)?;
    let work = make_work_dir()?;
    let config = plan::prepare_config(args.config.as_deref(), &exe_dir, &plan, &work)?;
    // Check the config up front: a clear diagnostic beats sidecars that never get ready.
    match tern_config::load_dir(config.dir()) {
        Ok(compiled) => {
            for w in &compiled.warnings {
                eprintln!("{w}");
            }
        }
        Err(e) => anyhow::bail!(
            "the demo config in {} is invalid: {e}",
            config.dir().display()
        ),
    }
    // One thread is plenty for ~100 requests/s, and it keeps every child's parent thread
    // (for PR_SET_PDEATHSIG) alive until the demo ends.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run_demo(args, bins, plan, config, work))
}

struct Binaries {
    proxy: PathBuf,
    app: PathBuf,
    control: PathBuf,
}

impl Binaries {
    fn find(dir: &Path) -> anyhow::Result<Self> {
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(anyhow::anyhow!(
                    "{name} not found next to ternctl (looked for {}). The demo runs the \
                     workspace's binaries side by side; build them all first:\n    \
                     cargo build --release && ./target/release/ternctl demo",
                    path.display()
                ))
            }
        };
        Ok(Self {
            proxy: find("tern-proxy")?,
            app: find("tern-demo-app")?,
            control: find("tern-control")?,
        })
    }
}

fn make_work_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tern-demo-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing stale {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Why the demo stopped.
enum Stop {
    Signal(&'static str),
    Duration,
    /// Writing the table failed (e.g. `ternctl demo | head` and head exited).
    OutputClosed,
}

/// Writes to stdout and flushes. Never panics (unlike `print!` on a closed pipe).
fn say(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

async fn run_demo(
    args: Args,
    bins: Binaries,
    plan: PortPlan,
    config: ConfigSource,
    work: PathBuf,
) -> anyhow::Result<ExitCode> {
    // Install the handlers first, so a Ctrl-C during start-up stops the demo in order.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let signals = async {
        tokio::select! {
            _ = sigint.recv() => "Ctrl-C",
            _ = sigterm.recv() => "SIGTERM",
            _ = sighup.recv() => "SIGHUP",
        }
    };

    let mut procs = Procs::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stats = Arc::new(Mutex::new(traffic::GenStats::default()));
    let outcome = tokio::select! {
        r = mesh(&args, &bins, &plan, &config, &work, &mut procs, stop_rx, stats.clone()) => r,
        name = signals => Ok(Stop::Signal(name)),
    };
    let _ = stop_tx.send(true);
    let _ = say(match &outcome {
        Ok(Stop::Signal(name)) => format!("\n{name}: stopping the demo...\n"),
        Ok(Stop::Duration) => "\n--duration reached: stopping the demo...\n".into(),
        Ok(Stop::OutputClosed) | Err(_) => "\nstopping the demo...\n".into(),
    }
    .as_str());
    procs.shutdown(Duration::from_secs(3)).await;
    let s = stats.lock().expect("stats lock").clone();
    if s.sent > 0 {
        let _ = say(&format!(
            "traffic generator: {} requests, {} ok, {} HTTP errors, {} without an answer\n",
            s.sent, s.ok, s.http_errors, s.transport_errors
        ));
    }
    let _ = say(&format!(
        "all demo processes stopped; logs are in {}\n",
        work.display()
    ));
    outcome.map(|_| ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
async fn mesh(
    args: &Args,
    bins: &Binaries,
    plan: &PortPlan,
    config: &ConfigSource,
    work: &Path,
    procs: &mut Procs,
    stop: watch::Receiver<bool>,
    stats: Arc<Mutex<traffic::GenStats>>,
) -> anyhow::Result<Stop> {
    let config_dir = config.dir().to_string_lossy().into_owned();
    let _ = say(&format!(
        "Starting the Tern demo mesh (namespace {NAMESPACE}); logs in {}\n",
        work.display()
    ));
    for slot in plan.slots.iter().filter(|s| s.has_app) {
        let mut app_args = vec![
            "--listen".into(),
            slot.app.to_string(),
            "--name".into(),
            slot.name.into(),
        ];
        if slot.name == plan::BROKEN {
            app_args.extend(["--fail-rate".into(), plan::BROKEN_FAIL_RATE.into()]);
        }
        procs.spawn(slot.name, &bins.app, &app_args, work)?;
    }
    let identity = if args.file_mode {
        None
    } else {
        let identity = identity::prepare(work, plan)?;
        procs.spawn(
            "tern-control",
            &bins.control,
            &[
                vec![
                    "--config-dir".into(),
                    config_dir.clone(),
                    "--listen".into(),
                    plan.control.to_string(),
                    "--admin".into(),
                    plan.control_admin.to_string(),
                ],
                identity.control_args(),
            ]
            .concat(),
            work,
        )?;
        Some(identity)
    };
    for slot in &plan.slots {
        // Managed mode: config from tern-control, kept in a state dir per sidecar.
        let source: Vec<String> = match &identity {
            None => vec!["--config-dir".into(), config_dir.clone()],
            Some(identity) => [
                vec![
                    "--control-plane".into(),
                    plan.control.to_string(),
                    "--state-dir".into(),
                    work.join(format!("{}-state", slot.name))
                        .to_string_lossy()
                        .into_owned(),
                    "--workload".into(),
                    slot.name.into(),
                ],
                identity.sidecar_args(slot.name),
            ]
            .concat(),
        };
        procs.spawn(
            &format!("{}-sidecar", slot.name),
            &bins.proxy,
            &[
                source,
                vec![
                    "--outbound".into(),
                    slot.outbound.to_string(),
                    "--inbound".into(),
                    slot.inbound.to_string(),
                    "--app".into(),
                    slot.app.to_string(),
                    "--admin".into(),
                    slot.admin.to_string(),
                    "--namespace".into(),
                    NAMESPACE.into(),
                    "--workers".into(),
                    "1".into(),
                    // Stop within the demo's grace period rather than tern-proxy's default 30s.
                    "--drain-timeout".into(),
                    "1s".into(),
                ],
            ]
            .concat(),
            work,
        )?;
    }
    wait_ready(plan, procs, !args.file_mode).await?;
    print_banner(plan, config, work, args.rps, !args.file_mode);

    if args.rps > 0 {
        let g = traffic::Generator {
            target: plan.slot("web").outbound,
            rps: args.rps,
        };
        tokio::spawn(traffic::run(g, stats.clone(), stop));
    }
    live_table(args, plan, work, procs, &stats).await
}

/// The error for a child that exited, with the end of its log.
fn died(procs: &mut Procs) -> Option<anyhow::Error> {
    let (p, status) = procs.check_exited()?;
    Some(anyhow::anyhow!(
        "{} exited unexpectedly ({status}). Last lines of {}:\n{}",
        p.name,
        p.log.display(),
        procs::tail(&p.log, 20)
    ))
}

/// Waits until every app answers and every sidecar's /ready is 200.
async fn wait_ready(plan: &PortPlan, procs: &mut Procs, managed: bool) -> anyhow::Result<()> {
    // (what, address, path): sidecars are ready once they have loaded a config.
    let mut pending: Vec<(String, SocketAddr, &str)> = Vec::new();
    if managed {
        pending.push(("tern-control".into(), plan.control_admin, "/ready"));
    }
    for s in &plan.slots {
        if s.has_app {
            pending.push((format!("{} app", s.name), s.app, "/control"));
        }
        pending.push((format!("{} sidecar", s.name), s.admin, "/ready"));
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(e) = died(procs) {
            return Err(e);
        }
        let checks = pending
            .iter()
            .map(|(_, addr, path)| crate::client::get(*addr, path, Duration::from_millis(500)));
        let results = futures_join_all(checks).await;
        let mut still = Vec::new();
        let mut errors = Vec::new();
        for (item, result) in pending.into_iter().zip(results) {
            match result {
                Ok((StatusCode::OK, _)) => {}
                Ok((status, body)) => {
                    errors.push(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&body).trim()
                    ));
                    still.push(item);
                }
                Err(e) => {
                    errors.push(format!("{e:#}"));
                    still.push(item);
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let list: Vec<String> = pending
                .iter()
                .zip(&errors)
                .map(|((what, addr, path), err)| format!("  {what} (http://{addr}{path}): {err}"))
                .collect();
            anyhow::bail!(
                "not ready after {}s:\n{}\nsee the logs for details",
                READY_TIMEOUT.as_secs(),
                list.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Awaits all futures concurrently (they are few and short), in order.
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (f, slot) in pinned.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    done.into_iter().map(|o| o.expect("all done")).collect()
}

fn print_banner(plan: &PortPlan, config: &ConfigSource, work: &Path, rps: u32, managed: bool) {
    let web = plan.slot("web");
    let v1 = plan.slot("checkout-v1");
    let catalog = plan.slot("catalog");
    let broken = plan.slot(plan::BROKEN);
    let mut out = String::new();
    out.push_str("\nThe Tern demo mesh is up:\n\n");
    out.push_str(&format!(
        "  {:<13} {:<17} {:<17} {:<17} {}\n",
        "NAME", "APP", "SIDECAR OUTBOUND", "SIDECAR INBOUND", "SIDECAR ADMIN"
    ));
    for s in &plan.slots {
        let app = if s.has_app {
            s.app.to_string()
        } else {
            "(traffic gen.)".into()
        };
        out.push_str(&format!(
            "  {:<13} {:<17} {:<17} {:<17} {}{}\n",
            s.name,
            app,
            s.outbound.to_string(),
            s.inbound.to_string(),
            s.admin,
            if s.name == plan::BROKEN {
                "   <- broken: fails every request"
            } else {
                ""
            }
        ));
    }
    out.push_str(
        "\n(the inventory Service has three endpoints: inventory-a, -b and -c, one per zone)\n",
    );
    if managed {
        out.push_str(&format!(
            "\ntern-control: gRPC {}, admin {} (it watches the config and pushes each sidecar \
             its part;\n  `ternctl status --control-plane {}` shows every sidecar's version, ACK \
             and certificate)\n\
             Identity: CA in {} (trust domain {}); each sidecar certifies as \
             spiffe://{}/ns/{}/sa/<app> with its token from {}\n",
            plan.control,
            plan.control_admin,
            plan.control_admin,
            work.join("ca").display(),
            tern_control::ca::DEFAULT_TRUST_DOMAIN,
            tern_control::ca::DEFAULT_TRUST_DOMAIN,
            NAMESPACE,
            work.join("tokens").display()
        ));
    }
    let routes = config.dir().join("routes.yaml");
    out.push('\n');
    match config {
        ConfigSource::InPlace(dir) => out.push_str(&format!(
            "Config: {} (watched: edits apply live)\n",
            dir.display()
        )),
        ConfigSource::Rewritten { from, to } => out.push_str(&format!(
            "Config: {} copied to {} with ports rewritten for --base-port {}\n        \
             (edit the copy to change routing live)\n",
            from.display(),
            to.display(),
            plan.base
        )),
        ConfigSource::Embedded(dir) => out.push_str(&format!(
            "Config: examples/demo not found; the built-in example was written to {}\n        \
             (edit it to change routing live)\n",
            dir.display()
        )),
    }
    out.push_str(&format!("Logs:   {}\n", work.display()));
    if rps > 0 {
        out.push_str(&format!(
            "Traffic: ~{rps} requests/s from web through its sidecar ({}).\n",
            web.outbound
        ));
    }
    out.push_str(&format!(
        "\nThings to try (in another terminal):\n\
         \x20 Send a request through the mesh, as web would:\n\
         \x20   curl -si -H 'Host: checkout.shop:8080' http://{wo}/api/items\n\
         \x20   http_proxy=http://{wo} curl -si http://checkout.shop:8080/api/items\n\
         \x20   curl -si -H 'Host: checkout.shop:8080' -H 'x-canary: 1' http://{wo}/api/items\n\
         \x20 Make checkout-v1 fail half its requests, then heal it:\n\
         \x20   curl -X POST 'http://{v1}/control?fail=0.5'\n\
         \x20   curl -X POST 'http://{v1}/control?fail=0'\n\
         \x20 Slow catalog down: curl -X POST 'http://{cat}/control?latency_ms=200'\n\
         \x20 Watch web's circuit breakers eject the broken inventory-c, then heal it:\n\
         \x20   {me} circuits --admin {wa}\n\
         \x20   curl -X POST 'http://{bad}/control?fail=0'\n\
         \x20 Shift the canary: edit the weights (90/10) in {routes} and save.\n\
         \x20 Look inside a sidecar: curl http://{wa}/config  (or /metrics)\n\
         Ctrl-C stops everything.\n",
        wo = web.outbound,
        wa = web.admin,
        v1 = v1.app,
        cat = catalog.app,
        bad = broken.app,
        me = ternctl_command(),
        routes = routes.display(),
    ));
    let _ = say(&out);
}

/// How the user ran ternctl (e.g. `./target/release/ternctl`), to suggest commands.
fn ternctl_command() -> String {
    std::env::args()
        .next()
        .filter(|a| !a.is_empty() && !a.contains(char::is_whitespace))
        .unwrap_or_else(|| "ternctl".into())
}

/// Scrapes every sidecar each second and redraws the summary until the duration expires or a
/// child dies (signals are handled by the caller).
async fn live_table(
    args: &Args,
    plan: &PortPlan,
    work: &Path,
    procs: &mut Procs,
    stats: &Mutex<traffic::GenStats>,
) -> anyhow::Result<Stop> {
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs(d));
    let tty = std::io::stdout().is_terminal();
    let mut histories: Vec<metrics::History> = plan
        .slots
        .iter()
        .map(|_| metrics::History::default())
        .collect();
    // Per sidecar: the reload counters last seen, and whether its latest reload was refused.
    let mut reload_state: Vec<(Option<summary::Reloads>, bool)> =
        vec![(None, false); plan.slots.len()];
    let mut drawn = 0usize;
    let mut retried_routes = std::collections::BTreeSet::new();
    let circuits_hint = format!(
        "All: {} circuits --admin {}",
        ternctl_command(),
        plan.slot("web").admin
    );
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if !tty && say("\n").is_err() {
        return Ok(Stop::OutputClosed);
    }
    loop {
        ticker.tick().await;
        if let Some(e) = died(procs) {
            return Err(e);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Stop::Duration);
        }
        let web_admin = plan.slot("web").admin;
        let (scrapes, circuits) = tokio::join!(
            futures_join_all(plan.slots.iter().map(|s| scrape(s.admin))),
            crate::circuits::fetch_raw(web_admin, SCRAPE_TIMEOUT),
        );
        let circuits: summary::CircuitsView = circuits
            .and_then(|body| crate::circuits::parse(&body))
            .map_err(|e| format!("{e:#}"));
        let now = Instant::now();
        let mut views = Vec::new();
        let mut web_routes = None;
        let mut web_retries = Vec::new();
        let mut web_error = None;
        let mut window_secs = 1.0;
        for ((slot, (history, (last_reloads, refusing))), (version, metrics)) in plan
            .slots
            .iter()
            .zip(histories.iter_mut().zip(reload_state.iter_mut()))
            .zip(scrapes)
        {
            let mut view = SidecarView {
                name: slot.name.to_string(),
                version,
                outbound: None,
                inbound: None,
                reloads: None,
                metrics_error: None,
            };
            match metrics {
                Ok(samples) => {
                    let now_reloads = summary::reloads(&samples);
                    if let Some(prev) = *last_reloads {
                        if now_reloads.refused > prev.refused {
                            *refusing = true;
                        } else if now_reloads.applied > prev.applied {
                            *refusing = false;
                        }
                    }
                    *last_reloads = Some(now_reloads);
                    view.reloads = Some(now_reloads);
                    history.push(now, samples, WINDOW_SCRAPES);
                    if let Some((window, secs)) = history.window() {
                        view.outbound = Some(summary::direction_counts(&window, "outbound"));
                        view.inbound = Some(summary::direction_counts(&window, "inbound"));
                        if slot.name == "web" {
                            web_routes = Some(summary::route_rows(&window, "outbound"));
                            web_retries = summary::retry_rows(&window, "outbound");
                            // Once a route has retried, keep its row (retries stop while a
                            // broken endpoint is ejected, and that is worth seeing too).
                            retried_routes.extend(
                                web_retries
                                    .iter()
                                    .filter(|r| r.retried())
                                    .map(|r| r.route.clone()),
                            );
                            web_retries.retain(|r| retried_routes.contains(&r.route));
                            window_secs = secs;
                        }
                    }
                }
                Err(e) => {
                    if slot.name == "web" {
                        web_error = Some(e.clone());
                    }
                    view.metrics_error = Some(e);
                }
            }
            views.push(view);
        }
        let web_version = match &views[0].version {
            Ok(v) => v.clone(),
            Err(_) => "unknown".into(),
        };
        let elapsed = started.elapsed().as_secs();
        let until = match args.duration {
            Some(d) => format!("stops after {d}s"),
            None => "Ctrl-C stops".into(),
        };
        let header = format!(
            "Tern demo | {elapsed}s | web's config version {web_version} | rates over the last {:.0}s | {until}",
            window_secs
        );
        let mut footer = generator_footer(stats, args.rps);
        let refused: Vec<&str> = plan
            .slots
            .iter()
            .zip(&reload_state)
            .filter(|(_, r)| r.1)
            .map(|(s, _)| s.name)
            .collect();
        if let Some(first) = refused.first() {
            footer.push(format!(
                "config edit refused by {} (still serving the previous version); why: {}",
                if refused.len() == plan.slots.len() {
                    "every sidecar".to_string()
                } else {
                    refused.join(", ")
                },
                procs::log_path(work, &format!("{first}-sidecar")).display()
            ));
        }
        let lines = summary::render(&summary::Page {
            header: &header,
            routes: web_routes.as_deref(),
            web_error: web_error.as_deref(),
            window_secs,
            retries: &web_retries,
            circuits: Some(&circuits),
            now_ms: crate::circuits::now_unix_ms(),
            color: tty && std::env::var_os("NO_COLOR").is_none(),
            circuits_hint: &circuits_hint,
            sidecars: &views,
            footer: &footer,
        });
        let mut out = String::new();
        if tty {
            if drawn > 0 {
                // Back to the top of the previous table, then clear below.
                out.push_str(&format!("\x1b[{drawn}F"));
            }
            out.push_str("\x1b[J");
        }
        for l in &lines {
            out.push_str(l);
            out.push('\n');
        }
        if !tty {
            out.push('\n');
        }
        drawn = lines.len();
        if say(&out).is_err() {
            return Ok(Stop::OutputClosed);
        }
    }
}

fn generator_footer(stats: &Mutex<traffic::GenStats>, rps: u32) -> Vec<String> {
    if rps == 0 {
        return vec!["traffic generator off (--rps 0)".into()];
    }
    let s = stats.lock().expect("stats lock").clone();
    let mut lines = vec![format!(
        "traffic generator (web): {} sent, {} ok, {} HTTP errors, {} without an answer",
        s.sent, s.ok, s.http_errors, s.transport_errors
    )];
    if s.retried > 0 {
        lines.push(format!(
            "  {} answers took more than one attempt (tern-attempts > 1)",
            s.retried
        ));
    }
    if s.skipped > 0 {
        lines.push(format!(
            "  {} requests skipped: too many in flight (the mesh is slower than --rps {rps})",
            s.skipped
        ));
    }
    if let Some((status, e)) = &s.last_tern_error {
        lines.push(format!("  last proxy error: {status} tern-error: {e}"));
    }
    if let Some(e) = &s.last_transport_error {
        lines.push(format!("  last connection error: {e}"));
    }
    lines
        .into_iter()
        .map(|l| l.chars().take(110).collect())
        .collect()
}

type Scrape = (Result<String, String>, Result<Vec<metrics::Sample>, String>);

/// A sidecar's config version (from /config) and metrics (from /metrics).
async fn scrape(admin: SocketAddr) -> Scrape {
    let version = async {
        let (status, body) = crate::client::get(admin, "/config", SCRAPE_TIMEOUT).await?;
        anyhow::ensure!(status == StatusCode::OK, "/config answered {status}");
        let json: serde_json::Value =
            serde_json::from_slice(&body).context("/config is not JSON")?;
        Ok(match &json["version"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "(none)".into(),
            other => other.to_string(),
        })
    };
    let samples = async {
        let (status, body) = crate::client::get(admin, "/metrics", SCRAPE_TIMEOUT).await?;
        anyhow::ensure!(status == StatusCode::OK, "/metrics answered {status}");
        Ok(metrics::parse(&String::from_utf8_lossy(&body)))
    };
    let (v, m) = tokio::join!(version, samples);
    (
        v.map_err(|e: anyhow::Error| format!("{e:#}")),
        m.map_err(|e: anyhow::Error| format!("{e:#}")),
    )
}
