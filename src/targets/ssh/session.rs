//! SSH connections to hosts, client side (russh): connect with the host
//! key pinned by a known_hosts text, run fixed command strings on exec
//! channels, upload files, forward to the host's 127.0.0.1, and make sure
//! Slipway's own binary is on the host as its agent ([`ensure_agent`]).
//!
//! Every step is bounded: connecting (TCP, banner, key exchange and
//! authentication) by the endpoint's `connect_timeout`, channel opens by
//! the same, and a live connection by keepalives ([`KEEPALIVE_INTERVAL`] ×
//! [`KEEPALIVE_MAX`]), so a host cut off mid-command is noticed within a
//! few seconds: channels then end and calls fail with [`SshErrorKind::Lost`].
//! Command strings are ours only: paths we chose, [`quote`]d; nothing from
//! a payload is ever part of one (it travels on stdin to the agent).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use russh::client::{self, Handle, Msg};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelStream, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::config::secret::Secret;

/// Keepalive cadence: a silent connection is probed this often...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and given up after this many unanswered probes (the facts note
/// measured a partition noticed in 3.4–3.8 s with these).
pub const KEEPALIVE_MAX: usize = 3;

/// One host to connect to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The host's name in the config (used in messages).
    pub name: String,
    /// `host`, `host:port`, `[v6]:port` or a bare IPv6 address; port 22 by default.
    pub address: String,
    pub user: String,
    /// Bounds TCP connect, banner, key exchange and authentication together.
    pub connect_timeout: Duration,
}

/// What a connection authenticates with and trusts.
#[derive(Clone)]
pub struct Keys {
    /// The client's private key, OpenSSH format (no passphrase).
    pub private_key: Secret,
    /// known_hosts text: the host keys trusted, per host.
    pub known_hosts: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The Secret's Debug prints only its length.
        f.debug_struct("Keys").field("private_key", &self.private_key).field("known_hosts_lines", &self.known_hosts.lines().count()).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshErrorKind {
    /// No answer within the bound (TCP, handshake, a command, a channel).
    TimedOut,
    /// The host answered the TCP connect with a refusal (nothing listens).
    Refused,
    /// No route, or the name does not resolve.
    Unreachable,
    /// The host offered a key other than the one known_hosts pins for it.
    HostKeyChanged,
    /// known_hosts pins no key for this host.
    HostKeyUnknown,
    /// The host refused our key for the user.
    AuthRefused,
    /// An established connection died (keepalives unanswered, closed).
    Lost,
    /// Anything else (a protocol error, a command that failed).
    Failed,
}

/// An error for people: the message names the host and what happened.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SshError {
    pub kind: SshErrorKind,
    pub message: String,
}

impl SshError {
    fn new(kind: SshErrorKind, message: impl Into<String>) -> SshError {
        SshError { kind, message: message.into() }
    }
}

/// A piece of what a remote command produced, in order of arrival.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(RemoteExit),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteExit {
    Code(i32),
    /// The signal's SSH name, without "SIG" (`TERM`, `KILL`).
    Signal(String),
}

/// What a short command left: its exit (None when the host sent none) and output.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub status: Option<RemoteExit>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(RemoteExit::Code(0))
    }

    /// "exit code 3" / "killed by signal TERM" / "no exit status", and stderr's
    /// last lines: for messages.
    pub fn describe(&self) -> String {
        let status = match &self.status {
            Some(RemoteExit::Code(c)) => format!("exit code {c}"),
            Some(RemoteExit::Signal(s)) => format!("killed by signal {s}"),
            None => "no exit status".to_string(),
        };
        let err = String::from_utf8_lossy(&self.stderr);
        let err = err.trim();
        if err.is_empty() {
            status
        } else {
            // The end of stderr says why; a page of it does not fit a message.
            let tail: String = err.chars().rev().take(500).collect::<Vec<_>>().into_iter().rev().collect();
            format!("{status}: {tail}")
        }
    }
}

/// POSIX single-quoting, for OUR OWN paths in our fixed command strings
/// (never for anything from a payload: that goes on stdin).
pub fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

// ---- addresses and known_hosts ---------------------------------------------

