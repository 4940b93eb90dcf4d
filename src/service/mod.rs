//! Services: long-running things Slipway deploys and keeps running, as
//! opposed to jobs, which run to an end.
//!
//! - [`proxy`]: the reverse proxy on a service's stable address; rollouts
//!   move traffic by swapping its backend set.
//! - `ports`: host ports for instances, never handed out twice while in use.

pub mod artifact;
pub mod health;
pub mod manager;
mod ports;
pub mod proxy;

pub use manager::{RolloutRequest, ServiceManager};

/// An error with its causes: reqwest's top line ("error sending
/// request") says little; the cause ("connection refused") is below.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
