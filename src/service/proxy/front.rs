//! The proxy's side towards clients, for plain requests: read, routed
//! and answered without hyper's server.
//!
//! Why: under load, hyper's server (parsing into a `Request`, its
//! `HeaderMap`, the service call, encoding the `Response`) was the largest
//! piece of the proxy's user-space time per request that nginx does not
//! spend (`docs/design/rollouts.md`, "The proxy's own server for plain
//! requests"). Most requests a service gets are plain: HTTP/1.1, a path,
//! headers, no body. Those are parsed in place by `httparse` (the parser
//! hyper uses), their head for the instance is written straight from the
//! parsed fields, and the answer's head is written into one buffer with
//! the start of its body.
//!
//! What is plain, and so served here: a complete head of HTTP/1.1, within
//! [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers, a method other than
//! CONNECT, a target in origin form (`/path?query`) that `http` accepts,
//! and no `content-length`, `transfer-encoding`, `expect` or `upgrade`
//! header; `connection` may say only `keep-alive` or `close`. With no
//! framing header there is no body, so how long the message is cannot be
//! read two ways (request smuggling needs a body). Anything else, a
//! malformed head included, hands the connection over to hyper's server
//! for the rest of its life, with every byte read so far ([`Rewind`]):
//! its parser decides, and answers the errors (400, 431, ...), as before.
//!
//! The answer is written as hyper's server writes it: the status with its
//! canonical reason, the headers as the instance sent them (less the
//! hop-by-hop ones), `content-length` or `transfer-encoding: chunked` as
//! hyper would choose, trailers only if the response declared them in
//! `trailer` (and never those hyper refuses), `date` unless the instance
//! sent one, `connection: close` when the connection ends after it.
//!
//! **Invariant:** nothing here waits without a bound: a request head has
//! [`super::CLIENT_IDLE_TIMEOUT`] to arrive (an idle keep-alive connection
//! too), the exchange runs under the proxy's timeouts, and each write to
//! the client is bounded by [`super::WriteDeadline`].

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::upstream::{RequestHead, put_raw_field};
use super::{Answer, CLIENT_IDLE_TIMEOUT, Client, HOP_BY_HOP, Inner, RequestBody, WriteDeadline, poll_deadline};

/// A request head longer than this (or still arriving past it) goes to
/// hyper, whose own limit is larger and which answers 431 beyond it.
const MAX_HEAD: usize = 16 * 1024;
/// Headers of a plain request; more go to hyper (whose limit is 100).
const MAX_HEADERS: usize = 64;
/// What one read asks the socket for.
const READ_SIZE: usize = 8 * 1024;
/// An answer's body is gathered behind its head, and sent in one write
/// with it, up to this size.
const COPY_BODY: usize = 16 * 1024;

/// The connection's socket, its writes bounded by the idle timeout.
type Socket = WriteDeadline<TcpStream>;

/// Serve `io`'s requests while they are plain. `None` when the
/// connection is done; otherwise the connection, with every byte read
/// and not yet served, for hyper's server.
pub(super) async fn serve(inner: &Arc<Inner>, mut io: Socket, client: &Client, shutdown: &CancellationToken) -> Option<Rewind<Socket>> {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut out = Vec::with_capacity(1024);
    let mut stopping = std::pin::pin!(shutdown.cancelled());
    loop {
        let plain = match next_request(&mut io, &mut buf, client, shutdown, stopping.as_mut()).await {
            Next::Plain(p) => p,
            Next::Other => return Some(Rewind { read: buf.freeze(), io }),
            Next::End => {
                let _ = io.shutdown().await;
                return None;
            }
        };
        inner.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Plain { method, mut head, close, trailers } = plain;
        // As for any request (see `Inner::handle`): methods that define a
        // body get `content-length: 0` at the instance.
        let framed = matches!(method, Method::POST | Method::PUT | Method::PATCH);
        let mut body = RequestBody::Buffered { data: Bytes::new(), trailers: None };
        let routed = watching_client(&mut io, &mut buf, inner.route(&method, &mut head, &mut body, framed, client)).await;
        // A shutdown lets the request in progress finish, then closes.
        let close = close || shutdown.is_cancelled();
        let written = match routed {
            Ok(answer) => write_answer(&mut io, &mut buf, &mut out, answer, Asked { head: method == Method::HEAD, trailers, close }).await,
            Err(gone) => Err(gone),
        };
        if let Err(e) = written {
            // The client went away, stopped reading, or the instance's
            // body broke off: as with hyper, the connection ends (and the
            // exchange with the instance with it).
            tracing::debug!(service = %inner.service, peer = %client.peer, error = %e, "proxy client connection ended with an error");
            return None;
        }
        if close {
            let _ = io.shutdown().await;
            return None;
        }
    }
}