/// `host`, `host:port`, `[host]:port`, or a bare IPv6 address.
fn split_address(address: &str) -> Result<(String, u16), String> {
    let a = address.trim();
    let bad = || format!("invalid address {a:?} (expected host, host:port or [host]:port)");
    if let Some(rest) = a.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => 22,
            p => p.strip_prefix(':').and_then(|p| p.parse().ok()).ok_or_else(bad)?,
        };
        return if host.is_empty() { Err(bad()) } else { Ok((host.to_string(), port)) };
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = p.parse().map_err(|_| bad())?;
            if h.is_empty() { Err(bad()) } else { Ok((h.to_string(), port)) }
        }
        _ if a.is_empty() => Err(bad()),
        _ => Ok((a.to_string(), 22)),
    }
}

/// How known_hosts names a host: `host`, or `[host]:port` off port 22.
fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 { host.to_string() } else { format!("[{host}]:{port}") }
}

fn display_address(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// A key known_hosts lists for the host.
#[derive(Debug, Clone)]
struct Pinned {
    key: PublicKey,
    /// `@revoked`: this key must never be accepted.
    revoked: bool,
}

/// The keys known_hosts lists for `name` (as [`known_hosts_name`] gives
/// it): plain, wildcard and hashed (`|1|salt|hash`) patterns, negations
/// (`!pattern`), `@revoked` markers; `@cert-authority` lines are skipped
/// (no host certificates here). Lines that do not parse are skipped.
fn pinned_keys(text: &str, name: &str) -> Vec<Pinned> {
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next();
        let mut revoked = false;
        match first {
            Some("@revoked") => {
                revoked = true;
                first = fields.next();
            }
            Some(m) if m.starts_with('@') => continue,
            _ => {}
        }
        let (Some(patterns), Some(kind), Some(b64)) = (first, fields.next(), fields.next()) else { continue };
        if !host_matches(name, patterns) {
            continue;
        }
        if let Ok(key) = PublicKey::from_openssh(&format!("{kind} {b64}")) {
            found.push(Pinned { key, revoked });
        }
    }
    found
}

/// OpenSSH's rule: a line applies when a pattern matches and no negated one does.
fn host_matches(name: &str, patterns: &str) -> bool {
    let mut matched = false;
    for p in patterns.split(',') {
        if let Some(neg) = p.strip_prefix('!') {
            if pattern_matches(name, neg) {
                return false;
            }
        } else if pattern_matches(name, p) {
            matched = true;
        }
    }
    matched
}

fn pattern_matches(name: &str, pattern: &str) -> bool {
    if let Some(hashed) = pattern.strip_prefix("|1|") {
        let Some((salt, hash)) = hashed.split_once('|') else { return false };
        let (Ok(salt), Ok(hash)) = (data_encoding::BASE64.decode(salt.as_bytes()), data_encoding::BASE64.decode(hash.as_bytes())) else { return false };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        return ring::hmac::verify(&key, name.as_bytes(), &hash).is_ok();
    }
    glob(name.as_bytes(), pattern.as_bytes())
}

/// `*` and `?` wildcards, ASCII case-insensitive (host names).
fn glob(name: &[u8], pattern: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob(&name[i..], rest)),
        Some((b'?', rest)) => !name.is_empty() && glob(&name[1..], rest),
        Some((c, rest)) => name.first().is_some_and(|n| n.eq_ignore_ascii_case(c)) && glob(&name[1..], rest),
    }
}

