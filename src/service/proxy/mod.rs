//! The reverse proxy on a service's stable `listen` address.
//!
//! Clients keep talking to one address while rollouts start instances on
//! fresh ports and swap the backend set with [`Proxy::set_backends`]. The
//! set, the round-robin cursor and the per-backend in-flight counts sit
//! under one mutex, so picking a backend and counting the request against
//! it is atomic with respect to a swap: once `set_backends` has returned,
//! `in_flight(old) == 0` means the old instance can be stopped. A request
//! stays counted until the backend's response body has been read to its
//! end or the exchange is abandoned (client gone, timeout, error).
//!
//! Clients are served HTTP/1.1 with keep-alive: plain requests (no body,
//! the common case) by a small server of our own (`front.rs`), everything
//! else by hyper's server, which a connection goes over to at its first
//! request that is not plain. Backends are spoken to by a small HTTP/1.1
//! client of our own (`upstream.rs`: the request head written as bytes,
//! the response head parsed in place). Each of the two took a share of
//! the proxy's CPU per request that nginx does not spend. Each client
//! connection keeps its own keep-alive connections to the backends it
//! used, in the same task: a request and its response
//! never cross to another task or thread (what a shared pool costs: a
//! hand-off to the pooled connection's task, and back, per request),
//! which is how nginx's single event loop does it. A
//! client that closes its connection after each request (HTTP/1.0, or
//! `Connection: close`) costs a connection to the backend each time, as
//! with nginx without upstream `keepalive`. A request that may be sent
//! again (below) and failed on a kept connection (the backend closed it,
//! say at its keep-alive timeout) first goes to the same backend again on
//! a new connection, as nginx does with its cached connections. A send
//! that fails before any response (refused, reset) is retried on the next
//! backend, once per backend, which is what makes an instance dying
//! mid-rollout invisible. Retrying
//! needs the body again, so request bodies up to [`MAX_BUFFERED_BODY`] are
//! buffered; larger ones are streamed and never retried. Non-idempotent
//! requests are retried only when nothing was sent (a failed connect, or a
//! first write that fails on a kept connection the backend had closed).
//!
//! Every wait is bounded: connecting, the backend's response headers, a
//! body that stops moving in either direction, and a client that stops
//! reading what we write.
//!
//! Design notes: `docs/design/rollouts.md` ("Where the proxy's time goes"
//! and the sections after it).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

mod front;
mod upstream;

use upstream::{Broken, Conn, Outgoing, Pool, RequestHead, ResponseHead, UpstreamBody};

/// Connecting to a backend.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// From the request's last byte sent to having the backend's whole
/// response head (an upload that keeps moving is not cut short by it).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// A body (either direction) that yields nothing for this long is
/// abandoned, and so is a client that accepts no bytes for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Request bodies up to this size are buffered so the request can be
/// retried on another backend.
pub const MAX_BUFFERED_BODY: usize = 1024 * 1024;
/// An idle keep-alive client connection (or one sending its request head
/// this slowly) is closed after this long. Long, like nginx's
/// `keepalive_timeout`, because closing an idle connection races with a
/// client reusing it.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Headers that describe one connection, not the message: never forwarded
/// (RFC 9110 §7.6.1). `expect` is dropped separately: our own server side
/// answers it. `trailer` is not among them (it was in RFC 2616's list):
/// it names the trailer fields, which hyper sends a client only if declared.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("service {service:?}: cannot listen on {addr}: {}", bind_reason(source))]
    Bind { service: String, addr: SocketAddr, source: io::Error },
    #[error("service {service:?}: cannot start the proxy's thread: {source}")]
    Runtime { service: String, source: io::Error },
}

/// The OS's reason, and what to do about it.
fn bind_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => "Address already in use (another process holds the port; pick another `listen` for the service)".into(),
        io::ErrorKind::PermissionDenied => "Permission denied (ports below 1024 need privileges; pick a higher port for the service's `listen`)".into(),
        io::ErrorKind::AddrNotAvailable => "Address not available (no interface of this machine has that IP; check the service's `listen`)".into(),
        _ => e.to_string(),
    }
}