/// `work` (a request's exchange with an instance, or a wait for more of
/// its answer's body), abandoned if the client closes its connection
/// meanwhile, as hyper's server abandons a request whose client went away:
/// the instance's exchange is dropped and its in-flight count released at
/// once, not when the instance is done. As hyper does, the client's
/// socket is watched only while nothing of it is waiting in `buf`: the
/// first bytes that come (its next request) are kept there and end the
/// watch, so a close after them never costs the request in progress.
async fn watching_client<F: Future>(io: &mut Socket, buf: &mut BytesMut, work: F) -> io::Result<F::Output> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx: &mut Context<'_>| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(done));
        }
        if buf.is_empty() {
            buf.reserve(READ_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed its connection"))),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(_)) | Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// What a connection's next bytes are.
enum Next {
    Plain(Plain),
    /// A request only hyper serves (or one it must refuse).
    Other,
    /// The client closed its side or was silent too long, or the proxy is stopping.
    End,
}

/// A plain request: its head for the instance is made already.
struct Plain {
    method: Method,
    head: RequestHead,
    /// The client said `connection: close`.
    close: bool,
    /// The client said `te: trailers`: a response's trailers may go to it
    /// (hyper's server sends none otherwise).
    trailers: bool,
}

/// What one parse of the buffer found.
enum Parsed {
    /// A plain request, and the length of its head.
    Plain(Plain, usize),
    Other,
    /// More bytes are needed.
    Partial,
}

/// Read until `buf` starts with a whole request head, within
/// [`CLIENT_IDLE_TIMEOUT`] from the call.
async fn next_request(
    io: &mut Socket,
    buf: &mut BytesMut,
    client: &Client,
    shutdown: &CancellationToken,
    mut stopping: Pin<&mut WaitForCancellationFuture<'_>>,
) -> Next {
    // The connection's timer, lent at the first wait and set once.
    let mut deadline = None;
    // How much of `buf` is known to hold no end of a head. The first bytes
    // are parsed at once (so junk, a TLS hello say, gets hyper's 400 at
    // once, as before); after that only once the head's empty line is
    // there: a head arriving a byte at a time is not parsed once per byte.
    let mut scanned: usize = 0;
    loop {
        if shutdown.is_cancelled() {
            return Next::End;
        }
        if !buf.is_empty() {
            let look = scanned == 0 || head_ended(&buf[scanned.saturating_sub(2)..]) || buf.len() > MAX_HEAD;
            scanned = buf.len();
            if look {
                match parse(buf, client) {
                    Parsed::Plain(plain, used) => {
                        buf.advance(used);
                        return Next::Plain(plain);
                    }
                    Parsed::Other => return Next::Other,
                    Parsed::Partial => {}
                }
            }
        }
        buf.reserve(READ_SIZE);
        let read = std::future::poll_fn(|cx: &mut Context<'_>| {
            if let Poll::Ready(r) = tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                return Poll::Ready(Some(r));
            }
            if stopping.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            let timer = deadline.get_or_insert_with(|| {
                let mut loan = client.lend_timer();
                loan.get().as_mut().reset(Instant::now() + CLIENT_IDLE_TIMEOUT);
                loan
            });
            poll_deadline(timer.get(), cx).map(|()| None)
        })
        .await;
        match read {
            Some(Ok(n)) if n > 0 => {}
            // Closed, failed, silent too long or stopping: nothing is
            // answered to a head that never completed (as hyper does for
            // one cut off; one too slow it closes too).
            _ => return Next::End,
        }
    }
}

