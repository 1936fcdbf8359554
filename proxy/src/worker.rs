//! One worker: a single-threaded runtime with its own listeners (SO_REUSEPORT) and its
//! own upstream pools, so a request stays on one core from accept to upstream and back.

use std::sync::Arc;

use crate::state::Shared;
use crate::upstream::pool::{Pool, PoolSettings};

pub struct Worker {
    pub shared: Arc<Shared>,
    /// Connections to other sidecars and upstreams (outbound).
    pub pool: Arc<Pool>,
    /// Connections to the local application (inbound).
    pub app_pool: Arc<Pool>,
    /// The empty label value, shared so an unrouted request allocates nothing.
    pub empty: Arc<str>,
    pub app_label: Arc<str>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Worker {
            shared,
            pool: Pool::new(PoolSettings::default()),
            app_pool: Pool::new(PoolSettings::default()),
            empty: Arc::from(""),
            app_label: Arc::from("app"),
        })
    }
}
