//! Services: long-running things Slipway deploys and keeps running, as
//! opposed to jobs, which run to an end.
//!
//! - [`proxy`]: the reverse proxy on a service's stable address; rollouts
//!   move traffic by swapping its backend set.

pub mod artifact;
pub mod health;
pub mod manager;
pub mod proxy;

pub use manager::{RolloutRequest, ServiceManager};
