//! Who is asking: sidecars present a token (in `Hello.token` and `CertifyRequest.token`)
//! and an [`Authenticator`] turns it into a [`Subject`], the namespace and service account
//! (and optionally the workload) the token stands for.
//!
//! [`TokenFile`] is the local implementation (`--tokens FILE`). In a cluster, an
//! implementation that sends the ServiceAccount token to the API server's TokenReview
//! plugs in behind the same trait (see docs/identity.md).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use yaml_rust2::{Yaml, YamlLoader};

/// What a token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub namespace: String,
    pub service_account: String,
    /// When set, the token is good for this workload (instance) only.
    pub workload: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is unknown, expired or empty (UNAUTHENTICATED).
    #[error("unknown token")]
    Unknown,
    /// The authenticator could not decide (e.g. the API server is down): UNAVAILABLE.
    #[error("cannot check the token now: {0}")]
    Unavailable(String),
}

/// Turns a token into the identity it stands for.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + std::fmt::Debug + 'static {
    async fn authenticate(&self, token: &str) -> Result<Subject, AuthError>;
}

/// Why a request's claimed identity does not match its token (PERMISSION_DENIED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token is for {what} {token:?}, the request says {request:?}")]
pub struct Mismatch {
    pub what: &'static str,
    pub token: String,
    pub request: String,
}

impl Subject {
    /// Checks that a request for `namespace`/`service_account` (by `workload`) is what
    /// this subject may ask for.
    pub fn permits(
        &self,
        namespace: &str,
        service_account: &str,
        workload: &str,
    ) -> Result<(), Mismatch> {
        let check = |what, token: &str, request: &str| {
            if token == request {
                Ok(())
            } else {
                Err(Mismatch {
                    what,
                    token: token.to_string(),
                    request: request.to_string(),
                })
            }
        };
        check("namespace", &self.namespace, namespace)?;
        check("service account", &self.service_account, service_account)?;
        if let Some(w) = &self.workload {
            check("workload", w, workload)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// One entry of a tokens file, with its token only as a SHA-256 digest.
#[derive(Debug, Clone)]
struct Entry {
    digest: [u8; 32],
    subject: Subject,
}

/// A tokens file: a YAML list of
/// `- {token: ..., namespace: shop, serviceAccount: web, workload: web-1}` (workload
/// optional), reloaded when it changes ([`TokenFile::watch`]).
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    entries: RwLock<Arc<Vec<Entry>>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equality in time independent of where the inputs differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses the text of a tokens file.
fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, TokensError> {
    let invalid = |reason: String| TokensError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let docs = YamlLoader::load_from_str(text).map_err(|e| invalid(e.to_string()))?;
    let items = match docs.first() {
        None | Some(Yaml::Null) => return Ok(Vec::new()),
        Some(Yaml::Array(items)) => items,
        Some(_) => {
            return Err(invalid(
                "expected a list of {token, namespace, serviceAccount}".into(),
            ));
        }
    };
    let mut entries: Vec<Entry> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let n = i + 1;
        let field = |name: &str| match &item[name] {
            Yaml::String(s) if !s.is_empty() => Ok(Some(s.clone())),
            Yaml::BadValue | Yaml::Null => Ok(None),
            _ => Err(invalid(format!(
                "entry {n}: {name} must be a non-empty string"
            ))),
        };
        let required = |name: &str| {
            field(name)?.ok_or_else(|| invalid(format!("entry {n}: {name} is missing")))
        };
        let token = required("token")?;
        let entry = Entry {
            digest: digest(&token),
            subject: Subject {
                namespace: required("namespace")?,
                service_account: required("serviceAccount")?,
                workload: field("workload")?,
            },
        };
        if entries.iter().any(|e| e.digest == entry.digest) {
            return Err(invalid(format!("entry {n}: the same token appears twice")));
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn read(path: &Path) -> Result<String, TokensError> {
    std::fs::read_to_string(path).map_err(|source| TokensError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl TokenFile {
    /// Loads `path`; an invalid file is an error.
    pub fn load(path: &Path) -> Result<TokenFile, TokensError> {
        let entries = parse(path, &read(path)?)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            entries: RwLock::new(Arc::new(entries)),
        })
    }

    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn current(&self) -> Arc<Vec<Entry>> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the file; on error the tokens held stay.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let entries = parse(&self.path, &read(&self.path)?)?;
        let n = entries.len();
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(entries);
        Ok(n)
    }

    /// Re-reads the file whenever its content changes (checked every `every`); an invalid
    /// file is logged and the tokens held stay. Runs until aborted.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut seen = std::fs::read(&self.path).ok();
        loop {
            tokio::time::sleep(every).await;
            let now = std::fs::read(&self.path).ok();
            if now == seen {
                continue;
            }
            seen = now;
            match self.reload() {
                Ok(n) => tracing::info!(path = %self.path.display(), tokens = n, "tokens reloaded"),
                Err(e) => tracing::error!("tokens file refused; keeping the tokens held: {e}"),
            }
        }
    }
}

#[tonic::async_trait]
impl Authenticator for TokenFile {
    async fn authenticate(&self, token: &str) -> Result<Subject, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Unknown);
        }
        let d = digest(token);
        // Every entry is compared, and each comparison takes the same time.
        let mut found = None;
        for e in self.current().iter() {
            if ct_eq(&e.digest, &d) {
                found = Some(e.subject.clone());
            }
        }
        found.ok_or(AuthError::Unknown)
    }
}

