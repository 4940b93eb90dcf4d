//! The proxy's side towards instances: a small HTTP/1.1 client of its own.
//!
//! Why not hyper's client: it hands every request to its connection's
//! future through a channel and gets the answer back through a oneshot,
//! and builds and encodes a full `Request` per attempt. On the proxy's one
//! thread that was a large part of the user-space time per request that
//! nginx does not spend; replacing it took a fifth off the proxy's CPU
//! per request (`docs/design/rollouts.md`, "The proxy's own client
//! towards instances"). Here the request head is bytes made once per
//! request and written with its body in one write, and the response head
//! is parsed in place by `httparse`, as nginx does. (The side towards
//! clients is `front.rs` for plain requests, hyper's server for others.)
//!
//! What it speaks, RFC 9112:
//! - requests in origin form, always HTTP/1.1; a body framed by
//!   `content-length`, or chunked when it is streamed without a known
//!   length or carries trailers;
//! - responses: no body for a HEAD request, 1xx, 204 and 304; chunked
//!   when `transfer-encoding` ends in `chunked`; otherwise
//!   `content-length`; otherwise up to the close. Interim 1xx answers
//!   other than 101 are skipped (the proxy never asks for an upgrade, so a
//!   101 is an error);
//! - a connection is kept for the next request only if its response was
//!   framed (not read up to the close), the instance did not say `close`
//!   (or, speaking HTTP/1.0, said `keep-alive`), the whole request body
//!   was sent and nothing followed the response;
//! - a body over [`COPY_BODY`], or streamed, is written while the answer
//!   is awaited: an answer that comes first (a 413, a backend streaming
//!   while it reads) is relayed while a task of its own writes the rest;
//! - a request's trailers go on only if declared in its `trailer` header
//!   and not in [`FORBIDDEN_TRAILERS`].
//!
//! **Invariant:** nothing here waits without a bound of its caller's:
//! connecting has its own timeout, the exchange runs under the proxy's
//! response timeout, response bodies under its idle timeout, and each
//! write of a streamed upload under the idle timeout too.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::StatusCode;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, Sleep};

use super::{BoxError, ProxyBody};

/// A response head (or a trailer section) longer than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// Headers in one response head or trailer section.
const MAX_HEADERS: usize = 128;
/// What one read asks the socket for.
const READ_SIZE: usize = 8 * 1024;
/// Bodies up to this size are copied behind the head and sent in the same
/// write; larger ones are a second write.
const COPY_BODY: usize = 16 * 1024;

/// One connection to an instance, with what was read from it and not yet
/// used.
pub(super) struct Conn {
    io: Io,
    buf: BytesMut,
}

/// A connection whole, or only its reading half while the rest of an
/// upload is still being written beside the response (never kept).
enum Io {
    Whole(TcpStream),
    Reading(OwnedReadHalf),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Whole(s) => Pin::new(s).poll_read(cx, buf),
            Io::Reading(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl Conn {
    pub(super) async fn connect(backend: SocketAddr, timeout: Duration) -> Result<Conn, String> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(backend)).await {
            Err(_) => return Err(format!("connecting timed out after {}", humantime::format_duration(timeout))),
            Ok(Err(e)) => return Err(format!("cannot connect: {e}")),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn { io: Io::Whole(stream), buf: BytesMut::with_capacity(READ_SIZE) })
    }

    /// A kept connection is usable if the instance has neither closed it
    /// nor sent anything unasked. The reactor's readiness answers without
    /// a system call in the usual case (nothing happened since the last
    /// response was read).
    fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        match &self.io {
            Io::Whole(s) => matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            Io::Reading(_) => false,
        }
    }
}

/// Each client connection's idle connections to instances (see the
/// proxy's module doc): dropped, and so closed, with the client's.
#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<Vec<(SocketAddr, Conn)>>,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<(SocketAddr, Conn)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection to `backend` that still looks usable.
    pub(super) fn take(&self, backend: SocketAddr) -> Option<Conn> {
        let mut idle = self.lock();
        idle.retain(|(_, c)| c.still_open());
        let i = idle.iter().position(|(b, _)| *b == backend)?;
        Some(idle.swap_remove(i).1)
    }

    fn give_back(&self, backend: SocketAddr, conn: Conn) {
        self.lock().push((backend, conn));
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body, and no header saying so.
    None,
    Length(u64),
    Chunked,
}