fn fingerprint_of(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

// ---- the russh client handler ----------------------------------------------

/// What the handler learns, shared with the connection.
#[derive(Default)]
struct Shared {
    /// Why the host key was refused (set during the handshake).
    verdict: Mutex<Option<SshError>>,
    /// The host key's fingerprint, once offered.
    fingerprint: Mutex<Option<String>>,
    /// Cancelled when the session task ends, whatever the reason.
    lost: CancellationToken,
    lost_reason: Mutex<Option<String>>,
}

impl Shared {
    fn set<T>(slot: &Mutex<Option<T>>, value: T) {
        if let Ok(mut s) = slot.lock() {
            *s = Some(value);
        }
    }

    fn get<T: Clone>(slot: &Mutex<Option<T>>) -> Option<T> {
        slot.lock().ok().and_then(|s| s.clone())
    }
}

struct Client {
    label: String,
    /// The host as known_hosts names it.
    known_name: String,
    pinned: Vec<Pinned>,
    shared: Arc<Shared>,
}

impl Drop for Client {
    fn drop(&mut self) {
        // The handler lives exactly as long as the session task: its end
        // (keepalive timeout, close, error) is the connection's.
        self.shared.lost.cancel();
    }
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(&mut self, offered: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = offered else {
            Shared::set(
                &self.shared.verdict,
                SshError::new(SshErrorKind::HostKeyUnknown, format!("{}: the host offered a certificate; pin its host key in known_hosts instead", self.label)),
            );
            return Ok(false);
        };
        let fp = fingerprint_of(key);
        Shared::set(&self.shared.fingerprint, fp.clone());
        let same = |p: &&Pinned| p.key.key_data() == key.key_data();
        if self.pinned.iter().filter(|p| p.revoked).any(|p| same(&p)) {
            Shared::set(
                &self.shared.verdict,
                SshError::new(SshErrorKind::HostKeyChanged, format!("{}: the host offered {fp}, which known_hosts marks @revoked for {}", self.label, self.known_name)),
            );
            return Ok(false);
        }
        let trusted: Vec<&Pinned> = self.pinned.iter().filter(|p| !p.revoked).collect();
        if trusted.iter().any(same) {
            return Ok(true);
        }
        let verdict = if trusted.is_empty() {
            SshError::new(
                SshErrorKind::HostKeyUnknown,
                format!(
                    "{}: host key unknown (not in known_hosts): {fp} ({}); check it on the host and add `{} {}` to the known_hosts secret",
                    self.label,
                    key.algorithm(),
                    self.known_name,
                    key.to_openssh().unwrap_or_default()
                ),
            )
        } else {
            let pins: Vec<String> = trusted.iter().map(|p| fingerprint_of(&p.key)).collect();
            SshError::new(
                SshErrorKind::HostKeyChanged,
                format!(
                    "{}: host key mismatch: the host offered {fp}, known_hosts pins {} for {} — if the host was replaced on purpose, update the known_hosts secret",
                    self.label,
                    pins.join(", "),
                    self.known_name
                ),
            )
        };
        Shared::set(&self.shared.verdict, verdict);
        Ok(false)
    }

    async fn disconnected(&mut self, reason: client::DisconnectReason<Self::Error>) -> Result<(), Self::Error> {
        let why = match reason {
            client::DisconnectReason::ReceivedDisconnect(info) if info.message.is_empty() => "the host closed the connection".to_string(),
            client::DisconnectReason::ReceivedDisconnect(info) => format!("the host closed the connection: {}", info.message),
            client::DisconnectReason::Error(russh::Error::KeepaliveTimeout) => format!(
                "the host stopped answering ({KEEPALIVE_MAX} keepalives {} apart unanswered)",
                humantime::format_duration(KEEPALIVE_INTERVAL)
            ),
            client::DisconnectReason::Error(e) => e.to_string(),
        };
        Shared::set(&self.shared.lost_reason, why);
        // Now, before the session drops its channels: whoever sees a
        // channel end next finds the connection lost, with the reason.
        self.shared.lost.cancel();
        Ok(())
    }
}

// ---- connecting ------------------------------------------------------------

/// Where a connect attempt got to, for the timeout's message.
#[derive(Clone, Copy)]
enum Phase {
    Tcp,
    Handshake,
    Auth,
}

/// Connect and authenticate, all within `ep.connect_timeout`.
pub async fn connect(ep: &Endpoint, keys: &Keys) -> Result<Connection, SshError> {
    let (host, port) = split_address(&ep.address).map_err(|e| SshError::new(SshErrorKind::Failed, format!("{}: {e}", ep.name)))?;
    let label = format!("{} ({})", ep.name, display_address(&host, port));
    // The key's own error text is not shown: it is about the secret.
    let key = russh::keys::decode_secret_key(keys.private_key.expose(), None).map_err(|_| {
        SshError::new(SshErrorKind::Failed, format!("{label}: the private key cannot be read (an OpenSSH private key without a passphrase is expected)"))
    })?;
    let known_name = known_hosts_name(&host, port);
    let pinned = pinned_keys(&keys.known_hosts, &known_name);
    let mut config = client::Config {
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..Default::default()
    };
    // As OpenSSH does: ask first for the key types known_hosts pins for
    // this host, so a host with several keys offers the pinned one.
    let mut order: Vec<russh::keys::Algorithm> = Vec::new();
    for p in pinned.iter().filter(|p| !p.revoked) {
        for a in config.preferred.key.iter() {
            let same_type = match (a, p.key.algorithm()) {
                (russh::keys::Algorithm::Rsa { .. }, russh::keys::Algorithm::Rsa { .. }) => true,
                (a, b) => *a == b,
            };
            if same_type && !order.contains(a) {
                order.push(a.clone());
            }
        }
    }
    for a in config.preferred.key.iter() {
        if !order.contains(a) {
            order.push(a.clone());
        }
    }
    config.preferred.key = order.into();
    let shared = Arc::new(Shared::default());
    let phase = Arc::new(Mutex::new(Phase::Tcp));
    let set_phase = |p| {
        if let Ok(mut g) = phase.lock() {
            *g = p;
        }
    };
    let handler = Client { label: label.clone(), known_name, pinned, shared: shared.clone() };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| tcp_error(&label, &e))?;
        let _ = tcp.set_nodelay(true);
        set_phase(Phase::Handshake);
        let mut handle = client::connect_stream(Arc::new(config), tcp, handler).await.map_err(|e| handshake_error(&label, e, &shared))?;
        set_phase(Phase::Auth);
        let hash = if key.algorithm().is_rsa() { handle.best_supported_rsa_hash().await.ok().flatten().flatten() } else { None };
        let auth = handle
            .authenticate_publickey(ep.user.clone(), PrivateKeyWithHashAlg::new(Arc::new(key), hash))
            .await
            .map_err(|e| SshError::new(SshErrorKind::Failed, format!("{label}: authentication failed: {e}")))?;
        if !auth.success() {
            return Err(SshError::new(SshErrorKind::AuthRefused, format!("{label}: the key was refused for user {}", ep.user)));
        }
        Ok(handle)
    };
    let handle = match tokio::time::timeout(ep.connect_timeout, attempt).await {
        Ok(r) => r?,
        Err(_) => {
            let after = humantime::format_duration(ep.connect_timeout);
            let what = match phase.lock().map(|p| *p).unwrap_or(Phase::Tcp) {
                Phase::Tcp => format!("connection timed out after {after}"),
                Phase::Handshake => format!("timed out after {after}: the host accepted the connection but did not complete the SSH handshake"),
                Phase::Auth => format!("timed out after {after} during authentication"),
            };
            return Err(SshError::new(SshErrorKind::TimedOut, format!("{label}: {what}")));
        }
    };
    let fingerprint = Shared::get(&shared.fingerprint).unwrap_or_default();
    Ok(Connection {
        inner: Arc::new(Inner { handle, label, fingerprint, shared, bound: ep.connect_timeout, agents: tokio::sync::Mutex::new(HashSet::new()) }),
    })
}

