//! palisade-balance: where a request goes.
//!
//! A [`Cluster`] holds its endpoints and answers one question per attempt: which
//! endpoint now? The answer weighs everything known about each endpoint:
//!
//! * **active health** ([`health`]): probes with healthy / unhealthy thresholds;
//! * **passive outlier detection** ([`outlier`]): consecutive 5xx, consecutive gateway
//!   failures, failure rate over a window; ejection time that grows with repeated
//!   ejections; a cap on the share of a cluster that may be ejected;
//! * **the endpoint's circuit breaker** (from `palisade-resilience`): an open breaker
//!   takes its endpoint out of rotation;
//! * **failover tiers** ([`failover`]): traffic moves to the next priority tier when
//!   the healthy share of a tier falls below a threshold and comes back only after
//!   the tier has been healthy for a stable period;
//! * **the panic threshold**: when too few endpoints of a tier are healthy, the
//!   balancer ignores health rather than pile everything on the few (Envoy's
//!   behaviour, but logged and counted so nobody is surprised);
//! * **the load balancer** ([`balancer`]): round robin, smooth weighted round robin,
//!   random, least request (power of two choices), peak EWMA, ring hash and maglev.
//!
//! Everything here is sans-I/O: time comes from a `palisade_core::Clock`, probe
//! results and call outcomes are told to it. The gateway does the I/O.

pub mod balancer;
pub mod cluster;
pub mod endpoint;
pub mod failover;
pub mod hash;
pub mod health;
pub mod outlier;

pub use balancer::LbPolicy;
pub use cluster::{Cluster, ClusterConfig, Pick, PickError};
pub use endpoint::{EndpointInfo, EndpointState};
