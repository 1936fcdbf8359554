//! `tern-overload`: an open-loop HTTP/1.1 load generator for the overload benchmark.
//!
//! Sends GETs at a fixed rate whatever the responses do (open loop: a slow server does not
//! slow the offered load, unlike wrk's closed loop), over a pool of keep-alive
//! connections, and reports latency percentiles separately for admitted (2xx) and shed
//! (503) responses as one JSON line. Latency is measured from the request's scheduled
//! start, so queueing in the generator counts against the server (no coordinated
//! omission).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// host:port to send to (the sidecar's outbound listener).
    #[arg(long)]
    target: SocketAddr,
    /// Host header.
    #[arg(long)]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests per second.
    #[arg(long)]
    rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Most requests in flight (the generator's own bound; beyond it a request counts as
    /// "dropped" rather than growing without limit).
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
}

type Sender = http1::SendRequest<Empty<Bytes>>;

#[derive(Default)]
struct Samples {
    ok: Vec<u32>,
    shed: Vec<u32>,
    other: Vec<u32>,
    errors: u64,
    dropped: u64,
}

async fn connect(target: SocketAddr) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

fn percentile(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(f64::from(sorted[i]) / 1000.0)
}

fn summary(mut v: Vec<u32>) -> serde_json::Value {
    v.sort_unstable();
    serde_json::json!({
        "count": v.len(),
        "p50_ms": percentile(&v, 0.50),
        "p99_ms": percentile(&v, 0.99),
        "p999_ms": percentile(&v, 0.999),
        "max_ms": v.last().map(|m| f64::from(*m) / 1000.0),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool: Arc<Mutex<Vec<Sender>>> = Arc::default();
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(args.max_in_flight));
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let total = (args.duration * f64::from(args.rate)) as u64;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let scheduled = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            samples.lock().unwrap().dropped += 1;
            continue;
        };
        let (pool, samples) = (pool.clone(), samples.clone());
        let req = http::Request::get(args.path.as_str())
            .header(http::header::HOST, args.host.as_str())
            .body(Empty::<Bytes>::new())
            .context("request")?;
        let target = args.target;
        tasks.spawn(async move {
            let _permit = permit;
            let sender = pool.lock().unwrap().pop();
            let mut sender = match sender {
                Some(s) => s,
                None => match connect(target).await {
                    Ok(s) => s,
                    Err(_) => {
                        samples.lock().unwrap().errors += 1;
                        return;
                    }
                },
            };
            let result = async {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                resp.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            }
            .await;
            let took = scheduled.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            let mut s = samples.lock().unwrap();
            match result {
                Ok(200..=299) => s.ok.push(took),
                Ok(503) => s.shed.push(took),
                Ok(_) => s.other.push(took),
                Err(_) => {
                    s.errors += 1;
                    return;
                }
            }
            drop(s);
            pool.lock().unwrap().push(sender);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let s = std::mem::take(&mut *samples.lock().unwrap());
    let line = serde_json::json!({
        "rate": args.rate,
        "seconds": elapsed,
        "sent": total - s.dropped,
        "dropped_by_generator": s.dropped,
        "errors": s.errors,
        "admitted": summary(s.ok),
        "shed": summary(s.shed),
        "other": summary(s.other),
    });
    println!("{line}");
    Ok(())
}