/// The request line and headers, made once per request: everything but
/// the `host` fallback (it names the backend) and the framing header,
/// which each attempt writes behind them in the same buffer.
pub(super) struct RequestHead {
    bytes: Vec<u8>,
    /// Where the request line and headers end in `bytes`.
    prefix: usize,
    has_host: bool,
    /// A HEAD request: its answer has no body, whatever its head says.
    head_request: bool,
    /// The trailer fields the client declared in `trailer`: the only ones
    /// passed on (less those in [`FORBIDDEN_TRAILERS`]).
    declared: Vec<HeaderName>,
}

impl RequestHead {
    /// `headers` must already be what the instance gets (hop-by-hop and
    /// framing headers removed), but for `x-forwarded-*`, written here
    /// (see [`RequestHead::from_fields`]). hyper validated every part on
    /// the way in, so nothing here can split a line.
    pub(super) fn new(method: &hyper::Method, target: &str, headers: &HeaderMap, client: Option<&HeaderValue>) -> RequestHead {
        let declared =
            tokens(headers, &header::TRAILER).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).filter(|n| !FORBIDDEN_TRAILERS.contains(n)).collect();
        let fields = || headers.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
        RequestHead::from_fields(method, target, fields, client, declared)
    }

    /// The head of a request whose `fields` (name and value, as parsed:
    /// names in any case; a fresh iterator each call) are what the instance gets, but for
    /// `x-forwarded-*`: `x-forwarded-for` is what earlier proxies said,
    /// then the client's address (`client`, formatted once per
    /// connection); `x-forwarded-proto` is ours alone. (Written straight
    /// into the head rather than added to a header map, which would grow
    /// it, a reallocation per request.) The caller vouches that no name or
    /// value holds a line break: parsed by hyper or `httparse`.
    pub(super) fn from_fields<'f, I: Iterator<Item = (&'f [u8], &'f [u8])>>(
        method: &hyper::Method,
        target: &str,
        fields: impl Fn() -> I,
        client: Option<&HeaderValue>,
        declared: Vec<HeaderName>,
    ) -> RequestHead {
        let is = |name: &[u8], what: &str| name.eq_ignore_ascii_case(what.as_bytes());
        let mut bytes = Vec::with_capacity(512);
        bytes.extend_from_slice(method.as_str().as_bytes());
        bytes.push(b' ');
        bytes.extend_from_slice(target.as_bytes());
        bytes.extend_from_slice(b" HTTP/1.1\r\n");
        let mut has_host = false;
        for (name, value) in fields() {
            has_host |= is(name, "host");
            if is(name, "x-forwarded-proto") || (client.is_some() && is(name, "x-forwarded-for")) {
                continue;
            }
            put_raw_field(&mut bytes, name, value);
        }
        if let Some(ip) = client {
            bytes.extend_from_slice(b"x-forwarded-for: ");
            for (_, prior) in fields().filter(|(n, _)| is(n, "x-forwarded-for")) {
                bytes.extend_from_slice(prior);
                bytes.extend_from_slice(b", ");
            }
            bytes.extend_from_slice(ip.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"x-forwarded-proto: http\r\n");
        RequestHead { prefix: bytes.len(), bytes, has_host, head_request: method == hyper::Method::HEAD, declared }
    }

    /// The whole head for one attempt on `backend`, in the head's own
    /// buffer (what an earlier attempt added is cut first); the body, if
    /// any, goes behind it.
    fn encode(&mut self, backend: SocketAddr, framing: Framing) -> &mut Vec<u8> {
        use std::io::Write as _;
        let out = &mut self.bytes;
        out.truncate(self.prefix);
        // Writing into a Vec cannot fail.
        if !self.has_host {
            // An HTTP/1.0 client may send none; HTTP/1.1 requires one.
            let _ = write!(out, "host: {backend}\r\n");
        }
        match framing {
            Framing::None => {}
            Framing::Length(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// A request body for one attempt.
pub(super) enum Outgoing<'a> {
    /// Kept, so it can be sent again; `send_framing` says whether an empty
    /// one still gets `content-length: 0` (the client framed one).
    Buffered { data: &'a Bytes, trailers: Option<&'a HeaderMap>, send_framing: bool },
    /// Streamed once.
    Streaming(ProxyBody),
}

/// An exchange that failed, in the instance's words or ours; `sent`:
/// whether any of the request may have reached the instance.
#[derive(Debug)]
pub(super) struct Broken {
    pub(super) message: String,
    pub(super) sent: bool,
    /// The whole request went out, and no answer came within the
    /// response timeout.
    pub(super) no_answer: bool,
}

impl Broken {
    fn new(message: impl Into<String>) -> Broken {
        Broken { message: message.into(), sent: true, no_answer: false }
    }
}

/// The answer's head, awaited at most `within` once the request is out,
/// on the client connection's one timer: moving a registered tokio timer
/// later is an atomic update, where a new timer per request was an insert
/// into the timer wheel and a removal from it.
async fn answer_within<F: Future<Output = Result<ResponseHead, Broken>>>(
    within: Duration,
    timer: &mut Pin<Box<Sleep>>,
    read: F,
) -> Result<ResponseHead, Broken> {
    timer.as_mut().reset(Instant::now() + within);
    let mut read = std::pin::pin!(read);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(answer) = read.as_mut().poll(cx) {
            return Poll::Ready(answer);
        }
        // (A backend flooding 1xx heads uses the task's budget up.)
        super::poll_deadline(timer, cx)
            .map(|()| Err(Broken { message: format!("no answer within {}", humantime::format_duration(within)), sent: true, no_answer: true }))
    })
    .await
}

fn broken(what: &str, e: io::Error) -> Broken {
    Broken::new(format!("{what}: {e}"))
}

/// Trailer fields never passed on to an instance, declared or not: they
/// frame, route, authenticate or modify the request (RFC 9110 §6.5.1),
/// and a backend that merged trailers into headers could be misled.
const FORBIDDEN_TRAILERS: [HeaderName; 16] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::HOST,
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::TRAILER,
    header::TE,
    header::CONNECTION,
    header::UPGRADE,
    header::EXPECT,
    header::RANGE,
    header::MAX_FORWARDS,
];

