//! `ternctl validate DIR`: check a config directory the way a sidecar would load it.
//!
//! Prints every diagnostic (errors and warnings), one per line, then a summary. Exit code
//! 1 when there is any error, 0 otherwise; I/O failures propagate (main exits 2).

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Config directory holding *.yaml / *.yml files (not recursive).
    pub dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The error already names the path and its cause; adding it as context would repeat it.
    let sources =
        tern_config::read_dir_sources(&args.dir).map_err(|e| anyhow::anyhow!(e.to_string()))?;
    let checked = tern_config::check_sources(&sources);
    for d in &checked.diagnostics {
        println!("{d}");
    }
    if checked.diagnostics.iter().any(|d| d.is_error()) {
        println!("{}", tern_config::counts(&checked.diagnostics));
        return Ok(ExitCode::from(1));
    }
    let snapshot = tern_config::compile::compile(&checked.resources);
    let warnings = checked.diagnostics.len();
    let resources = checked.resources.len();
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    let mut summary = format!(
        "ok: {}, version {}",
        plural(resources, "resource"),
        snapshot.version
    );
    if warnings > 0 {
        summary.push_str(&format!(", {}", plural(warnings, "warning")));
    }
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
