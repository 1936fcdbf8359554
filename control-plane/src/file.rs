//! The file source: a config directory (the same YAML as the proxy's file mode), watched
//! for changes. Every document of every `*.yaml` / `*.yml` file becomes one document of
//! the index, named `file.yaml#N`.
//!
//! The whole directory is validated with real file positions first; when it has errors
//! they are logged (`file:line:column: field: what is wrong`) and counted, and the last
//! good snapshot stays published.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tern_config::{ConfigError, Diagnostic};

use crate::index::{Index, IndexError, Published};
use crate::metrics::Metrics;

/// How long the directory must be quiet before it is read after a change.
const SETTLE: Duration = Duration::from_millis(50);

/// A source of config: it applies and deletes documents in an [`Index`] and publishes,
/// for as long as it runs. The file source is one; a Kubernetes watcher will be another.
pub trait Source: Send + 'static {
    fn run(self, index: Index) -> impl Future<Output = Result<(), SourceError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("watching the config directory: {0}")]
    Watch(#[from] notify::Error),
    #[error("config load task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A watched config directory.
#[derive(Debug, Clone)]
pub struct FileSource {
    pub dir: PathBuf,
    pub metrics: Arc<Metrics>,
}

/// Reads and validates the directory (blocking).
fn read_checked(dir: &Path) -> Result<Vec<(String, String)>, SourceError> {
    let sources = tern_config::read_dir_sources(dir)?;
    let checked = tern_config::check_sources(&sources);
    if checked.diagnostics.iter().any(Diagnostic::is_error) {
        return Err(ConfigError::Invalid {
            diagnostics: checked.diagnostics,
        }
        .into());
    }
    for w in &checked.diagnostics {
        tracing::warn!("config: {w}");
    }
    Ok(sources)
}

/// Replaces the index's documents with those of `sources` and publishes.
pub fn sync_index(
    index: &mut Index,
    sources: &[(String, String)],
) -> Result<Published, IndexError> {
    let mut seen = BTreeSet::new();
    for (file, text) in sources {
        for (n, doc) in tern_config::split_documents(text) {
            let name = format!("{file}#{n}");
            index.apply(&name, doc)?;
            seen.insert(name);
        }
    }
    let gone: Vec<String> = index
        .names()
        .filter(|n| !seen.contains(*n))
        .map(str::to_string)
        .collect();
    for name in gone {
        index.delete(&name);
    }
    index.publish()
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>, metrics: Arc<Metrics>) -> FileSource {
        FileSource {
            dir: dir.into(),
            metrics,
        }
    }

    fn log(&self, result: &Result<Published, SourceError>, generation_before: u64) {
        match result {
            Ok(p) if p.generation != generation_before => {
                self.metrics.reload(true);
                tracing::info!(
                    generation = p.generation,
                    documents = p.documents,
                    "config published"
                );
            }
            Ok(_) => tracing::debug!("config unchanged"),
            Err(e) => tracing::error!("config refused; still serving the last good config:\n{e}"),
        }
    }
}

impl Source for FileSource {
    async fn run(self, mut index: Index) -> Result<(), SourceError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(event) = res
                    && tern_config::is_config_change(&event)
                {
                    let _ = tx.try_send(());
                }
            })?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        let before = index.current().generation;
        let first = self.load(&mut index).await;
        self.log(&first, before);
        while rx.recv().await.is_some() {
            index.mark_changed();
            // Writes come in bursts (truncate, write, rename): a half-written file must
            // not be published as a valid, emptier config.
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            let before = index.current().generation;
            let result = self.load(&mut index).await;
            self.log(&result, before);
        }
        Ok(())
    }
}

impl FileSource {
    /// Loads the directory into `index` and publishes it. On error the last good
    /// snapshot stays published; the error is counted and returned.
    pub async fn load(&self, index: &mut Index) -> Result<Published, SourceError> {
        let dir = self.dir.clone();
        let result = match tokio::task::spawn_blocking(move || read_checked(&dir)).await? {
            Ok(sources) => sync_index(index, &sources).map_err(SourceError::from),
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.metrics.reload(false);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_follow_the_files() {
        let mesh = include_str!("../tests/data/mesh.yaml");
        let mut index = Index::new();
        let p = sync_index(&mut index, &[("mesh.yaml".into(), mesh.into())]).unwrap();
        assert_eq!(p.generation, 1);
        let snap = index.current();
        assert!(snap.docs.contains_key("mesh.yaml#1"));
        let n = snap.docs.len();
        // Drop the last document: it goes away.
        let cut = mesh.rfind("---").unwrap();
        sync_index(&mut index, &[("mesh.yaml".into(), mesh[..cut].into())]).unwrap();
        assert_eq!(index.current().docs.len(), n - 1);
        assert_eq!(index.current().generation, 2);
    }
}
