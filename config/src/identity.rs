//! Workload identity: a SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The control plane's CA writes it into certificates (as the only URI SAN), the sidecars
//! check it on both ends of every mTLS connection, and AuthorizationPolicies name it.

use std::fmt;

/// A parsed SPIFFE ID in Tern's shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("{0:?} is not a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<name>)")]
    Shape(String),
    #[error("{what} {value:?} is not a valid name (lowercase letters, digits, '-' and '.')")]
    Name { what: &'static str, value: String },
}

impl SpiffeId {
    /// Builds an ID, checking every part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        check_name("trust domain", trust_domain)?;
        check_name("namespace", namespace)?;
        check_name("service account", service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let shape = || SpiffeError::Shape(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(shape)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                SpiffeId::new(td, ns, sa)
            }
            _ => Err(shape()),
        }
    }

    /// Whether this ID is `namespace/service_account` (in any trust domain the caller has
    /// already checked).
    pub fn is(&self, namespace: &str, service_account: &str) -> bool {
        self.namespace == namespace && self.service_account == service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// DNS-label-like names (Kubernetes namespaces and service accounts are DNS-1123
/// subdomains; trust domains are DNS names).
fn check_name(what: &'static str, value: &str) -> Result<(), SpiffeError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !value.starts_with(['-', '.'])
        && !value.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::Name {
            what,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert!(id.is("shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in [
            "",
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/sa/web/ns/shop",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://Cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/-web",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
