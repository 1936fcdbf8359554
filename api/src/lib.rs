//! tern-api: the control-plane protocol (`proto/tern/control/v1/control.proto`), as
//! prost messages with a tonic client (used by tern-proxy) and server (tern-control).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("tern.control.v1");
}

impl v1::ConfigPush {
    /// The documents as `(name, text)` sources, the form `tern_config::load_sources`
    /// compiles (a sidecar applying a push, a test checking that a scope validates).
    pub fn sources(&self) -> Vec<(String, String)> {
        self.documents
            .iter()
            .map(|d| (d.name.clone(), d.yaml.clone()))
            .collect()
    }
}