/// What of `trailers` may go to the instance.
fn allowed_trailers(trailers: &HeaderMap, declared: &[HeaderName]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in declared {
        for v in trailers.get_all(name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// A parsed response head, and how its body follows.
pub(super) struct ResponseHead {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    body: BodyFraming,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Send one request on `conn` and read the response head; the connection
/// comes back for the body, which follows with [`UpstreamBody`]. `idle`
/// bounds each write of a streamed body.
pub(super) async fn exchange(
    mut conn: Conn,
    backend: SocketAddr,
    head: &mut RequestHead,
    body: Outgoing<'_>,
    idle: Duration,
    response: Duration,
    timer: &mut Pin<Box<Sleep>>,
) -> Result<(ResponseHead, Conn), Broken> {
    let rest = match body {
        // The usual case: head and body in one write, then the answer.
        Outgoing::Buffered { data, trailers, send_framing } if data.len() <= COPY_BODY => {
            let trailers = trailers.map(|t| allowed_trailers(t, &head.declared)).filter(|t| !t.is_empty());
            match trailers {
                None => {
                    let framing = if data.is_empty() && !send_framing { Framing::None } else { Framing::Length(data.len() as u64) };
                    head.encode(backend, framing).extend_from_slice(data);
                }
                Some(trailers) => {
                    let out = head.encode(backend, Framing::Chunked);
                    if !data.is_empty() {
                        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        out.extend_from_slice(data);
                        out.extend_from_slice(b"\r\n");
                    }
                    last_chunk(out, &trailers);
                }
            };
            None
        }
        // Larger bodies are written beside the wait for the answer, which
        // may come first (a 413, or a backend streaming its answer).
        Outgoing::Buffered { data, trailers, .. } => {
            let body = match trailers {
                None => Full::new(data.clone()).map_err(|never| match never {}).boxed_unsync(),
                Some(t) => {
                    let frames = vec![Ok::<_, BoxError>(Frame::data(data.clone())), Ok(Frame::trailers(t.clone()))];
                    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
                }
            };
            Some(body)
        }
        Outgoing::Streaming(body) => Some(body),
    };
    let Some(body) = rest else {
        let Io::Whole(stream) = &mut conn.io else { return Err(Broken::new("a connection still sending an upload cannot carry a request")) };
        let out = &head.bytes;
        // If the very first write fails, nothing reached the instance.
        // (At most 16 KiB: the socket's buffer takes it; bounded anyway.)
        let stalled = || Broken::new(format!("sending the request: stalled for {}", humantime::format_duration(idle)));
        let unsent = |e| Broken { sent: false, ..broken("sending the request", e) };
        // The socket's buffer nearly always takes it at once: no timer then.
        let n = match stream.try_write(out) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::time::timeout(idle, stream.write(out)).await.map_err(|_| stalled())?.map_err(unsent)?,
            Err(e) => return Err(unsent(e)),
        };
        if n < out.len() {
            tokio::time::timeout(idle, stream.write_all(&out[n..])).await.map_err(|_| stalled())?.map_err(|e| broken("sending the request", e))?;
        }
        let head = answer_within(response, timer, read_head(&mut conn.io, &mut conn.buf, head.head_request)).await?;
        return Ok((head, conn));
    };
    streamed(conn, backend, head, body, idle, response, timer).await
}

/// A body written while the answer is awaited. If the answer's head comes
/// first, the rest of the body goes on being written by a task of its own
/// (bounded by `idle` per write and by the client's body's own idle
/// timeout) while the answer is relayed, and the connection is not kept:
/// a backend may answer before reading everything (a 413) or stream its
/// answer while it reads. The response timeout (`response`) starts once
/// the body is out, as nginx's `proxy_read_timeout` follows its last
/// write: an upload that keeps moving may take as long as it takes.
async fn streamed(
    conn: Conn,
    backend: SocketAddr,
    head: &mut RequestHead,
    body: ProxyBody,
    idle: Duration,
    response: Duration,
    timer: &mut Pin<Box<Sleep>>,
) -> Result<(ResponseHead, Conn), Broken> {
    let framing = match body.size_hint().exact() {
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    };
    let out = head.encode(backend, framing).clone();
    let Conn { io: Io::Whole(stream), mut buf } = conn else { return Err(Broken::new("a connection still sending an upload cannot carry a request")) };
    let (mut rd, wr) = stream.into_split();
    let mut write = Box::pin(write_streamed(wr, out, body, framing, head.declared.clone(), idle));
    // The read borrows the reading half and the buffer until it is done.
    let outcome = {
        let read = read_head(&mut rd, &mut buf, head.head_request);
        tokio::pin!(read);
        tokio::select! {
            biased;
            written = &mut write => match written {
                Ok(wr) => answer_within(response, timer, read).await.map(|answer| (answer, Some(wr))),
                // The instance may have answered and closed before taking it
                // all (a 413): its answer, if there is one, says more.
                Err(e) => match answer_within(response, timer, read).await {
                    Ok(answer) => Ok((answer, None)),
                    Err(_) => Err(e),
                },
            },
            answered = &mut read => answered.map(|answer| {
                tokio::spawn(async move {
                    if let Err(e) = write.await {
                        tracing::debug!(%backend, error = %e.message, "proxy: the rest of an upload was not sent");
                    }
                });
                (answer, None)
            }),
        }
    };
    let (mut answer, wr) = outcome?;
    let io = match wr {
        Some(wr) => Io::Whole(rd.reunite(wr).map_err(|_| Broken::new("the connection's halves do not match"))?),
        None => {
            answer.keep_alive = false;
            Io::Reading(rd)
        }
    };
    Ok((answer, Conn { io, buf }))
}

fn last_chunk(out: &mut Vec<u8>, trailers: &HeaderMap) {
    out.extend_from_slice(b"0\r\n");
    put_fields(out, trailers);
    out.extend_from_slice(b"\r\n");
}

/// `name: value` lines, as a head or a trailer section has them.
fn put_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        put_raw_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

pub(super) fn put_raw_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

async fn write_streamed(
    mut wr: OwnedWriteHalf,
    head: Vec<u8>,
    mut body: ProxyBody,
    framing: Framing,
    declared: Vec<HeaderName>,
    idle: Duration,
) -> Result<OwnedWriteHalf, Broken> {
    async fn put(wr: &mut OwnedWriteHalf, bytes: &[u8], idle: Duration) -> Result<(), Broken> {
        match tokio::time::timeout(idle, wr.write_all(bytes)).await {
            Ok(r) => r.map_err(|e| broken("sending the request", e)),
            Err(_) => Err(Broken::new(format!("the instance took no request bytes for {}", humantime::format_duration(idle)))),
        }
    }
    put(&mut wr, &head, idle).await?;
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Broken::new(format!("reading the client's body: {e}")))?;
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if framing == Framing::Chunked => {
                let mut chunk = Vec::with_capacity(data.len() + 16);
                chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                chunk.extend_from_slice(&data);
                chunk.extend_from_slice(b"\r\n");
                put(&mut wr, &chunk, idle).await?;
            }
            Ok(data) => put(&mut wr, &data, idle).await?,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = allowed_trailers(&t, &declared);
                }
            }
        }
    }
    if framing == Framing::Chunked {
        let mut end = Vec::new();
        last_chunk(&mut end, &trailers);
        put(&mut wr, &end, idle).await?;
    }
    Ok(wr)
}