fn tcp_error(label: &str, e: &std::io::Error) -> SshError {
    use std::io::ErrorKind as K;
    let (kind, what) = match e.kind() {
        K::ConnectionRefused => (SshErrorKind::Refused, "connection refused".to_string()),
        K::TimedOut => (SshErrorKind::TimedOut, "connection timed out".to_string()),
        K::HostUnreachable => (SshErrorKind::Unreachable, "host unreachable".to_string()),
        K::NetworkUnreachable => (SshErrorKind::Unreachable, "network unreachable".to_string()),
        _ => (SshErrorKind::Unreachable, format!("cannot connect: {e}")),
    };
    SshError::new(kind, format!("{label}: {what}"))
}

fn handshake_error(label: &str, e: russh::Error, shared: &Shared) -> SshError {
    if let Some(v) = Shared::get(&shared.verdict) {
        return v;
    }
    match e {
        russh::Error::UnknownKey => SshError::new(SshErrorKind::HostKeyUnknown, format!("{label}: host key refused")),
        e => SshError::new(SshErrorKind::Failed, format!("{label}: SSH handshake failed: {e}")),
    }
}

// ---- a connection ----------------------------------------------------------

struct Inner {
    handle: Handle<Client>,
    label: String,
    fingerprint: String,
    shared: Arc<Shared>,
    /// Bound for opening a channel (the endpoint's connect timeout).
    bound: Duration,
    /// Agent paths known to answer on the host (`ensure_agent`).
    agents: tokio::sync::Mutex<HashSet<String>>,
}

/// An authenticated connection to one host. Clones share it; it ends when
/// the last clone and every channel are gone, or on [`Connection::close`].
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("host", &self.inner.label).field("fingerprint", &self.inner.fingerprint).finish()
    }
}

impl Connection {
    /// `SHA256:…` of the host's key.
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    /// `name (host:port)`, as messages name the host.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Some(error of kind Lost) once the connection is gone.
    pub fn lost(&self) -> Option<SshError> {
        lost_error(&self.inner.shared, &self.inner.label)
    }