/// The comma-separated tokens of a header value, trimmed, empty ones left out.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// Whether `bytes` hold the empty line that ends a head (`httparse` takes
/// a bare LF for a line's end too).
fn head_ended(bytes: &[u8]) -> bool {
    bytes.windows(2).enumerate().any(|(i, w)| w[0] == b'\n' && (w[1] == b'\n' || (w[1] == b'\r' && bytes.get(i + 2) == Some(&b'\n'))))
}

/// The request head at the front of `buf`, if it is plain (module doc).
fn parse(buf: &[u8], client: &Client) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Parsed::Partial,
        // Too long, too many headers, or malformed: hyper's to answer.
        _ => return Parsed::Other,
    };
    let (Some(1), Some(method), Some(target)) = (req.version, req.method, req.path) else { return Parsed::Other };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else { return Parsed::Other };
    if method == Method::CONNECT || !target.starts_with('/') {
        return Parsed::Other;
    }
    // What hyper would make of the target, so the instance gets the same
    // (a fragment dropped, say); one it refuses is hyper's to refuse.
    let Ok(target) = PathAndQuery::from_str(target) else { return Parsed::Other };
    let (mut close, mut trailers) = (false, false);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if ["content-length", "transfer-encoding", "expect", "upgrade"].iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes())) {
            return Parsed::Other;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            // Any other token names a header to drop: hyper's path does that.
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Parsed::Other;
                }
            }
        }
        if name.eq_ignore_ascii_case(b"te") {
            trailers |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        }
    }
    // Hop-by-hop headers stay with this connection, as on hyper's path; a
    // `close` token names a header too (`strip_hop_by_hop` drops one so named).
    let hop = |name: &str| HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_str())) || (close && name.eq_ignore_ascii_case("close"));
    let fields = || req.headers.iter().filter(|h| !hop(h.name)).map(|h| (h.name.as_bytes(), h.value));
    let head = RequestHead::from_fields(&method, target.as_str(), fields, client.forwarded.as_ref(), Vec::new());
    Parsed::Plain(Plain { method, head, close, trailers }, used)
}

/// What of the request decides how its answer is written.
struct Asked {
    /// A HEAD: no body, whatever the answer's head says.
    head: bool,
    /// The client takes trailers (`te: trailers`).
    trailers: bool,
    /// The connection ends after this answer.
    close: bool,
}

