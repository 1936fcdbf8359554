//! The demo's identities (managed mode): a fresh CA for tern-control in the work
//! directory, and a bootstrap token per sidecar, each in its own file for
//! `tern-proxy --token-file`. Namespace `shop`; the service account is the app's name
//! without its version or instance suffix (`checkout-v1` -> `checkout`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tern_control::auth::{self, Subject};
use tern_control::ca::{self, Lifetimes};

use super::plan::{NAMESPACE, PortPlan};

#[derive(Debug)]
pub struct DemoIdentity {
    pub ca_dir: PathBuf,
    pub tokens: PathBuf,
    token_files: BTreeMap<&'static str, PathBuf>,
}

/// The service account of a demo app: `checkout-v1` -> `checkout`, `inventory-a` ->
/// `inventory`, `web` -> `web`.
pub fn service_account(app: &str) -> &str {
    match app.rsplit_once('-') {
        Some((base, suffix)) if suffix.len() <= 2 => base,
        _ => app,
    }
}

/// Writes `work/ca/` (a fresh CA), `work/tokens.yaml` and `work/tokens/<app>.token`.
pub fn prepare(work: &Path, plan: &PortPlan) -> anyhow::Result<DemoIdentity> {
    let ca_dir = work.join("ca");
    crate::ca::init_dir(&ca_dir, ca::DEFAULT_TRUST_DOMAIN, Lifetimes::default())
        .context("creating the demo CA")?;
    let tokens = work.join("tokens.yaml");
    let token_dir = work.join("tokens");
    std::fs::create_dir_all(&token_dir)
        .with_context(|| format!("creating {}", token_dir.display()))?;
    let mut token_files = BTreeMap::new();
    for slot in &plan.slots {
        let subject = Subject {
            namespace: NAMESPACE.into(),
            service_account: service_account(slot.name).into(),
            workload: Some(slot.name.into()),
        };
        let token = auth::append_token(&tokens, &subject)?;
        let file = token_dir.join(format!("{}.token", slot.name));
        write_private(&file, &token)?;
        token_files.insert(slot.name, file);
    }
    Ok(DemoIdentity {
        ca_dir,
        tokens,
        token_files,
    })
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

impl DemoIdentity {
    /// tern-control's flags for the CA and the tokens, and its gRPC API over TLS.
    pub fn control_args(&self) -> Vec<String> {
        vec![
            "--ca-dir".into(),
            self.ca_dir.to_string_lossy().into_owned(),
            "--tokens".into(),
            self.tokens.to_string_lossy().into_owned(),
            "--serve-tls".into(),
        ]
    }

    /// The anchors sidecars check tern-control's certificate against.
    pub fn anchors(&self) -> PathBuf {
        self.ca_dir.join(ca::ANCHORS_FILE)
    }

    /// A sidecar's flags: its token file and service account, and the anchors for TLS to
    /// tern-control.
    pub fn sidecar_args(&self, app: &'static str) -> Vec<String> {
        let mut args = vec!["--service-account".into(), service_account(app).into()];
        args.extend([
            "--control-plane-anchors".into(),
            self.anchors().to_string_lossy().into_owned(),
        ]);
        if let Some(file) = self.token_files.get(app) {
            args.extend(["--token-file".into(), file.to_string_lossy().into_owned()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_and_files() {
        assert_eq!(service_account("checkout-v1"), "checkout");
        assert_eq!(service_account("inventory-c"), "inventory");
        assert_eq!(service_account("web"), "web");
        assert_eq!(service_account("catalog"), "catalog");

        let work = std::env::temp_dir().join(format!("tern-demo-id-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&work).unwrap();
        let plan = PortPlan::new(super::super::plan::DEFAULT_BASE_PORT).unwrap();
        let id = prepare(&work, &plan).unwrap();
        assert!(
            ca::Ca::load(
                &id.ca_dir,
                ca::DEFAULT_TRUST_DOMAIN,
                ca::DEFAULT_CERT_LIFETIME
            )
            .is_ok()
        );
        assert_eq!(
            auth::TokenFile::load(&id.tokens).unwrap().len(),
            plan.slots.len()
        );
        let args = id.sidecar_args("checkout-v2");
        assert_eq!(args[..2], ["--service-account", "checkout"]);
        assert_eq!(args[2], "--control-plane-anchors");
        assert!(args[3].ends_with("ca/anchors.pem"));
        assert_eq!(args[4], "--token-file");
        let token = std::fs::read_to_string(&args[5]).unwrap();
        assert_eq!(token.len(), 64);
        assert!(id.control_args().contains(&"--serve-tls".to_string()));
        std::fs::remove_dir_all(&work).unwrap();
    }
}