    /// `fut`, bounded by `bound` and by the connection's life.
    async fn guard<T>(&self, what: &str, bound: Duration, fut: impl Future<Output = Result<T, russh::Error>>) -> Result<T, SshError> {
        let label = &self.inner.label;
        tokio::select! {
            r = tokio::time::timeout(bound, fut) => match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    if self.inner.handle.is_closed() {
                        settle(&self.inner.shared).await;
                    }
                    Err(self.lost().unwrap_or_else(|| SshError::new(SshErrorKind::Failed, format!("{label}: {what}: {e}"))))
                }
                Err(_) => Err(SshError::new(SshErrorKind::TimedOut, format!("{label}: {what}: no answer within {}", humantime::format_duration(bound)))),
            },
            _ = self.inner.shared.lost.cancelled() => Err(self.lost().unwrap_or_else(|| SshError::new(SshErrorKind::Lost, format!("{label}: connection lost")))),
        }
    }

    /// Run `command` (ours, fixed; see [`quote`]) on an exec channel.
    /// Dropping the returned process closes the channel: the remote side
    /// sees its stdin end (the agent then ends its job).
    pub async fn spawn(&self, command: &str) -> Result<RemoteProcess, SshError> {
        let channel = self.guard("opening a session channel", self.inner.bound, self.inner.handle.channel_open_session()).await?;
        self.guard("starting a command", self.inner.bound, channel.exec(true, command)).await?;
        let (read, write) = channel.split();
        Ok(RemoteProcess { read, write: Some(write), shared: self.inner.shared.clone(), label: self.inner.label.clone(), refused: false, closed: false, exit: None })
    }

    /// Run a short command with `stdin` as its input; everything within
    /// `timeout`. Failing to run it is an error; its own failure is in
    /// [`Output::status`].
    pub async fn output(&self, command: &str, stdin: &[u8], timeout: Duration) -> Result<Output, SshError> {
        let label = self.inner.label.clone();
        let work = async {
            let mut p = self.spawn(command).await?;
            let mut out = Output::default();
            let write = p.write.take();
            // Sent while the output is read: a command that writes much
            // before reading would otherwise block both sides. A command
            // that never reads its stdin leaves the send pending: dropped
            // once the command has ended.
            let send = async {
                if let Some(w) = &write {
                    if !stdin.is_empty() {
                        let _ = w.data_bytes(stdin.to_vec()).await;
                    }
                    let _ = w.eof().await;
                }
                std::future::pending::<()>().await
            };
            let collect = async {
                while let Some(chunk) = p.next().await {
                    match chunk {
                        Chunk::Stdout(b) => out.stdout.extend_from_slice(&b),
                        Chunk::Stderr(b) => out.stderr.extend_from_slice(&b),
                        Chunk::Exit(e) => out.status = Some(e),
                    }
                }
            };
            tokio::select! {
                _ = send => {}
                _ = collect => {}
            }
            if let Some(w) = write {
                close_in_background(w);
            }
            if out.status.is_none()
                && let Some(lost) = p.lost()
            {
                return Err(lost);
            }
            if p.refused {
                return Err(SshError::new(SshErrorKind::Failed, format!("{label}: the host refused to run the command")));
            }
            Ok(out)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                let shown: String = command.chars().take(200).collect();
                Err(SshError::new(SshErrorKind::TimedOut, format!("{label}: `{shown}` did not finish within {}", humantime::format_duration(timeout))))
            }
        }
    }

    /// Write `bytes` to `remote_path` (a path we own) with `mode`,
    /// atomically (a temporary file beside it, then a rename), creating
    /// its parent directories.
    pub async fn upload(&self, remote_path: &str, bytes: &[u8], mode: u32, timeout: Duration) -> Result<(), SshError> {
        self.put_file(remote_path, bytes, mode, timeout, false).await
    }

    /// As [`Connection::upload`], with `gzipped` gzip data that the host
    /// unpacks on the way (`gzip -dc`, present on every Debian host).
    pub async fn upload_gzip(&self, remote_path: &str, gzipped: &[u8], mode: u32, timeout: Duration) -> Result<(), SshError> {
        self.put_file(remote_path, gzipped, mode, timeout, true).await
    }

    async fn put_file(&self, remote_path: &str, bytes: &[u8], mode: u32, timeout: Duration, gunzip: bool) -> Result<(), SshError> {
        let tmp = format!("{remote_path}.tmp-{:016x}", rand::random::<u64>());
        let mkdir = match Path::new(remote_path).parent().map(|p| p.to_string_lossy().into_owned()) {
            Some(p) if !p.is_empty() => format!("mkdir -p {} && ", quote(&p)),
            _ => String::new(),
        };
        let (t, p) = (quote(&tmp), quote(remote_path));
        let write = if gunzip { "gzip -dc" } else { "cat" };
        let command = format!("{mkdir}{write} > {t} && chmod {mode:o} {t} && mv -f {t} {p} || {{ rc=$?; rm -f {t}; exit $rc; }}");
        let out = self.output(&command, bytes, timeout).await?;
        if out.success() {
            Ok(())
        } else {
            Err(SshError::new(SshErrorKind::Failed, format!("{}: writing {remote_path} failed: {}", self.inner.label, out.describe())))
        }
    }

    /// A stream to `127.0.0.1:port` as the host sees it (direct-tcpip):
    /// reaches servers bound to the host's loopback, no port opened.
    pub async fn forward(&self, port: u16) -> Result<Tunnel, SshError> {
        let what = format!("forwarding to the host's 127.0.0.1:{port}");
        let channel = self.guard(&what, self.inner.bound, self.inner.handle.channel_open_direct_tcpip("127.0.0.1", u32::from(port), "127.0.0.1", 0)).await?;
        Ok(Tunnel(channel.into_stream()))
    }

    /// Say goodbye to the host (bounded); clones are closed too.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.handle.disconnect(russh::Disconnect::ByApplication, "", "en")).await;
    }
}