/// Timeouts, for callers (and tests) that cannot live with the defaults.
#[derive(Debug, Clone, Copy)]
pub struct ProxyOptions {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions { connect_timeout: CONNECT_TIMEOUT, response_timeout: RESPONSE_TIMEOUT, idle_timeout: IDLE_TIMEOUT }
    }
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests received from clients, whatever their outcome.
    pub requests: u64,
    /// Requests the proxy answered itself with 502, 503 or 504.
    pub errors: u64,
}

/// A running proxy. Clones share it.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("service", &self.inner.service).field("local_addr", &self.inner.local_addr).field("backends", &self.backends()).finish()
    }
}

struct Inner {
    service: String,
    local_addr: SocketAddr,
    options: ProxyOptions,
    backends: Mutex<Backends>,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Whether we still accept, and how many client connections are open:
    /// what [`Proxy::stopped`] waits on.
    life: watch::Sender<Life>,
}

#[derive(Default)]
struct Backends {
    list: Vec<SocketAddr>,
    next: usize,
    /// Only non-zero counts are kept, so removed backends leave no trace.
    in_flight: InFlightCounts,
}

#[derive(Debug, Clone, Copy)]
struct Life {
    listening: bool,
    connections: usize,
}

impl Proxy {
    /// Bind `addr` now (so a port in use is a clear error at once) and serve until `shutdown` fires.
    pub async fn bind(service: &str, addr: SocketAddr, shutdown: CancellationToken) -> Result<Proxy, ProxyError> {
        Self::bind_with(service, addr, shutdown, ProxyOptions::default()).await
    }

    /// [`Proxy::bind`] with other timeouts.
    pub async fn bind_with(service: &str, addr: SocketAddr, shutdown: CancellationToken, options: ProxyOptions) -> Result<Proxy, ProxyError> {
        let bind_err = |source| ProxyError::Bind { service: service.to_string(), addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;

        let (life, _) = watch::channel(Life { listening: true, connections: 0 });
        let inner = Arc::new(Inner {
            service: service.to_string(),
            local_addr,
            options,
            backends: Mutex::new(Backends::default()),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            life,
        });
        // One thread and one single-threaded runtime per proxy, as nginx
        // runs a worker: a request, its backend exchange and its response
        // never wake another thread (on tokio's shared multi-threaded
        // runtime they did, and on two busy cores those hand-offs cost
        // about a fifth of the proxy's CPU per request).
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| ProxyError::Runtime { service: service.to_string(), source: e })?;
        let listener = listener.into_std().map_err(bind_err)?;
        let (served, stop) = (inner.clone(), shutdown.clone());
        let spawned = std::thread::Builder::new().name(format!("proxy-{service}")).spawn(move || {
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(service = %served.service, error = %e, "proxy cannot use its listening socket");
                        served.life.send_modify(|l| l.listening = false);
                        return;
                    }
                };
                accept_loop(served.clone(), listener, stop).await;
                // Connections finish the request in progress (their own
                // timeouts bound it), then end: the runtime must not drop
                // them before.
                let mut life = served.life.subscribe();
                let _ = life.wait_for(|l| l.connections == 0).await;
            });
        });
        if let Err(e) = spawned {
            inner.life.send_modify(|l| l.listening = false);
            return Err(ProxyError::Runtime { service: service.to_string(), source: e });
        }
        Ok(Proxy { inner })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Replace the backends atomically (round-robin among them). Duplicates
    /// are dropped. Requests already sent to a removed backend finish there.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        let mut list = Vec::with_capacity(backends.len());
        for b in backends {
            if !list.contains(&b) {
                list.push(b);
            }
        }
        tracing::debug!(service = %self.inner.service, backends = ?list, "proxy backends set");
        self.inner.lock().list = list;
    }

    pub fn backends(&self) -> Vec<SocketAddr> {
        self.inner.lock().list.clone()
    }

    /// Requests now in flight to `backend` (a rollout waits for 0, or its drain time, before stopping an instance).
    pub fn in_flight(&self, backend: SocketAddr) -> usize {
        self.inner.lock().in_flight.get(backend)
    }

    /// Counters since start: requests served, and requests the proxy itself answered with an error (502/503/504).
    pub fn stats(&self) -> ProxyStats {
        ProxyStats { requests: self.inner.requests.load(Ordering::Relaxed), errors: self.inner.errors.load(Ordering::Relaxed) }
    }

    /// Resolves once shutdown has fired, the listening socket is closed and
    /// every client connection has ended.
    pub async fn stopped(&self) {
        let mut rx = self.inner.life.subscribe();
        // The sender lives in `inner`, which `self` keeps alive: no error.
        let _ = rx.wait_for(|l| !l.listening && l.connections == 0).await;
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off rather
                // than spin; the listener itself stays usable.
                tracing::warn!(service = %inner.service, error = %e, "proxy cannot accept a connection");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        inner.life.send_modify(|l| l.connections += 1);
        tokio::spawn(serve_connection(inner.clone(), stream, peer, shutdown.clone()));
    }
    drop(listener);
    inner.life.send_modify(|l| l.listening = false);
    tracing::debug!(service = %inner.service, "proxy stopped accepting");
}