/// A fresh random token: 32 bytes, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    crate::ca::random_bytes(&mut b);
    crate::ca::hex(&b)
}

/// The tokens file line for one token (appended by `ternctl ca token`).
pub fn entry_line(token: &str, subject: &Subject) -> String {
    let mut line = format!(
        "- {{token: \"{token}\", namespace: \"{}\", serviceAccount: \"{}\"",
        subject.namespace, subject.service_account
    );
    if let Some(w) = &subject.workload {
        line.push_str(&format!(", workload: \"{w}\""));
    }
    line.push_str("}\n");
    line
}

/// Appends a fresh token for `subject` to the tokens file at `path` (created 0600 if
/// missing) and returns it. The file is checked before and after.
pub fn append_token(path: &Path, subject: &Subject) -> Result<String, TokensError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(TokensError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse(path, &existing)?;
    let token = new_token();
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&entry_line(&token, subject));
    parse(path, &format!("{existing}{text}"))?;
    let write = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    write.map_err(|source| TokensError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(ns: &str, sa: &str, w: Option<&str>) -> Subject {
        Subject {
            namespace: ns.into(),
            service_account: sa.into(),
            workload: w.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn tokens_file_authenticates_and_reloads() {
        let path = std::env::temp_dir().join(format!("tern-tokens-{}.yaml", fastrand::u64(..)));
        let web = append_token(&path, &subject("shop", "web", None)).unwrap();
        let cat = append_token(&path, &subject("shop", "catalog", Some("catalog-1"))).unwrap();
        assert_eq!(web.len(), 64);
        let f = TokenFile::load(&path).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(
            f.authenticate(&web).await.unwrap(),
            subject("shop", "web", None)
        );
        let s = f.authenticate(&cat).await.unwrap();
        assert!(s.permits("shop", "catalog", "catalog-1").is_ok());
        let e = s.permits("shop", "catalog", "catalog-2").unwrap_err();
        assert_eq!(e.what, "workload");
        let e = s.permits("shop", "web", "catalog-1").unwrap_err();
        assert!(e.to_string().contains("service account"), "{e}");
        assert_eq!(f.authenticate("nope").await, Err(AuthError::Unknown));
        assert_eq!(f.authenticate("").await, Err(AuthError::Unknown));

        // A broken file keeps the tokens held.
        std::fs::write(&path, "- {token: x}\n").unwrap();
        assert!(f.reload().is_err());
        assert!(f.authenticate(&web).await.is_ok());
        std::fs::write(&path, entry_line("t2", &subject("a", "b", None))).unwrap();
        assert_eq!(f.reload().unwrap(), 1);
        assert!(f.authenticate(&web).await.is_err());
        assert!(f.authenticate("t2").await.is_ok());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn tokens_file_errors_name_the_entry() {
        let p = Path::new("tokens.yaml");
        assert!(parse(p, "").unwrap().is_empty());
        let e = parse(p, "- {token: a, namespace: shop}\n").unwrap_err();
        assert!(
            e.to_string().contains("entry 1: serviceAccount is missing"),
            "{e}"
        );
        let e = parse(
            p,
            "- {token: a, namespace: s, serviceAccount: w}\n- {token: a, namespace: s, serviceAccount: v}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("entry 2: the same token"), "{e}");
        assert!(parse(p, "token: a\n").is_err());
    }
}