/// The session task is ending: a moment (bounded) for it to say why.
async fn settle(shared: &Shared) {
    let _ = tokio::time::timeout(Duration::from_secs(1), shared.lost.cancelled()).await;
}

fn lost_error(shared: &Shared, label: &str) -> Option<SshError> {
    if !shared.lost.is_cancelled() {
        return None;
    }
    let why = Shared::get(&shared.lost_reason).unwrap_or_else(|| "the connection ended".to_string());
    Some(SshError::new(SshErrorKind::Lost, format!("{label}: connection lost: {why}")))
}

/// Close a channel's sending side without waiting (from Drop, or after a
/// command is done).
fn close_in_background(write: ChannelWriteHalf<Msg>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), write.close()).await;
        });
    }
}

/// A forwarded stream (see [`Connection::forward`]).
pub struct Tunnel(ChannelStream<Msg>);

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A command running on the host (see [`Connection::spawn`]).
/// How long output may still arrive after a command's exit status.
const EXIT_OUTPUT_GRACE: Duration = Duration::from_secs(2);

pub struct RemoteProcess {
    read: ChannelReadHalf,
    /// None once taken by `output` (which closes it itself).
    write: Option<ChannelWriteHalf<Msg>>,
    shared: Arc<Shared>,
    label: String,
    /// The host answered the exec request with a failure.
    refused: bool,
    /// The host closed the channel (a normal end).
    closed: bool,
    /// The command's exit, held until its output has all arrived: sshd
    /// may send exit-status before the last of a pipe's data.
    exit: Option<RemoteExit>,
}

impl RemoteProcess {
    /// Send bytes to the command's stdin. Waits while the host's window is
    /// full (a command that does not read); fails once the connection is lost.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SshError> {
        let Some(w) = &self.write else { return Err(SshError::new(SshErrorKind::Failed, format!("{}: stdin is closed", self.label))) };
        tokio::select! {
            r = w.data_bytes(bytes.to_vec()) => r.map_err(|e| lost_error(&self.shared, &self.label).unwrap_or_else(|| SshError::new(SshErrorKind::Failed, format!("{}: writing to the command: {e}", self.label)))),
            _ = self.shared.lost.cancelled() => Err(self.lost().unwrap_or_else(|| SshError::new(SshErrorKind::Lost, format!("{}: connection lost", self.label)))),
        }
    }

    /// End the command's stdin (EOF); output can still be read.
    pub async fn close_stdin(&mut self) -> Result<(), SshError> {
        let Some(w) = &self.write else { return Ok(()) };
        tokio::select! {
            r = w.eof() => r.map_err(|e| lost_error(&self.shared, &self.label).unwrap_or_else(|| SshError::new(SshErrorKind::Failed, format!("{}: closing stdin: {e}", self.label)))),
            _ = self.shared.lost.cancelled() => Err(self.lost().unwrap_or_else(|| SshError::new(SshErrorKind::Lost, format!("{}: connection lost", self.label)))),
        }
    }

    /// The next piece of output or the exit (after all the output); None
    /// once the channel is closed, or the connection lost (then
    /// [`RemoteProcess::lost`] says so).
    pub async fn next(&mut self) -> Option<Chunk> {
        loop {
            if self.closed {
                return self.exit.take().map(Chunk::Exit);
            }
            // The session task ends when the connection does (keepalives
            // bound that); with it go the channel's senders: None. With the
            // exit in hand, output still coming is waited for briefly (a
            // daemon the command left behind may hold its pipe open).
            let msg = match self.exit {
                Some(_) => match tokio::time::timeout(EXIT_OUTPUT_GRACE, self.read.wait()).await {
                    Ok(m) => m,
                    Err(_) => return self.exit.take().map(Chunk::Exit),
                },
                None => self.read.wait().await,
            };
            let Some(msg) = msg else {
                if self.exit.is_none() {
                    settle(&self.shared).await;
                }
                return self.exit.take().map(Chunk::Exit);
            };
            match msg {
                ChannelMsg::Data { data } => return Some(Chunk::Stdout(data.to_vec())),
                ChannelMsg::ExtendedData { data, ext: 1 } => return Some(Chunk::Stderr(data.to_vec())),
                ChannelMsg::ExitStatus { exit_status } => self.exit = Some(RemoteExit::Code(exit_status as i32)),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    let name = match signal_name {
                        Sig::Custom(s) => s,
                        s => format!("{s:?}"),
                    };
                    self.exit = Some(RemoteExit::Signal(name));
                }
                // No more output after EOF: the exit can be told now.
                ChannelMsg::Eof if self.exit.is_some() => return self.exit.take().map(Chunk::Exit),
                ChannelMsg::Close => {
                    self.closed = true;
                    if let Some(e) = self.exit.take() {
                        return Some(Chunk::Exit(e));
                    }
                    return None;
                }
                ChannelMsg::Failure => self.refused = true,
                _ => {}
            }
        }
    }

    /// Some(error of kind Lost) once the connection is gone.
    pub fn lost(&self) -> Option<SshError> {
        lost_error(&self.shared, &self.label)
    }
}

