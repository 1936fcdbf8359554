//! Hot reload from the config directory. A valid change swaps the snapshot atomically; an
//! invalid one is refused with its exact errors logged and counted, and the last good
//! snapshot keeps serving. The control-plane client ([`crate::control`]) ends in the same
//! `Shared::apply`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
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

/// True for a change to a YAML file of the directory, or to the `..data` symlink that
/// Kubernetes swaps when a mounted ConfigMap changes. Other files (a log written into the
/// directory, an editor's swap file) and our own reads (access events) are ignored.
fn is_config_change(event: &notify::Event) -> bool {
    let kind = matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    );
    kind && event.paths.iter().any(|p| tern_config::is_config_path(p))
}

/// Watches the config directory `dir` until the process ends.
pub async fn watch(shared: Arc<Shared>, dir: PathBuf) -> Result<(), notify::Error> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && is_config_change(&event)
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

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, ModifyKind};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(path.into())
    }

    #[test]
    fn only_yaml_and_configmap_changes_count() {
        let modify = EventKind::Modify(ModifyKind::Any);
        assert!(is_config_change(&event(modify, "/c/routes.yaml")));
        assert!(is_config_change(&event(modify, "/c/routes.yml")));
        assert!(is_config_change(&event(
            EventKind::Create(CreateKind::Any),
            "/c/..data"
        )));
        assert!(!is_config_change(&event(modify, "/c/proxy.log")));
        assert!(!is_config_change(&event(modify, "/c/.routes.yaml.swp")));
        assert!(!is_config_change(&event(
            EventKind::Access(AccessKind::Any),
            "/c/routes.yaml"
        )));
    }
}