/// Decrements the open-connection count however the connection task ends.
struct ConnectionGuard(Arc<Inner>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.life.send_modify(|l| l.connections = l.connections.saturating_sub(1));
    }
}

async fn serve_connection(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr, shutdown: CancellationToken) {
    let _guard = ConnectionGuard(inner.clone());
    let client = Arc::new(Client::new(peer));
    let io = WriteDeadline::new(stream, inner.options.idle_timeout);
    // Plain requests first (`front.rs`); the first other one hands the
    // connection to hyper's server for good.
    if let Some(rest) = front::serve(&inner, io, &client, &shutdown).await {
        serve_with_hyper(inner, rest, client, shutdown).await;
    }
}

async fn serve_with_hyper<T>(inner: Arc<Inner>, io: T, client: Arc<Client>, shutdown: CancellationToken)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = inner.clone();
    let peer = client.peer;
    let service = hyper::service::service_fn(move |req| {
        let (inner, client) = (handler.clone(), client.clone());
        async move { Ok::<_, Infallible>(inner.handle(req, &client).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).keep_alive(true).header_read_timeout(CLIENT_IDLE_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        biased;
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            // Finish the request in progress, then close instead of
            // waiting for the next one.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Clients vanishing mid-exchange is ordinary; not worth a warning.
        tracing::debug!(service = %inner.service, %peer, error = %e, "proxy client connection ended with an error");
    }
}

/// What the proxy keeps for one client connection.
struct Client {
    peer: SocketAddr,
    /// This client's connections to backends (module doc): dropped, and
    /// so closed, when the client's connection ends.
    pool: Arc<Pool>,
    /// The client's address for `x-forwarded-for`, formatted once.
    forwarded: Option<HeaderValue>,
    /// The connection's one timer, lent to each wait in turn: for a
    /// request's head (`front.rs`) and for its answer
    /// (`upstream::answer_within`).
    timer: Mutex<Option<Pin<Box<Sleep>>>>,
}

impl Client {
    fn new(peer: SocketAddr) -> Client {
        Client { peer, pool: Arc::new(Pool::default()), forwarded: HeaderValue::from_str(&peer.ip().to_string()).ok(), timer: Mutex::new(None) }
    }

    /// The connection's timer, for one request; it comes back when the
    /// loan drops. (HTTP/1.1 serves one request at a time per connection,
    /// so a second loan at once only ever makes a timer of its own.)
    fn lend_timer(&self) -> TimerLoan<'_> {
        TimerLoan { client: self, timer: self.timer.lock().unwrap_or_else(|e| e.into_inner()).take() }
    }
}

/// Poll `timer` outside tokio's cooperative budget, as
/// `tokio::time::timeout` polls its own: a wait beside a read that used the
/// task's budget up (a peer flooding bytes faster than they are parsed)
/// would otherwise never see its deadline, and have no bound.
fn poll_deadline(timer: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> Poll<()> {
    let mut deadline = tokio::task::coop::unconstrained(timer.as_mut());
    Pin::new(&mut deadline).poll(cx)
}

struct TimerLoan<'a> {
    client: &'a Client,
    timer: Option<Pin<Box<Sleep>>>,
}

impl TimerLoan<'_> {
    fn get(&mut self) -> &mut Pin<Box<Sleep>> {
        // Made on a connection's first request; reset before each use.
        self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now())))
    }
}

