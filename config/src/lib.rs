//! tern-config: the contract between Tern's control plane and its sidecars.
//!
//! Users write Kubernetes-style YAML (Service, EndpointSlice, HTTPRoute, GRPCRoute). This
//! crate parses it with source locations ([`yaml`], the only module that touches a YAML
//! library), checks it ([`validate`]) with diagnostics that name `file:line:column` and the
//! field path, and compiles it ([`compile`]) into an immutable, lookup-ready
//! [`snapshot::Snapshot`] with a content version. It has no async runtime dependency.

pub mod decode;
pub mod diag;
pub mod model;
pub mod resources;
pub mod snapshot;
pub mod validate;
pub mod yaml;

pub use snapshot::Snapshot;
