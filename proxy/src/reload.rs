//! Hot reload from the config directory. A valid change swaps the snapshot atomically; an
//! invalid one is refused with its exact errors logged and counted, and the last good
//! snapshot keeps serving. The control-plane client ([`crate::control`]) ends in the same
//! `Shared::apply`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tern_config::{Compiled, ConfigError};

use crate::state::Shared;

/// Writes arrive in bursts (editors write, rename and chmod): wait for quiet first.
const SETTLE: Duration = Duration::from_millis(100);

/// Loads the directory and applies or refuses the result.
pub fn apply(shared: &Shared, result: Result<Compiled, ConfigError>) {
    match result {
        Ok(compiled) => {
            for warning in &compiled.warnings {
                tracing::warn!("config: {warning}");
            }
            let version = compiled.snapshot.version.clone();
            if shared.apply(compiled.snapshot) {
                shared.metrics.reload(true);
                tracing::info!(%version, "config applied");
            }
        }
        Err(err) => {
            shared.metrics.reload(false);
            tracing::error!(
                "config refused; still serving version {}:\n{err}",
                shared.version().as_deref().unwrap_or("(none)")
            );
        }
    }
}

/// Watches the config directory `dir` until the process ends.
pub async fn watch(shared: Arc<Shared>, dir: PathBuf) -> Result<(), notify::Error> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && tern_config::is_config_change(&event)
        {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    while rx.recv().await.is_some() {
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || tern_config::load_dir(&d)).await {
            Ok(result) => apply(&shared, result),
            Err(err) => tracing::error!(%err, "config load task failed"),
        }
    }
    Ok(())
}