impl Drop for TimerLoan<'_> {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            *self.client.timer.lock().unwrap_or_else(|e| e.into_inner()) = Some(timer);
        }
    }
}

/// Requests in flight per backend. A list, not a hash map: a proxy has a
/// handful of backends (those of the set, and those draining), and a scan
/// of a few entries costs less than hashing an address twice per request.
#[derive(Default)]
struct InFlightCounts(Vec<(SocketAddr, usize)>);

impl InFlightCounts {
    fn get(&self, backend: SocketAddr) -> usize {
        self.0.iter().find(|(b, _)| *b == backend).map_or(0, |(_, n)| *n)
    }

    fn add_one(&mut self, backend: SocketAddr) {
        match self.0.iter_mut().find(|(b, _)| *b == backend) {
            Some((_, n)) => *n += 1,
            None => self.0.push((backend, 1)),
        }
    }

    /// A backend no request is in flight to leaves the list.
    fn remove_one(&mut self, backend: SocketAddr) {
        if let Some(i) = self.0.iter().position(|(b, _)| *b == backend) {
            self.0[i].1 -= 1;
            if self.0[i].1 == 0 {
                self.0.swap_remove(i);
            }
        }
    }
}

/// The backends a request went to: the first (nearly always the only
/// one) kept without an allocation.
#[derive(Default)]
struct Tried {
    first: Option<SocketAddr>,
    more: Vec<SocketAddr>,
}

impl Tried {
    fn push(&mut self, backend: SocketAddr) {
        match self.first {
            None => self.first = Some(backend),
            Some(_) => self.more.push(backend),
        }
    }

    fn contains(&self, backend: &SocketAddr) -> bool {
        self.first.as_ref() == Some(backend) || self.more.contains(backend)
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }
}

/// What a pick found.
enum Pick {
    /// Counted against this backend until the guard drops.
    Backend(InFlight),
    /// The set is empty.
    NoBackends,
    /// Every backend in the set was already tried for this request.
    Exhausted,
}

/// One request counted against one backend.
struct InFlight {
    inner: Arc<Inner>,
    backend: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut b = self.inner.lock();
        b.in_flight.remove_one(self.backend);
    }
}

/// Why a request could not be sent to a backend.
enum SendError {
    /// Connecting failed or timed out: nothing was sent.
    Connect(String),
    /// The exchange failed after connecting; `kept`: on a connection kept
    /// from an earlier request; `sent`: not on the request's first write
    /// (a connection the backend had closed fails there, unsent).
    Broken { error: String, kept: bool, sent: bool },
    /// The request went out whole and no answer came in time.
    NoAnswer,
}

impl SendError {
    /// Whether the request certainly was not sent, so any method may go
    /// to another backend.
    fn nothing_sent(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Broken { sent: false, .. })
    }

    /// A kept connection failed: the backend may just have closed it
    /// (an idle timeout), which says nothing about the backend itself.
    fn on_kept_connection(&self) -> bool {
        matches!(self, SendError::Broken { kept: true, .. })
    }

    fn describe(&self) -> &str {
        match self {
            SendError::Connect(e) | SendError::Broken { error: e, .. } => e,
            SendError::NoAnswer => "no answer in time",
        }
    }
}