/// Read until a final response head is complete, skipping interim 1xx answers.
async fn read_head<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut, head_request: bool) -> Result<ResponseHead, Broken> {
    loop {
        if !buf.is_empty() {
            match parse_head(buf, head_request)? {
                Some(head) if head.status.is_informational() => continue,
                Some(head) => return Ok(head),
                None => {}
            }
        }
        buf.reserve(READ_SIZE);
        let n = rd.read_buf(buf).await.map_err(|e| broken("reading the response", e))?;
        if n == 0 {
            return Err(Broken::new(if buf.is_empty() {
                "the instance closed the connection without answering"
            } else {
                "the instance closed the connection in the middle of its response head"
            }));
        }
    }
}

/// One head from the front of `buf` (consumed), or `None` if more bytes are needed.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, Broken> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    // The limit holds however the bytes arrived: a head that came whole
    // in one read is measured as one that is still arriving.
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) => return Err(Broken::new(format!("the response head is longer than {} KiB", MAX_HEAD / 1024))),
        Err(e) => return Err(Broken::new(format!("invalid response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Broken::new(format!("invalid response status {code}")))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Broken::new("the instance switched protocols, which the proxy never asks for"));
    }
    let http10 = resp.version == Some(0);
    let mut headers = match header_spans(buf, resp.headers) {
        // The parse's borrow of `buf` ends here: the head can be split off.
        Some(spans) => shared_header_map(buf.split_to(used).freeze(), spans)?,
        None => {
            let h = header_map(resp.headers)?;
            buf.advance(used);
            h
        }
    };

    let mut keep_alive = !http10;
    for token in tokens(&headers, &header::CONNECTION) {
        if token.eq_ignore_ascii_case("close") {
            keep_alive = false;
        } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
            keep_alive = true;
        }
    }
    let body = if head_request || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        BodyFraming::Empty
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        // RFC 9112 §6.3: transfer-encoding wins over content-length, and
        // such a connection must not be reused. The length goes: the
        // client must not frame the decoded body by it.
        if headers.contains_key(header::CONTENT_LENGTH) {
            keep_alive = false;
            headers.remove(header::CONTENT_LENGTH);
        }
        // RFC 9112 §6.1: an HTTP/1.0 message with transfer-encoding is
        // framed faultily; close after it.
        if http10 {
            keep_alive = false;
        }
        if tokens(&headers, &header::TRANSFER_ENCODING).last().is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            BodyFraming::Chunked
        } else {
            keep_alive = false;
            BodyFraming::UntilClose
        }
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        BodyFraming::Length(content_length(&headers)?)
    } else {
        keep_alive = false;
        BodyFraming::UntilClose
    };
    // One length, as hyper's server wants it (`2, 2` or two equal lines
    // are valid here but not there); a HEAD's or a 304's length describes
    // a body not sent, so a bad one is dropped rather than fatal.
    if headers.contains_key(header::CONTENT_LENGTH) {
        match content_length(&headers) {
            // A single plain number, the usual case, is kept as it came.
            Ok(_) if single_plain_number(&headers, &header::CONTENT_LENGTH) => {}
            Ok(n) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
            Err(_) => {
                headers.remove(header::CONTENT_LENGTH);
            }
        }
    }
    Ok(Some(ResponseHead { status, headers, body, keep_alive }))
}