impl Drop for RemoteProcess {
    fn drop(&mut self) {
        if let Some(w) = self.write.take() {
            close_in_background(w);
        }
    }
}

// ---- the agent on the host -------------------------------------------------

/// The running process's own binary, to ship to hosts as their agent. On
/// Linux `/proc/self/exe`: the image this process runs even when its file
/// was replaced or removed since it started (a package upgrade in place,
/// a rebuild), where the path `current_exe` names would give another
/// build, or nothing ("… (deleted)").
pub fn own_binary() -> PathBuf {
    if cfg!(target_os = "linux") {
        return PathBuf::from("/proc/self/exe");
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}

/// Slipway's binary as uploaded to hosts: its checksum names it there.
/// The checksum and the compressed bytes are computed once per process
/// (the compressed bytes only when a host lacks the binary).
pub struct AgentBinary {
    path: PathBuf,
    hash: tokio::sync::OnceCell<Result<String, String>>,
    gzipped: tokio::sync::OnceCell<Result<Arc<Vec<u8>>, String>>,
}

impl AgentBinary {
    /// This process's own binary.
    pub fn current() -> &'static AgentBinary {
        static CURRENT: std::sync::OnceLock<AgentBinary> = std::sync::OnceLock::new();
        CURRENT.get_or_init(|| AgentBinary::at(own_binary()))
    }

    /// Another Slipway binary (tests: the built `slipway`, not the test harness).
    pub fn at(path: impl Into<PathBuf>) -> AgentBinary {
        AgentBinary { path: path.into(), hash: tokio::sync::OnceCell::new(), gzipped: tokio::sync::OnceCell::new() }
    }

    /// The first 16 hex digits of the binary's SHA-256.
    pub async fn short_hash(&self) -> Result<String, String> {
        self.hash
            .get_or_init(|| async {
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || -> Result<String, String> {
                    use sha2::Digest as _;
                    let mut f = std::fs::File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    let mut hasher = sha2::Sha256::new();
                    std::io::copy(&mut f, &mut hasher).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    Ok(hex::encode(hasher.finalize())[..16].to_string())
                })
                .await
                .unwrap_or_else(|e| Err(format!("hashing the binary failed: {e}")))
            })
            .await
            .clone()
    }

    /// The binary, gzip'd with fast compression.
    pub async fn gzipped(&self) -> Result<Arc<Vec<u8>>, String> {
        self.gzipped
            .get_or_init(|| async {
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || -> Result<Arc<Vec<u8>>, String> {
                    let mut f = std::fs::File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    std::io::copy(&mut f, &mut gz).map_err(|e| format!("cannot compress {}: {e}", path.display()))?;
                    gz.finish().map(Arc::new).map_err(|e| format!("cannot compress {}: {e}", path.display()))
                })
                .await
                .unwrap_or_else(|e| Err(format!("compressing the binary failed: {e}")))
            })
            .await
            .clone()
    }
}