/// A request body: kept, so it can be sent again, or streamed once.
enum RequestBody {
    Buffered { data: Bytes, trailers: Option<HeaderMap> },
    Streaming(Option<ProxyBody>),
}

impl RequestBody {
    /// The body for one attempt; `None` once a streamed body was used.
    fn for_attempt(&mut self, send_framing: bool) -> Option<Outgoing<'_>> {
        match self {
            RequestBody::Buffered { data, trailers } => Some(Outgoing::Buffered { data, trailers: trailers.as_ref(), send_framing }),
            RequestBody::Streaming(body) => body.take().map(Outgoing::Streaming),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered { .. })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Backends> {
        // Nothing panics while holding the lock; if something ever did, the
        // data (a list and counters) is still consistent enough to go on.
        self.backends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Round-robin pick among the current set, skipping `tried`, counted
    /// in the same critical section as the pick (see the module doc).
    fn pick(self: &Arc<Self>, tried: &Tried) -> Pick {
        let mut b = self.lock();
        let len = b.list.len();
        if len == 0 {
            return Pick::NoBackends;
        }
        let start = b.next;
        b.next = b.next.wrapping_add(1);
        let Some(backend) = (0..len).map(|i| b.list[start.wrapping_add(i) % len]).find(|a| !tried.contains(a)) else {
            return Pick::Exhausted;
        };
        b.in_flight.add_one(backend);
        Pick::Backend(InFlight { inner: self.clone(), backend })
    }

    /// Send the request to `backend` on a kept connection (unless
    /// `fresh`) or a new one; the response head and the connection its
    /// body follows on.
    async fn send(
        &self,
        pool: &Pool,
        backend: SocketAddr,
        head: &mut RequestHead,
        body: Outgoing<'_>,
        fresh: bool,
        timer: &mut Pin<Box<Sleep>>,
    ) -> Result<(ResponseHead, Conn), SendError> {
        let (conn, kept) = match pool.take(backend).filter(|_| !fresh) {
            Some(c) => (c, true),
            None => (Conn::connect(backend, self.options.connect_timeout).await.map_err(SendError::Connect)?, false),
        };
        upstream::exchange(conn, backend, head, body, self.options.idle_timeout, self.options.response_timeout, timer)
            .await
            .map_err(|Broken { message, sent, no_answer }| if no_answer { SendError::NoAnswer } else { SendError::Broken { error: message, kept, sent } })
    }

    /// A request served by hyper (see `front.rs` for which): everything
    /// a client may send.
    async fn handle(self: Arc<Self>, req: Request<Incoming>, client: &Client) -> Response<ProxyBody> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();

        // A CONNECT asks for a tunnel, which this proxy does not make:
        // passed on, it would reach the instance as `CONNECT /`.
        if parts.method == Method::CONNECT {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, format!("service {}: the proxy does not tunnel (CONNECT)\n", self.service));
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            // RFC 9110 §15.5.6: a 405 names the methods that are allowed.
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
            return r;
        }

        // Answer at once rather than first reading a body for nobody.
        if self.lock().list.is_empty() {
            return self.no_backends().into_response();
        }

        let mut headers = parts.headers;
        // The backend gets a framing header for an empty body when the
        // client framed one, or the method defines a body (RFC 9110
        // §8.6: some servers refuse a POST without a length).
        let framed = headers.contains_key(header::CONTENT_LENGTH)
            || headers.contains_key(header::TRANSFER_ENCODING)
            || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
        strip_hop_by_hop(&mut headers);
        headers.remove(header::EXPECT);
        headers.remove(header::CONTENT_LENGTH);
        // Backends get the origin form (`/path?query`) whatever the client
        // sent, and always HTTP/1.1 so the connection stays keep-alive.
        let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut head = RequestHead::new(&parts.method, target, &headers, client.forwarded.as_ref());

