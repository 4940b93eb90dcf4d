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

use super::{Instance, TargetError, TargetErrorKind};

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
pub struct PortBook {
    ports: Mutex<HashMap<u16, Holder>>,
}

/// One book per process: every manager (and every node a test runs in
/// one process) shares the host's ports.
pub static PORTS: LazyLock<PortBook> = LazyLock::new(PortBook::default);

impl PortBook {
    /// A port free on 127.0.0.1 and not in the book, now pending.
    pub fn reserve(&self) -> Result<u16, TargetError> {
        for _ in 0..TRIES {
            let port = std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| TargetError::new(TargetErrorKind::Unavailable, format!("cannot find a free port: {e}")))?;
            let mut ports = self.ports.lock().map_err(|_| TargetError::from("the port book is poisoned"))?;
            let now = Instant::now();
            ports.retain(|_, h| h.live(now));
            if let std::collections::hash_map::Entry::Vacant(v) = ports.entry(port) {
                v.insert(Holder::Pending(now));
                return Ok(port);
            }
        }
        Err(TargetError::new(TargetErrorKind::Unavailable, format!("cannot find a free port: the kernel offered {TRIES} ports this node already uses")))
    }

    /// `instance` runs on its port: the port stays booked while it lives.
    pub fn hold(&self, instance: &Arc<dyn Instance>) {
        if let Ok(mut ports) = self.ports.lock() {
            ports.insert(instance.addr().port(), Holder::Instance(Arc::downgrade(instance)));
        }
    }

    /// A pending port whose instance did not start.
    pub fn release(&self, port: u16) {
        if let Ok(mut ports) = self.ports.lock()
            && matches!(ports.get(&port), Some(Holder::Pending(_)))
        {
            ports.remove(&port);
        }
    }
}

/// Start an instance on a port of 127.0.0.1 from the book: `start(port)`,
/// again on another port (twice at most) when something else on this
/// host took the port between our pick and the instance's bind.
pub async fn on_free_port<F, Fut>(mut start: F) -> Result<Arc<dyn Instance>, TargetError>
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = Result<Arc<dyn Instance>, TargetError>>,
{
    let mut tries = 0;
    loop {
        let port = PORTS.reserve()?;
        let started = start(port).await;
        match &started {
            Ok(i) => PORTS.hold(i),
            Err(_) => PORTS.release(port),
        }
        tries += 1;
        match started {
            Err(e) if tries < 3 && e.kind == TargetErrorKind::PortTaken => {
                tracing::info!(port, "port taken before the instance bound it; another port: {e}");
            }
            other => return other,
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
