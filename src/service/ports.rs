//! Host ports for instances.
//!
//! A port is found by binding 127.0.0.1:0 and closing the socket, so
//! nothing holds it until the instance binds it. That is not enough on
//! its own: a container's published port may be held only by the
//! Engine's packet rules (no `docker-proxy` listening), so the kernel can
//! offer a port a live container uses, and two instances started side by
//! side can be offered the same port. The book remembers, for this
//! process, every port handed out and not yet released: pending (handed
//! out, instance not started yet) or held by a live instance.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::targets::Instance;

/// A pending port not claimed by an instance within this is free again
/// (its start failed somewhere that did not say so).
const PENDING_FOR: Duration = Duration::from_secs(600);
/// How many ports the kernel may offer before we give up.
const TRIES: usize = 64;

enum Holder {
    Pending(Instant),
    Instance(Weak<dyn Instance>),
}

impl Holder {
    fn live(&self, now: Instant) -> bool {
        match self {
            Holder::Pending(at) => now.duration_since(*at) < PENDING_FOR,
            Holder::Instance(w) => w.upgrade().is_some_and(|i| i.exit().is_none()),
        }
    }
}

#[derive(Default)]
pub(crate) struct PortBook {
    ports: Mutex<HashMap<u16, Holder>>,
}

/// One book per process: every manager (and every node a test runs in
/// one process) shares the host's ports.
pub(crate) static PORTS: LazyLock<PortBook> = LazyLock::new(PortBook::default);

impl PortBook {
    /// A port free on 127.0.0.1 and not in the book, now pending.
    pub(crate) fn reserve(&self) -> Result<u16, String> {
        for _ in 0..TRIES {
            let port = std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("cannot find a free port: {e}"))?;
            let mut ports = self.ports.lock().map_err(|_| "the port book is poisoned".to_string())?;
            let now = Instant::now();
            ports.retain(|_, h| h.live(now));
            if let std::collections::hash_map::Entry::Vacant(v) = ports.entry(port) {
                v.insert(Holder::Pending(now));
                return Ok(port);
            }
        }
        Err(format!("cannot find a free port: the kernel offered {TRIES} ports this node already uses"))
    }

    /// `instance` runs on its port: the port stays booked while it lives.
    pub(crate) fn hold(&self, instance: &Arc<dyn Instance>) {
        if let Ok(mut ports) = self.ports.lock() {
            ports.insert(instance.addr().port(), Holder::Instance(Arc::downgrade(instance)));
        }
    }

    /// A pending port whose instance did not start.
    pub(crate) fn release(&self, port: u16) {
        if let Ok(mut ports) = self.ports.lock()
            && matches!(ports.get(&port), Some(Holder::Pending(_)))
        {
            ports.remove(&port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The kernel offers a port again soon after it was closed: 1000 binds
    // of :0 here repeat some port almost always.
    fn a_pending_port_is_not_offered_again() {
        let book = PortBook::default();
        let ports: Vec<u16> = (0..1000).map(|_| book.reserve().expect("port")).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        book.release(ports[0]);
        assert!(!book.ports.lock().unwrap().contains_key(&ports[0]));
        assert!(book.ports.lock().unwrap().contains_key(&ports[1]));
    }
}