/// Write `answer` as hyper's server would (module doc); the body is read
/// and written to its end. An error leaves the connection unusable.
async fn write_answer(io: &mut Socket, buf: &mut BytesMut, out: &mut Vec<u8>, answer: Answer, asked: Asked) -> io::Result<()> {
    let Asked { head: head_request, trailers: takes_trailers, close } = asked;
    out.clear();
    let (status, headers, mut body) = match answer {
        Answer::Own(status, message) => {
            status_line(out, status);
            out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
            if close {
                out.extend_from_slice(b"connection: close\r\n");
            }
            put_raw_field(out, b"content-length", message.len().to_string().as_bytes());
            end_head(out, false);
            if !head_request {
                out.extend_from_slice(message.as_bytes());
            }
            return io.write_all(out).await;
        }
        Answer::Relay { status, headers, body } => (status, headers, body),
    };
    // As hyper's server decides (`can_chunked`): no body after a HEAD, a
    // 204 or a 304, whatever the head says.
    let may_have_body = !(head_request || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED);
    let ended = body.is_end_stream();
    let length = body.size_hint().exact();
    let chunked = may_have_body && !ended && length.is_none();

    status_line(out, status);
    let (mut wrote_length, mut has_date) = (false, false);
    let mut declared: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let mut values = headers.get_all(name).iter();
        if *name == header::CONTENT_LENGTH {
            // A HEAD's describes the body a GET would get; otherwise it
            // goes only with a body still to come. (`parse_head` left one.)
            if let Some(value) = values.next()
                && (head_request || (may_have_body && !ended && length.is_some()))
            {
                put_raw_field(out, b"content-length", value.as_bytes());
                wrote_length = true;
            }
            continue;
        }
        if *name == header::TRAILER {
            if !may_have_body {
                continue;
            }
            // One line, its values joined, as hyper writes it.
            out.extend_from_slice(b"trailer: ");
            for (i, value) in values.enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(value.as_bytes());
                declared.extend(tokens(value.as_bytes()).filter_map(|t| HeaderName::from_bytes(t).ok()));
            }
            out.extend_from_slice(b"\r\n");
            continue;
        }
        has_date |= *name == header::DATE;
        for value in values {
            put_raw_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    // hyper adds it to the response's headers: after the instance's, before the framing it adds.
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if may_have_body {
        match (ended, length) {
            (true, _) => out.extend_from_slice(b"content-length: 0\r\n"),
            (false, Some(n)) if !wrote_length => put_raw_field(out, b"content-length", n.to_string().as_bytes()),
            (false, Some(_)) => {}
            (false, None) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
    }
    end_head(out, has_date);
    if !may_have_body || ended {
        return io.write_all(out).await;
    }

    loop {
        // What is ready goes behind what is gathered; a wait sends it first.
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => {
                io.write_all(out).await?;
                out.clear();
                watching_client(io, buf, body.frame()).await?
            }
        };
        let frame = match next {
            None => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                break;
            }
            // Cut short: the client sees a body that does not end, as through hyper.
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if chunked {
                    // Upper-case hex, as hyper writes it.
                    out.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                }
                if out.len() + data.len() > COPY_BODY {
                    io.write_all(out).await?;
                    out.clear();
                    io.write_all(&data).await?;
                } else {
                    out.extend_from_slice(&data);
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
            Err(frame) => {
                // Trailers end the body; they only exist for a chunked one.
                if chunked {
                    out.extend_from_slice(b"0\r\n");
                    if let (Ok(trailers), true) = (frame.into_trailers(), takes_trailers) {
                        put_trailers(out, &trailers, &declared);
                    }
                    out.extend_from_slice(b"\r\n");
                }
                break;
            }
        }
        if out.len() >= COPY_BODY {
            io.write_all(out).await?;
            out.clear();
        }
    }
    io.write_all(out).await
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // A reason must be written (parsers expect one); hyper writes this.
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date` unless the instance sent one, and the empty line.
fn end_head(out: &mut Vec<u8>, has_date: bool) {
    if !has_date {
        out.extend_from_slice(b"date: ");
        put_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The trailers the response declared, less those hyper never sends
/// (they frame, route or describe the body: RFC 9110 §6.5.1).
fn put_trailers(out: &mut Vec<u8>, trailers: &HeaderMap, declared: &[HeaderName]) {
    const REFUSED: [HeaderName; 12] = [
        header::AUTHORIZATION,
        header::CACHE_CONTROL,
        header::CONTENT_ENCODING,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
        header::CONTENT_TYPE,
        header::HOST,
        header::MAX_FORWARDS,
        header::SET_COOKIE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::TE,
    ];
    for (name, value) in trailers {
        if declared.contains(name) && !REFUSED.contains(name) {
            put_raw_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Today's date as HTTP writes it, made once a second per thread (as
/// hyper caches it): formatting it per answer would cost more than the
/// rest of the head.
fn put_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// A connection handed to hyper's server: the bytes already read come
/// first, then the socket's.
pub(super) struct Rewind<T> {
    read: Bytes,
    io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