/// The fixed command that runs the agent at `path` with `verb`.
pub fn agent_command(path: &str, verb: &str) -> String {
    format!("{} agent ssh {verb}", quote(path))
}

/// Make sure this Slipway's binary answers on the host as
/// `<dir>/bin/slipway-<first 16 hex of its sha256>`, uploading it if not;
/// the remote path. Cached per connection and path.
pub async fn ensure_agent(conn: &Connection, dir: &str, timeout: Duration) -> Result<String, SshError> {
    ensure_agent_with(conn, AgentBinary::current(), dir, timeout).await
}

/// [`ensure_agent`] with a given binary.
pub async fn ensure_agent_with(conn: &Connection, binary: &AgentBinary, dir: &str, timeout: Duration) -> Result<String, SshError> {
    let label = conn.label().to_string();
    let failed = |m: String| SshError::new(SshErrorKind::Failed, format!("{label}: {m}"));
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let hash = binary.short_hash().await.map_err(failed)?;
    let path = format!("{}/bin/slipway-{hash}", dir.trim_end_matches('/'));
    // Held across the check and upload: two jobs starting at once on one
    // host upload once.
    let mut known = tokio::time::timeout(left(), conn.inner.agents.lock())
        .await
        .map_err(|_| SshError::new(SshErrorKind::TimedOut, format!("{label}: another upload of the agent did not finish within {}", humantime::format_duration(timeout))))?;
    if known.contains(&path) {
        return Ok(path);
    }
    let check = agent_command(&path, "version");
    let answers = |out: &Output| out.success() && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|v| v.get("version").is_some());
    if !answers(&conn.output(&check, b"", left()).await?) {
        let gz = binary.gzipped().await.map_err(failed)?;
        conn.upload_gzip(&path, &gz, 0o755, left()).await?;
        let out = conn.output(&check, b"", left()).await?;
        if !answers(&out) {
            return Err(failed(format!("the uploaded agent {path} does not run on the host: {}", out.describe())));
        }
    }
    known.insert(path.clone());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(split_address("10.0.0.1").ok(), Some(("10.0.0.1".into(), 22)));
        assert_eq!(split_address("web:2222").ok(), Some(("web".into(), 2222)));
        assert_eq!(split_address("[::1]:2200").ok(), Some(("::1".into(), 2200)));
        assert_eq!(split_address("[::1]").ok(), Some(("::1".into(), 22)));
        assert_eq!(split_address("fe80::1").ok(), Some(("fe80::1".into(), 22)));
        assert!(split_address("web:x").is_err());
        assert!(split_address("").is_err());
        assert!(split_address("[::1]x").is_err());
        assert!(split_address(":22").is_err());
        assert_eq!(known_hosts_name("h", 22), "h");
        assert_eq!(known_hosts_name("h", 2222), "[h]:2222");
    }

    #[test]
    fn handles_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send_unpin<T: Send + Unpin>() {}
        send_sync::<Connection>();
        send_unpin::<RemoteProcess>();
        send_unpin::<Tunnel>();
        send_sync::<SshError>();
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("/srv/slipway/bin/x"), "'/srv/slipway/bin/x'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn known_hosts_lines() {
        // A hashed entry for "[127.0.0.1]:2222" made by `ssh-keygen -H`
        // with salt "salt" would need the tool; the HMAC is computed here.
        let salt = b"0123456789abcdef0123";
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
        let tag = ring::hmac::sign(&key, b"[127.0.0.1]:2222");
        let hashed = format!("|1|{}|{}", data_encoding::BASE64.encode(salt), data_encoding::BASE64.encode(tag.as_ref()));
        let text = format!("# comment\n\n{hashed} {ED}\nother {ED}\n*.example.com,!bad.example.com {ED}\n@revoked web {ED}\n@cert-authority * {ED}\ngarbage\n");
        assert_eq!(pinned_keys(&text, "[127.0.0.1]:2222").len(), 1);
        assert_eq!(pinned_keys(&text, "[127.0.0.1]:2223").len(), 0);
        assert_eq!(pinned_keys(&text, "other").len(), 1);
        assert_eq!(pinned_keys(&text, "A.Example.com").len(), 1);
        assert_eq!(pinned_keys(&text, "bad.example.com").len(), 0);
        let web = pinned_keys(&text, "web");
        assert_eq!(web.len(), 1);
        assert!(web[0].revoked);
    }
}
