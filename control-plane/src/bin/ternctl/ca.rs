//! `ternctl ca`: a local CA for tern-control.
//!
//! - `ternctl ca init --dir DIR`: a fresh anchor and issuer (ECDSA P-256) for `--ca-dir`.
//! - `ternctl ca token --tokens FILE --namespace NS --service-account SA`: a new
//!   bootstrap token, appended to the tokens file and printed.
//! - `ternctl ca bundle OUT IN...`: the certificates of several anchors files in one, for
//!   an anchor rotation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tern_control::auth::{self, Subject};
use tern_control::ca::{self, Lifetimes};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Write a fresh trust anchor and issuer into DIR (anchors.pem, anchor.key, issuer.crt,
    /// issuer.key; keys 0600), for `tern-control --ca-dir DIR`.
    Init(InitArgs),
    /// Append a new random token for a namespace and service account to a tokens file
    /// (created if missing) and print it.
    Token(TokenArgs),
    /// Write the certificates of every IN file into OUT (e.g. old + new anchors.pem).
    Bundle(BundleArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    #[arg(long, default_value = ca::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of the trust anchor (s, m, h, d, y).
    #[arg(long, default_value = "1y", value_parser = ca::parse_lifetime)]
    anchor_lifetime: Duration,
    /// Lifetime of the issuer (at most the anchor's).
    #[arg(long, default_value = "90d", value_parser = ca::parse_lifetime)]
    issuer_lifetime: Duration,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The tokens file (tern-control --tokens).
    #[arg(long, value_name = "FILE")]
    tokens: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    service_account: String,
    /// Restrict the token to this workload (instance) name.
    #[arg(long)]
    workload: Option<String>,
}

#[derive(clap::Args)]
struct BundleArgs {
    /// Output file (written atomically; may be one of the inputs).
    out: PathBuf,
    /// PEM files whose certificates go into OUT, in order; duplicates are dropped.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Init(a) => init(&a),
        Command::Token(a) => token(&a),
        Command::Bundle(a) => bundle(&a.out, &a.inputs),
    }
}

/// Generates a CA into `dir` (the demo does this too).
pub fn init_dir(dir: &Path, trust_domain: &str, lifetimes: Lifetimes) -> anyhow::Result<()> {
    let generated = ca::generate(trust_domain, lifetimes, SystemTime::now())?;
    ca::write_dir(dir, &generated)?;
    Ok(())
}

fn init(a: &InitArgs) -> anyhow::Result<ExitCode> {
    let lifetimes = Lifetimes {
        anchor: a.anchor_lifetime,
        issuer: a.issuer_lifetime,
    };
    init_dir(&a.dir, &a.trust_domain, lifetimes)?;
    let issuer = std::fs::read(a.dir.join(ca::ISSUER_CERT_FILE))?;
    let der = CertificateDer::from_pem_slice(&issuer).context("reading back issuer.crt")?;
    println!(
        "CA for trust domain {} written to {} (issuer_id {}).\n\
         Run tern-control with --ca-dir {} --tokens FILE; keep anchor.key offline.",
        a.trust_domain,
        a.dir.display(),
        ca::issuer_id(&der),
        a.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn token(a: &TokenArgs) -> anyhow::Result<ExitCode> {
    let subject = Subject {
        namespace: a.namespace.clone(),
        service_account: a.service_account.clone(),
        workload: a.workload.clone(),
    };
    tern_config::identity::SpiffeId::new(
        ca::DEFAULT_TRUST_DOMAIN,
        &a.namespace,
        &a.service_account,
    )
    .context("the namespace and service account must be valid names")?;
    let token = auth::append_token(&a.tokens, &subject)?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn bundle(out: &Path, inputs: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut text = String::new();
    for input in inputs {
        let pem = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.with_context(|| format!("{}: not PEM", input.display()))?;
            found += 1;
            if seen.iter().any(|s| s.as_slice() == cert.as_ref()) {
                continue;
            }
            text.push_str(&pem_certificate(cert.as_ref()));
            seen.push(cert.as_ref().to_vec());
        }
        anyhow::ensure!(found > 0, "{}: no certificate in it", input.display());
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    println!("{}: {} certificates", out.display(), seen.len());
    Ok(ExitCode::SUCCESS)
}

/// One certificate as PEM, 64 base64 characters a line.
fn pem_certificate(der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_token_and_bundle() {
        let root = std::env::temp_dir().join(format!("ternctl-ca-{}", fastrand::u64(..)));
        let (a, b) = (root.join("a"), root.join("b"));
        init_dir(&a, "cluster.local", Lifetimes::default()).unwrap();
        init_dir(&b, "cluster.local", Lifetimes::default()).unwrap();
        assert!(init_dir(&a, "cluster.local", Lifetimes::default()).is_err());
        let out = root.join("both.pem");
        bundle(
            &out,
            &[
                a.join("anchors.pem"),
                b.join("anchors.pem"),
                a.join("anchors.pem"),
            ],
        )
        .unwrap();
        let both = std::fs::read(&out).unwrap();
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&both)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs.len(), 2);
        let first = std::fs::read(a.join("anchors.pem")).unwrap();
        assert_eq!(
            certs[0].as_ref(),
            CertificateDer::from_pem_slice(&first).unwrap().as_ref()
        );
        // The bundle serves as anchors.pem for b's issuer.
        std::fs::copy(&out, b.join("anchors.pem")).unwrap();
        let loaded = ca::Ca::load(&b, "cluster.local", ca::DEFAULT_CERT_LIFETIME).unwrap();
        assert_eq!(loaded.anchors_der().len(), 2);

        let tokens = root.join("tokens.yaml");
        let t = token(&TokenArgs {
            tokens: tokens.clone(),
            namespace: "shop".into(),
            service_account: "web".into(),
            workload: None,
        });
        assert!(t.is_ok());
        assert!(
            token(&TokenArgs {
                tokens,
                namespace: "Shop!".into(),
                service_account: "web".into(),
                workload: None,
            })
            .is_err()
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn pem_lines() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = pem_certificate(&der);
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
        for n in [1usize, 2, 3, 4, 47, 48, 49] {
            let d = &der[..n];
            let back = CertificateDer::from_pem_slice(pem_certificate(d).as_bytes()).unwrap();
            assert_eq!(back.as_ref(), d);
        }
    }
}
