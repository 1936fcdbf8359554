//! ternctl: Tern's command-line tool.
//!
//! - `ternctl validate DIR`: check a config directory, print every error and warning.
//! - `ternctl demo`: run a small local mesh (demo apps, one tern-proxy each, traffic).
//! - `ternctl circuits`: a sidecar's per-endpoint circuit breakers (its admin `/circuits`).
//! - `ternctl status`: every sidecar of a tern-control, its config version and ACK state.
//! - `ternctl ca`: a local CA (`init`), bootstrap tokens (`token`), anchor bundles.

mod ca;
mod circuits;
mod client;
mod demo;
mod status;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ternctl", version, about = "Tern service mesh CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config directory: print every error and warning, exit 1 on any error.
    Validate(validate::Args),
    /// Run a local mesh on this machine: demo apps, a tern-proxy per app, and traffic.
    Demo(demo::Args),
    /// Show a sidecar's circuit breakers: per backend endpoint, its state (closed, open,
    /// half_open), why, since when, the next probe and recent successes/failures.
    Circuits(circuits::Args),
    /// Show every sidecar connected to a tern-control: applied and pushed config
    /// versions, ACK state, last ACK and NACK reason; NACKed and stale ones stand out.
    Status(status::Args),
    /// A local CA for tern-control (`init`), sidecar bootstrap tokens (`token`), and
    /// anchor bundles for a rotation (`bundle`).
    Ca(ca::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => validate::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Circuits(args) => circuits::run(args),
        Command::Status(args) => status::run(args),
        Command::Ca(args) => ca::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ternctl: {err:#}");
            ExitCode::from(2)
        }
    }
}