        let mut body = match read_body(body, self.options.idle_timeout).await {
            Ok(b) => b,
            Err(BodyReadError::Idle) => {
                return plain(StatusCode::REQUEST_TIMEOUT, "the request body stopped arriving\n".into());
            }
            Err(BodyReadError::Failed(e)) => {
                return plain(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}\n"));
            }
        };
        self.route(&parts.method, &mut head, &mut body, framed, client).await.into_response()
    }

    /// Send a request to a backend, retrying where that is safe (module
    /// doc), and say what the client gets.
    async fn route(self: &Arc<Self>, method: &Method, head: &mut RequestHead, body: &mut RequestBody, framed: bool, client: &Client) -> Answer {
        let pool = &client.pool;
        let mut timer = client.lend_timer();
        let mut tried = Tried::default();
        let mut last_error: Option<String> = None;
        // The same backend once more, on a new connection (see below).
        let mut again: Option<InFlight> = None;
        loop {
            let fresh = again.is_some();
            let guard = match again.take() {
                Some(g) => g,
                None => match self.pick(&tried) {
                    Pick::Backend(g) => {
                        tried.push(g.backend);
                        g
                    }
                    // The set may have been emptied since the caller looked.
                    Pick::NoBackends if tried.is_empty() => return self.no_backends(),
                    Pick::NoBackends | Pick::Exhausted => break,
                },
            };
            let backend = guard.backend;
            let Some(attempt_body) = body.for_attempt(framed) else { break };
            let sent = self.send(pool, backend, head, attempt_body, fresh, timer.get());
            // Every step of `sent` is bounded: the connect, each write of
            // the request (idle timeout), and the answer once the request
            // is out (response timeout).
            match sent.await {
                Ok((resp, conn)) => {
                    let body = UpstreamBody::new(conn, &resp, pool.clone(), backend);
                    return self.relay(resp, body, guard);
                }
                Err(SendError::NoAnswer) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %self.service, %backend, timeout = ?self.options.response_timeout, "instance did not answer in time");
                    return Answer::Own(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("service {}: instance {backend} did not answer within {}\n", self.service, humanize(self.options.response_timeout)),
                    );
                }
                Err(e) => {
                    // If nothing was sent, any method may go elsewhere;
                    // otherwise the backend may have acted on it.
                    let retry = body.replayable() && (e.nothing_sent() || method.is_idempotent());
                    let described = e.describe();
                    tracing::debug!(service = %self.service, %backend, error = %described, retry, "proxy send failed");
                    last_error = Some(format!("{backend}: {described}"));
                    if !retry {
                        break;
                    }
                    // A kept connection the backend dropped (its keep-alive
                    // timeout, say) says nothing of the backend: a new
                    // connection to it before the next backend, as nginx
                    // does with its cached upstream connections.
                    if e.on_kept_connection() {
                        again = Some(guard);
                    }
                }
            }
        }

        self.errors.fetch_add(1, Ordering::Relaxed);
        let last = last_error.unwrap_or_else(|| "no instance left to try".into());
        tracing::warn!(service = %self.service, error = %last, "no instance answered");
        Answer::Own(StatusCode::BAD_GATEWAY, format!("service {}: no instance answered; last error: {last}\n", self.service))
    }

    fn no_backends(&self) -> Answer {
        self.errors.fetch_add(1, Ordering::Relaxed);
        Answer::Own(StatusCode::SERVICE_UNAVAILABLE, format!("service {} has no healthy instance\n", self.service))
    }

    /// The backend's response, with its body streamed through and the
    /// request counted against the backend until that body ends.
    fn relay(&self, head: ResponseHead, body: UpstreamBody, guard: InFlight) -> Answer {
        let ResponseHead { status, mut headers, .. } = head;
        strip_hop_by_hop(&mut headers);
        let mut body = Watched::new(body, self.options.idle_timeout, Some(guard));
        // Nothing to read (a 204, a HEAD's answer): done with it already.
        if body.inner.is_end_stream() {
            body.finished();
        }
        Answer::Relay { status, headers, body }
    }
}

