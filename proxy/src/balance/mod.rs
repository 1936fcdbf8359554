//! Choosing an endpoint of a backend. Round robin over ready endpoints for now; the
//! load-balancing work adds P2C over peak EWMA, ring hash and locality tiers here.

pub mod round_robin;
