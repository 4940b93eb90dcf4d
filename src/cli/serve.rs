//! `slipway serve`: reads the config and the flags, opens the store (and
//! locks a SQLite one), binds the listener, then starts one node
//! ([`crate::node`]) and stops it on a signal.
//!
//! SIGHUP reloads the TLS certificate (`--tls-cert`), and does nothing
//! else.
//!
//! Shutdown: the first SIGINT/SIGTERM stops claiming work and the API,
//! and gives running jobs `--shutdown-grace` to finish; a second signal
//! exits at once (the jobs' leases then expire and another node, or this
//! one restarted, takes over).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{CliError, exit};
use crate::node::{NodeOptions, start_node, start_node_tls};
use crate::scheduler::{self, SchedulerConfig};
use crate::store::{self, Store};

pub struct ServeOptions {
    pub config: PathBuf,
    pub listen: String,
    pub store: Option<String>,
    pub parallelism: Option<usize>,
    pub node_id: Option<String>,
    pub lease: Option<Duration>,
    pub poll: Duration,
    pub shutdown_grace: Duration,
    /// `--tls-cert` and `--tls-key`: the API over HTTPS.
    pub tls: Option<crate::api::tls::TlsFiles>,
}

/// The store a command uses: `--store`, else `SLIPWAY_STORE` (clap reads
/// both into one option), else the config's `[project] store`, else a
/// SQLite file in `.slipway/` next to the config.
pub fn store_url(explicit: Option<&str>, config_store: Option<&str>, config_dir: &Path) -> String {
    if let Some(s) = explicit.or(config_store) {
        return s.to_string();
    }
    let dir = std::fs::canonicalize(config_dir).unwrap_or_else(|_| config_dir.to_path_buf());
    format!("sqlite://{}", dir.join(".slipway").join("slipway.db").display())
}

/// Hold an exclusive lock on a SQLite store for the life of the process:
/// two nodes on one SQLite file would each reap the other's jobs.
fn lock_sqlite(db: &str) -> Result<std::fs::File, CliError> {
    use std::os::fd::AsRawFd;
    let path = format!("{db}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("cannot open lock file {path}: {e}")))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(CliError::new(
            exit::UNAVAILABLE,
            format!("another `slipway serve` already uses the SQLite store {db} (lock {path} is held); several nodes need a PostgreSQL store"),
        ));
    }
    Ok(file)
}

pub async fn serve(opts: ServeOptions) -> Result<u8, CliError> {
    let loaded = crate::config::load(&opts.config).map_err(CliError::config)?;
    // Before anything starts: a node with too short a lease could retry a
    // job beside the remains of its attempt.
    let lease = opts.lease.or(loaded.config.project.lease).unwrap_or(SchedulerConfig::new(String::new(), PathBuf::new()).lease);
    if let Err(e) = scheduler::check_lease(lease, opts.poll) {
        return Err(match (opts.lease, loaded.config.project.lease) {
            (None, Some(_)) => CliError::new(exit::INVALID_CONFIG, format!("{}: [project] lease: {e}", loaded.path.display())),
            _ => CliError::new(exit::USAGE, format!("--lease/--poll: {e}")),
        });
    }
    // Before the store: a wrong file is a usage mistake to fix first.
    let certificate = match &opts.tls {
        Some(files) => Some(crate::api::tls::Certificate::load(files.clone()).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?),
        None => None,
    };
    let url = store_url(opts.store.as_deref(), loaded.config.project.store.as_deref(), &loaded.dir);
    let _lock = match url.strip_prefix("sqlite://") {
        Some(path) => {
            if let Some(parent) = Path::new(path).parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            Some(lock_sqlite(path)?)
        }
        None => None,
    };
    let store: Arc<dyn Store> = store::open(&url).await.map_err(|e| {
        let code = if matches!(e, store::StoreError::SchemaTooNew { .. }) { exit::INCOMPATIBLE_STORE } else { exit::UNAVAILABLE };
        CliError::new(code, e.to_string())
    })?;
    let addr: SocketAddr =
        opts.listen.parse().map_err(|e| CliError::new(exit::USAGE, format!("--listen {:?} is not an address like 127.0.0.1:7878: {e}", opts.listen)))?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint =
            if e.kind() == std::io::ErrorKind::AddrInUse { " (the port is in use: is another slipway serve running? pick another with --listen)" } else { "" };
        CliError::new(exit::UNAVAILABLE, format!("cannot listen on {addr}: {e}{hint}"))
    })?;
    let local = listener.local_addr().unwrap_or(addr);

    let node_id = opts.node_id.clone().unwrap_or_else(scheduler::default_node_id);
    let parallelism = opts.parallelism.or(loaded.config.project.parallelism).unwrap_or(8);
    let work_dir = loaded.dir.join(".slipway").join("work");
    let mut cfg = SchedulerConfig::new(node_id.clone(), work_dir);
    cfg.parallelism = parallelism;
    cfg.poll = opts.poll;
    cfg.shutdown_grace = opts.shutdown_grace;
    if let Some(l) = opts.lease.or(loaded.config.project.lease) {
        cfg.lease = l;
    }
    if let Some(m) = loaded.config.project.max_log_bytes {
        cfg.max_log_bytes = m;
    }

    // Registered before the API answers, so a node that listens is listed.
    store.register_node(&node_id).await.map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    // One identity for the installation's containers and processes.
    let scope = crate::process::installation_of_store(&url);
    let node_opts = NodeOptions { config_path: loaded.path.clone(), store: store.clone(), scheduler: cfg, listener, scope };
    let scheme = if certificate.is_some() { "https" } else { "http" };
    let node = match certificate.clone() {
        None => start_node(node_opts),
        Some(c) => start_node_tls(node_opts, c).map_err(|e| CliError::new(exit::INTERNAL, format!("cannot set up TLS: {e}")))?,
    };
    tokio::spawn(crate::api::tls::reload_on_hangup(certificate, node.shutdown.clone()));
    let shutdown = node.shutdown.clone();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else { return };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            // Not eprintln!: with stderr closed it would panic here, and the node would never stop.
            let _ = writeln!(std::io::stderr(), "slipway: stopping (running jobs get their grace period; signal again to exit now)");
            shutdown.cancel();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            let _ = writeln!(std::io::stderr(), "slipway: exiting now");
            std::process::exit(exit::INTERRUPTED as i32);
        });
    }

    let _ = writeln!(
        std::io::stderr(),
        "slipway serve: node {node_id}, listening on {scheme}://{local}, store {} ({}), parallelism {parallelism}, config {}",
        store::sql::redact_url(&url),
        store.backend(),
        loaded.path.display()
    );
    let result = node.task.await.unwrap_or_else(|e| Err(crate::store::StoreError::Unavailable(format!("node task failed: {e}"))));
    match result {
        Ok(()) => Ok(exit::OK),
        Err(e) => Err(CliError::new(exit::UNAVAILABLE, format!("scheduler stopped: {e}"))),
    }
}