/// Whether `name` is one header of digits only, without a leading zero:
/// as `HeaderValue::from` a number would write it.
fn single_plain_number(headers: &HeaderMap, name: &HeaderName) -> bool {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => {
            let b = v.as_bytes();
            !b.is_empty() && b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || b[0] != b'0')
        }
        _ => false,
    }
}

/// Heads of at most this many headers are read without copying their
/// values ([`shared_header_map`]); longer ones are copied.
const SHARED_HEADERS: usize = 32;

/// Offsets and lengths of each header's name and value in a head, and how many there are.
type Spans = ([(usize, usize, usize, usize); SHARED_HEADERS], usize);

/// Where each of `parsed` lies in `buf` (offsets and lengths of name and
/// value), or `None` if there are more than [`SHARED_HEADERS`].
fn header_spans(buf: &[u8], parsed: &[httparse::Header<'_>]) -> Option<Spans> {
    if parsed.len() > SHARED_HEADERS {
        return None;
    }
    let base = buf.as_ptr() as usize;
    let mut spans = [(0usize, 0usize, 0usize, 0usize); SHARED_HEADERS];
    for (h, span) in parsed.iter().zip(spans.iter_mut()) {
        // httparse's slices all point into `buf`.
        *span = (h.name.as_ptr() as usize - base, h.name.len(), h.value.as_ptr() as usize - base, h.value.len());
    }
    Some((spans, parsed.len()))
}

/// The headers of `head` at `spans`, their values sharing the head's
/// bytes instead of each being copied out (an allocation per header per
/// response, in the proxy's hot path).
fn shared_header_map(head: Bytes, (spans, count): Spans) -> Result<HeaderMap, Broken> {
    let mut headers = HeaderMap::with_capacity(count);
    for &(name_at, name_len, value_at, value_len) in &spans[..count] {
        let (name, value) = field(&head[name_at..name_at + name_len], || HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len)))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// One header of a response head or trailer section, its value made by `value`.
fn field(name: &[u8], value: impl FnOnce() -> Result<HeaderValue, hyper::header::InvalidHeaderValue>) -> Result<(HeaderName, HeaderValue), Broken> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    let name = HeaderName::from_bytes(name).map_err(|_| Broken::new(format!("invalid header name {:?}", shown())))?;
    let value = value().map_err(|_| Broken::new(format!("invalid value of header {:?}", shown())))?;
    Ok((name, value))
}

