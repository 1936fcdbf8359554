//! tern-api: the control-plane protocol (`proto/tern/control/v1/control.proto`), as
//! prost messages with a tonic client (used by tern-proxy) and server (tern-control).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("tern.control.v1");
}