/// What a client gets for a request.
// One per request, moved once or twice: boxing the large variant would
// cost an allocation per request on the proxy's hot path.
#[allow(clippy::large_enum_variant)]
enum Answer {
    /// The backend's response; its hop-by-hop headers are gone.
    Relay { status: StatusCode, headers: HeaderMap, body: Watched<UpstreamBody> },
    /// The proxy's own answer, a line of plain text: 502, 503 or 504.
    Own(StatusCode, String),
}

impl Answer {
    /// For hyper's server.
    fn into_response(self) -> Response<ProxyBody> {
        match self {
            Answer::Relay { status, headers, body } => {
                let mut resp = Response::new(body.boxed_unsync());
                *resp.status_mut() = status;
                *resp.headers_mut() = headers;
                resp
            }
            Answer::Own(status, message) => plain(status, message),
        }
    }
}

/// Remove hop-by-hop headers, including those the `connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: a scan compares names without hashing,
    // where a remove of each would hash all seven.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

enum BodyReadError {
    Idle,
    Failed(String),
}

/// Buffer the body if it fits in [`MAX_BUFFERED_BODY`]; otherwise stream
/// it (what was read so far, then the rest).
async fn read_body(mut body: Incoming, idle: Duration) -> Result<RequestBody, BodyReadError> {
    // Most requests (GET, HEAD) have none: no timer, no read.
    if body.is_end_stream() {
        return Ok(RequestBody::Buffered { data: Bytes::new(), trailers: None });
    }
    let too_big = body.size_hint().lower() > MAX_BUFFERED_BODY as u64;
    if too_big {
        return Ok(RequestBody::Streaming(Some(Watched::new(body, idle, None).boxed_unsync())));
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyReadError::Idle),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyReadError::Failed(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                size += data.len();
                chunks.push(data);
                if size > MAX_BUFFERED_BODY {
                    let read = futures_util::stream::iter(chunks.into_iter().map(|c| Ok::<_, BoxError>(Frame::data(c))));
                    let rest = BodyStream::new(Watched::new(body, idle, None));
                    return Ok(RequestBody::Streaming(Some(StreamBody::new(read.chain(rest)).boxed_unsync())));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    let data = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    };
    Ok(RequestBody::Buffered { data, trailers })
}

#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}")]
struct IdleBody(Duration);

/// A body passed through with an idle timeout, optionally holding a
/// request's in-flight count until it ends.
struct Watched<B> {
    inner: B,
    idle: Duration,
    /// Created on the first wait: fast bodies never allocate a timer.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    guard: Option<InFlight>,
}

impl<B> Watched<B> {
    fn new(inner: B, idle: Duration, guard: Option<InFlight>) -> Self {
        Watched { inner, idle, timer: None, armed: false, guard }
    }

    /// Read to its end: the request no longer counts against its backend.
    fn finished(&mut self) {
        self.guard = None;
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                // The backend is done with the request once its last byte
                // is here, even if hyper never polls us again.
                if this.inner.is_end_stream() {
                    this.finished();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finished();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.idle;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.guard = None;
                        Poll::Ready(Some(Err(Box::new(IdleBody(this.idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client socket whose writes fail once they have been blocked for
/// `limit`: a client that stops reading must not hold a connection (and
/// a backend's in-flight count) forever.
struct WriteDeadline<T> {
    io: T,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<T> WriteDeadline<T> {
    fn new(io: T, limit: Duration) -> Self {
        WriteDeadline { io, limit, timer: None, armed: false }
    }

    /// Called when a write is blocked: start the clock, or fail if it ran out.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let deadline = Instant::now() + self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading")),
            Poll::Pending => Poll::Pending,
        }
    }

    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => self.blocked(cx).map(Err),
            ready => {
                self.armed = false;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, r)
    }
}

fn plain(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(Bytes::from(message)).map_err(|never| match never {}).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn humanize(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
