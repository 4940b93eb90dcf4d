//! The API's HTTP server loop.
//!
//! Why not `axum::serve`: it sets hyper no timer, so a client that sends
//! its request head or body slowly, or not at all, held its connection
//! and a task for ever (every network wait has a bound here). Each
//! connection is served by hyper's HTTP/1 server with a bound on reading a
//! request's head ([`HEAD_READ`], also how long an idle keep-alive
//! connection stays), and each request's body must have arrived within
//! [`BODY_READ`] of the request. Answers (a log follow) are not bounded.

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a connection may take to send a request's head, counted from
/// when the server starts waiting for it.
pub const HEAD_READ: Duration = Duration::from_secs(30);
/// How long a request's body may take to arrive, from when it is read.
/// (Bodies are at most 64 KiB, a hook's a few MiB.)
pub const BODY_READ: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` until `stop`; then each connection finishes
/// the request it is serving and closes, and this returns when all have.
/// Each request carries its peer as `ConnectInfo<SocketAddr>`.
pub async fn serve<L>(listener: L, app: Router, stop: CancellationToken)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    serve_within(listener, app, stop, HEAD_READ, BODY_READ).await;
}

async fn serve_within<L>(mut listener: L, app: Router, stop: CancellationToken, head_read: Duration, body_read: Duration)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let connections = TaskTracker::new();
    // Dropped (this task aborted, a stop that took too long): every
    // connection ends at once, mid-request or not.
    let gone = CancellationToken::new();
    let _gone = gone.clone().drop_guard();
    loop {
        let (io, peer) = tokio::select! {
            c = listener.accept() => c,
            () = stop.cancelled() => break,
        };
        let (app, stop, gone) = (app.clone(), stop.clone(), gone.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let mut req = req.map(|b| Body::new(Deadline::new(b, body_read)));
                req.extensions_mut().insert(ConnectInfo(peer));
                // A Router is always ready.
                tower_service::Service::call(&mut app.clone(), req)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(head_read).keep_alive(true);
            let mut conn = pin!(builder.serve_connection(TokioIo::new(io), service));
            tokio::select! {
                _ = conn.as_mut() => return,
                () = gone.cancelled() => return,
                () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            tokio::select! {
                _ = conn => {}
                () = gone.cancelled() => {}
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// A request body that fails once its deadline has passed.
struct Deadline {
    inner: Incoming,
    bound: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(inner: Incoming, bound: Duration) -> Self {
        Deadline { inner, bound, sleep: Box::pin(tokio::time::sleep(bound)) }
    }
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(axum::Error::new)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let bound = self.bound;
                Poll::Ready(Some(Err(axum::Error::new(format!("the request body did not arrive within {}s", bound.as_secs())))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn server() -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/peer", axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }))
            .route("/echo", axum::routing::post(|body: String| async move { body }));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_within(listener, app, stop.clone(), Duration::from_secs(1), Duration::from_secs(1)));
        (addr, stop, task)
    }

    /// Everything the server sends until it closes, or what came within 10 s.
    async fn answer(c: &mut TcpStream) -> (String, bool) {
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await.is_ok();
        (String::from_utf8_lossy(&got).into_owned(), closed)
    }

    /// Issue 19 (left by the twelfth session): `axum::serve` set no timer,
    /// so a client that never finished its request head or body held its
    /// connection for ever.
    #[tokio::test]
    async fn issue19_a_request_that_never_arrives_whole_does_not_hold_its_connection() {
        let (addr, stop, task) = server().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let (_, closed) = answer(&mut c).await;
        assert!(closed, "a head that never ends: the server closes the connection");

        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc").await.unwrap();
        let (got, closed) = answer(&mut c).await;
        assert!(closed && got.starts_with("HTTP/1.1 400"), "a body that never ends: an answer, then the connection closes: {got:?}");
        assert!(got.contains("did not arrive within 1s"), "{got:?}");

        // A whole request is served as before, with its peer.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let me = c.local_addr().unwrap();
        c.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let (got, _) = answer(&mut c).await;
        assert!(got.starts_with("HTTP/1.1 200") && got.ends_with(&me.to_string()), "{got:?}");
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello").await.unwrap();
        assert!(answer(&mut c).await.0.ends_with("\r\n\r\nhello"));

        // Stopped: an idle connection closes and the server returns.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("the server returns once stopped").unwrap();
        assert!(answer(&mut idle).await.1);
    }
}