fn header_map(parsed: &[httparse::Header<'_>]) -> Result<HeaderMap, Broken> {
    let mut headers = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let (name, value) = field(h.name.as_bytes(), || HeaderValue::from_bytes(h.value))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The comma-separated tokens of every `name` header.
fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty())
}

/// Every `content-length` value must be the same number (RFC 9110 §8.6).
fn content_length(headers: &HeaderMap) -> Result<u64, Broken> {
    let mut found: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let text = std::str::from_utf8(part).unwrap_or("").trim();
            let n = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) { text.parse::<u64>().ok() } else { None };
            match (n, found) {
                (Some(n), None) => found = Some(n),
                (Some(n), Some(f)) if n == f => {}
                _ => return Err(Broken::new(format!("invalid content-length {:?}", String::from_utf8_lossy(v.as_bytes())))),
            }
        }
    }
    found.ok_or_else(|| Broken::new("invalid content-length"))
}

/// A chunk's size line at the front of `buf` (RFC 9112 §7.1): its length
/// with the CRLF, and the size; `None` if more bytes are needed. Stricter
/// than `httparse::parse_chunk_size`, which takes an empty line as the
/// last chunk: hex digits first, then optional whitespace and extensions,
/// without a bare CR or LF.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    const MAX_LINE: usize = 4096;
    let Some(lf) = buf.iter().take(MAX_LINE).position(|b| *b == b'\n') else {
        return if buf.len() >= MAX_LINE { Err("a chunk size line is too long") } else { Ok(None) };
    };
    let line = match buf[..lf].strip_suffix(b"\r") {
        Some(l) if !l.contains(&b'\r') => l,
        _ => return Err("a chunk size line does not end with CRLF"),
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err("invalid chunk size in the response body");
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err("invalid chunk size in the response body");
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| "invalid chunk size in the response body")?;
    let size = u64::from_str_radix(text, 16).map_err(|_| "invalid chunk size in the response body")?;
    Ok(Some((lf + 1, size)))
}

/// Where a response body is in its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
}

/// A response body read from its connection as hyper's server polls for
/// it; at its end the connection goes back to its pool if it may be kept.
pub(super) struct UpstreamBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    pool: Arc<Pool>,
    backend: SocketAddr,
}

