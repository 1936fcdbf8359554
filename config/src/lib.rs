//! tern-config: the contract between Tern's control plane and its sidecars.
//!
//! Users write Kubernetes-style YAML (Service, EndpointSlice, HTTPRoute, GRPCRoute and
//! Tern's BackendPolicy, RateLimitPolicy, ConcurrencyPolicy and AuthorizationPolicy). This
//! crate parses it with source locations ([`yaml`], the only module that touches a YAML
//! library), decodes it into typed resources ([`decode`], [`model`]) held in a
//! [`resources::Resources`] set, checks it ([`validate`]) with diagnostics that name
//! `file:line:column` and the field path, and compiles it ([`compile`]) into an
//! immutable, lookup-ready [`snapshot::Snapshot`] with a content version. It has no async
//! runtime dependency.
//!
//! Workload identity (mTLS): [`identity::SpiffeId`]; a Service's `tern.dev/mtls-mode`
//! ([`snapshot::MtlsMode`]), the identity an EndpointSlice's endpoints must present
//! (`tern.dev/service-account`, [`snapshot::EndpointIdentity`]), who may call a Service or
//! route ([`snapshot::Authorization`], decided per request by [`snapshot::authorize`]) and
//! the Service port of a dialled address ([`Snapshot::resolve_addr`]).

pub mod compile;
pub mod decode;
pub mod diag;
pub mod identity;
pub mod model;
pub mod resources;
pub mod snapshot;
pub mod validate;
pub mod yaml;

use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Severity};
pub use resources::Resources;
pub use snapshot::Snapshot;

/// A compiled config: the snapshot and the warnings found on the way.
#[derive(Debug)]
pub struct Compiled {
    pub snapshot: Snapshot,
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every diagnostic (errors and warnings), in file/line order.
    #[error("{}", invalid_message(diagnostics))]
    Invalid { diagnostics: Vec<Diagnostic> },
}

fn invalid_message(diags: &[Diagnostic]) -> String {
    let mut s = format!("invalid config: {}", counts(diags));
    for d in diags {
        s.push('\n');
        s.push_str(&d.to_string());
    }
    s
}

/// Lowercase hex of `bytes` (content versions, issuer ids, digests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `2 errors, 1 warning`.
pub fn counts(diags: &[Diagnostic]) -> String {
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    format!(
        "{}, {}",
        plural(errors, "error"),
        plural(warnings, "warning")
    )
}

/// Loads every `*.yaml` / `*.yml` file of `dir` (not recursive, sorted by name) and
/// compiles them. An empty directory gives an empty snapshot.
pub fn load_dir(dir: &Path) -> Result<Compiled, ConfigError> {
    load_sources(&read_dir_sources(dir)?)
}

/// Compiles in-memory sources: (display file name, YAML text) pairs. When an object is
/// defined twice, the first one in `sources` order wins and the second is an error.
pub fn load_sources(sources: &[(String, String)]) -> Result<Compiled, ConfigError> {
    let Checked {
        resources,
        diagnostics,
    } = check_sources(sources);
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Err(ConfigError::Invalid { diagnostics });
    }
    Ok(Compiled {
        snapshot: compile::compile(&resources),
        warnings: diagnostics,
    })
}

/// The result of parsing and validating sources, before compilation.
#[derive(Debug)]
pub struct Checked {
    /// Every object that decoded (the first of any duplicates), valid or not.
    pub resources: Resources,
    /// Errors and warnings in file/line order.
    pub diagnostics: Vec<Diagnostic>,
}

/// Parses, decodes and validates sources without compiling them.
pub fn check_sources(sources: &[(String, String)]) -> Checked {
    let mut diagnostics = Vec::new();
    let mut resources = Resources::new();
    for (file, text) in sources {
        for obj in decode::decode_file(file, text, &mut diagnostics) {
            if let Some(first) = resources.get(&obj.key()) {
                let at = first.source.loc("metadata.name");
                let msg = format!(
                    "duplicate {} (first defined at {}:{at})",
                    obj.key(),
                    first.source.file
                );
                diag::Sink {
                    file,
                    diags: &mut diagnostics,
                }
                .error(obj.source.loc("metadata.name"), "metadata.name", msg);
                continue;
            }
            resources.apply(obj);
        }
    }
    diagnostics.extend(validate::validate(&resources));
    diag::sort(&mut diagnostics);
    Checked {
        resources,
        diagnostics,
    }
}

/// Reads the `*.yaml` / `*.yml` files of `dir` (not recursive), sorted by name, as
/// (file name, text) pairs.
/// Splits a YAML file into its documents (at `---` lines), keeping each document's text
/// as written, with its 1-based position in the file. Empty documents are skipped.
///
/// The control plane ships documents one by one (a sidecar gets only those it needs);
/// each still parses on its own exactly as it did inside the file.
pub fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut offset) = (0, 0);
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker || bare == "..." {
            docs.push(&text[start..offset]);
            // Whatever follows `---` on its line belongs to the next document.
            start = if marker && bare != "---" {
                offset + 3
            } else {
                offset + line.len()
            };
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs.into_iter()
        .enumerate()
        .map(|(i, d)| (i + 1, d))
        .filter(|(_, d)| !is_blank_document(d))
        .collect()
}

fn is_blank_document(doc: &str) -> bool {
    doc.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l.starts_with('%')
    })
}

/// Whether a change to `path` can change the config of a watched directory: a YAML file,
/// or the `..data` symlink Kubernetes swaps when a mounted ConfigMap changes. Other files
/// (a log written into the directory, an editor's swap file) are not.
pub fn is_config_path(path: &Path) -> bool {
    let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
    let configmap = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(".."));
    yaml || configmap
}

/// True for a watcher event that can change a watched config directory: a change to a
/// YAML file or to the `..data` symlink (see [`is_config_path`]). Our own reads (access
/// events) are ignored. Shared by the proxy's and the control plane's file watchers.
pub fn is_config_change(event: &notify::Event) -> bool {
    use notify::EventKind;
    let kind = matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any
    );
    kind && event.paths.iter().any(|p| is_config_path(p))
}

pub fn read_dir_sources(dir: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfigError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if is_yaml && path.is_file() {
            files.push((entry.file_name().to_string_lossy().into_owned(), path));
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|(name, path)| {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            Ok((name, text))
        })
        .collect()
}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod split_tests {
    use super::split_documents;

    #[test]
    fn documents_keep_their_text_and_position() {
        let text = "# header\n---\na: 1\n---\n\n--- # third\nb: 2\n...\nc: 3\n";
        let docs = split_documents(text);
        assert_eq!(
            docs,
            vec![(2, "a: 1\n"), (4, " # third\nb: 2\n"), (5, "c: 3\n")]
        );
        assert_eq!(split_documents("x: 1"), vec![(1, "x: 1")]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::EventKind;
    use notify::event::{AccessKind, CreateKind, ModifyKind};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(path.into())
    }

    #[test]
    fn only_yaml_and_configmap_changes_count() {
        let modify = EventKind::Modify(ModifyKind::Any);
        assert!(is_config_change(&event(modify, "/c/routes.yaml")));
        assert!(is_config_change(&event(modify, "/c/routes.yml")));
        assert!(is_config_change(&event(modify, "/c/..data")));
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