impl UpstreamBody {
    pub(super) fn new(conn: Conn, head: &ResponseHead, pool: Arc<Pool>, backend: SocketAddr) -> UpstreamBody {
        let state = match head.body {
            BodyFraming::Empty | BodyFraming::Length(0) => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::ChunkSize,
            BodyFraming::UntilClose => State::UntilClose,
        };
        let mut body = UpstreamBody { conn: Some(conn), state, keep_alive: head.keep_alive, pool, backend };
        if state == State::Done {
            body.done();
        }
        body
    }

    /// The body is complete: keep the connection if nothing speaks against it.
    fn done(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.pool.give_back(self.backend, conn);
        }
    }

    fn fail(&mut self, message: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.state = State::Done;
        Poll::Ready(Some(Err(message.into())))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let state = this.state;
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            // What the buffer holds decides first; a read only when it is not enough.
            match state {
                State::Done => return Poll::Ready(None),
                State::Length(left) | State::ChunkData(left) if !conn.buf.is_empty() => {
                    let n = left.min(conn.buf.len() as u64);
                    let data = conn.buf.split_to(n as usize).freeze();
                    let left = left - n;
                    this.state = match (state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    if this.state == State::Done {
                        this.done();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize if !conn.buf.is_empty() => match chunk_size(&conn.buf) {
                    Ok(Some((used, size))) => {
                        conn.buf.advance(used);
                        this.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return this.fail(e.into()),
                },
                State::ChunkEnd if conn.buf.len() >= 2 => {
                    if &conn.buf[..2] != b"\r\n" {
                        return this.fail("a chunk of the response body does not end with CRLF".into());
                    }
                    conn.buf.advance(2);
                    this.state = State::ChunkSize;
                    continue;
                }
                State::Trailers if conn.buf.starts_with(b"\r\n") => {
                    conn.buf.advance(2);
                    this.done();
                    return Poll::Ready(None);
                }
                State::Trailers if !conn.buf.is_empty() => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(&conn.buf, &mut slots) {
                        Ok(httparse::Status::Complete((used, _))) if used > MAX_HEAD => return this.fail("the response's trailers are too long".into()),
                        Ok(httparse::Status::Complete((used, parsed))) => {
                            let trailers = match header_map(parsed) {
                                Ok(t) => t,
                                Err(e) => return this.fail(format!("trailers: {}", e.message)),
                            };
                            conn.buf.advance(used);
                            this.done();
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) if conn.buf.len() > MAX_HEAD => return this.fail("the response's trailers are too long".into()),
                        Ok(httparse::Status::Partial) => {}
                        Err(e) => return this.fail(format!("invalid trailers: {e}")),
                    }
                }
                _ => {}
            }
            conn.buf.reserve(READ_SIZE);
            let read = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf));
            match read {
                Ok(0) if state == State::UntilClose => {
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("the instance closed the connection before the end of the response body".into()),
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the response body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size(b"5\r\nhello"), Ok(Some((3, 5))));
        assert_eq!(chunk_size(b"1A;name=value\r\n"), Ok(Some((15, 26))));
        assert_eq!(chunk_size(b"ff \t;x\r\n"), Ok(Some((8, 255))));
        assert_eq!(chunk_size(b"0\r\n\r\n"), Ok(Some((3, 0))));
        assert_eq!(chunk_size(b"5"), Ok(None));
        assert_eq!(chunk_size(b"5\r"), Ok(None));
        // What httparse would take as the last chunk, or let through.
        for bad in [&b"\r\n"[..], b" \r\n", b";x\r\n", b"5\n", b"5;a\rb\r\n", b"zz\r\n", b"5 6\r\n", b"11111111111111111\r\n"] {
            assert!(chunk_size(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(chunk_size(&[b'1'; 5000]).is_err());
    }

    /// A head over the limit is refused whether it arrived whole in one
    /// read or is still arriving (CI at 0af3a90: a 70 KiB head that came
    /// in one read was relayed as a 200); one at the limit is taken.
    #[test]
    fn a_response_head_over_the_limit_is_refused_however_it_arrived() {
        let head = |filler: usize| format!("HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n", "a".repeat(filler));
        let over = head(70 * 1024);
        let whole = parse_head(&mut BytesMut::from(over.as_str()), false);
        assert!(
            whole.as_ref().is_err_and(|e| e.message.contains("longer than 64 KiB")),
            "whole: {:?}",
            whole.map(|h| h.map(|h| h.status)).map_err(|e| e.message)
        );
        let partial = parse_head(&mut BytesMut::from(&over[..over.len() - 2]), false);
        assert!(partial.is_err(), "still arriving");
        let fits = head(MAX_HEAD - 64);
        assert!(fits.len() <= MAX_HEAD);
        let taken = parse_head(&mut BytesMut::from(fits.as_str()), false).map_err(|e| e.message);
        assert!(matches!(taken, Ok(Some(ref h)) if h.status == StatusCode::OK), "at the limit: {:?}", taken.map(|h| h.map(|h| h.status)));
    }

    /// Heads of up to [`SHARED_HEADERS`] headers are read sharing the
    /// head's bytes, longer ones by copying: both give the same headers,
    /// repeated ones in order, and the rest of the buffer (the body)
    /// stays where it was. One plain length is kept as sent; a list, or
    /// one with leading zeros, is made one plain number.
    #[test]
    fn response_headers_are_the_same_however_they_are_read() {
        for extra in [0usize, SHARED_HEADERS + 1] {
            let mut text = String::from("HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nX-Custom: v  \r\nset-cookie: b=2\r\ncontent-length: 7\r\n");
            for i in 0..extra {
                text.push_str(&format!("x-filler-{i}: {i}\r\n"));
            }
            text.push_str("\r\nbody-bytes");
            let mut buf = BytesMut::from(text.as_str());
            let head = parse_head(&mut buf, false).map_err(|e| e.message).expect("parsed").expect("complete");
            let cookies: Vec<&str> = head.headers.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
            assert_eq!(cookies, ["a=1", "b=2"], "{extra} extra headers");
            assert_eq!(head.headers.get("x-custom").unwrap(), "v", "{extra} extra headers");
            assert_eq!(head.headers.get(header::CONTENT_LENGTH).unwrap(), "7");
            assert_eq!(head.headers.len(), 4 + extra);
            assert_eq!(head.body, BodyFraming::Length(7));
            assert_eq!(&buf[..], b"body-bytes");
        }
        for (sent, passed) in [("5, 5", "5"), ("007", "7"), ("0", "0")] {
            let mut listed = BytesMut::from(format!("HTTP/1.1 200 OK\r\ncontent-length: {sent}\r\n\r\n").as_str());
            let head = parse_head(&mut listed, false).map_err(|e| e.message).expect("parsed").expect("complete");
            assert_eq!(head.headers.get(header::CONTENT_LENGTH).unwrap(), passed, "{sent}");
        }
    }

    /// A read that uses the task's tokio budget up on every poll (as one
    /// fed faster than it can parse would) must not keep the answer's
    /// timeout from firing: the timer is polled outside the budget, as
    /// `tokio::time::timeout` polls its own (found in review; fails, by
    /// the outer guard, if the timer is polled inside the budget).
    #[tokio::test]
    async fn the_answer_timeout_fires_even_when_the_read_uses_the_budget_up() {
        let mut timer = Box::pin(tokio::time::sleep(Duration::ZERO));
        let busy = async {
            loop {
                tokio::task::coop::consume_budget().await;
            }
        };
        let waited = tokio::time::timeout(Duration::from_secs(5), answer_within(Duration::from_millis(100), &mut timer, busy)).await;
        match waited {
            Ok(Err(e)) => assert!(e.no_answer && e.message.contains("no answer within"), "{}", e.message),
            Ok(Ok(_)) => panic!("an answer from a read that never ends"),
            Err(_) => panic!("the 100 ms answer timeout did not fire within 5 s"),
        }
    }

    #[test]
    fn only_declared_and_harmless_trailers_go_on() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TRAILER, HeaderValue::from_static("x-sum, content-length, Authorization"));
        let head = RequestHead::new(&hyper::Method::POST, "/", &headers, None);
        assert_eq!(head.declared, vec![HeaderName::from_static("x-sum")]);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        trailers.insert("x-other", HeaderValue::from_static("2"));
        trailers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let allowed = allowed_trailers(&trailers, &head.declared);
        assert_eq!(allowed.len(), 1);
        assert_eq!(allowed.get("x-sum").unwrap(), "1");
    }
}
