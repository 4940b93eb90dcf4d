//! The proxy's side towards instances: a small HTTP/1.1 client of its own.
//!
//! Why not hyper's client: it hands every request to its connection's
//! future through a channel and gets the answer back through a oneshot,
//! and builds and encodes a full `Request` per attempt. On the proxy's one
//! thread that was the larger part of the user-space time per request
//! that nginx does not spend (`docs/design/rollouts.md`, "Where the
//! proxy's time goes"). Here the request head is bytes made once per
//! request and written with its body in one write, and the response head
//! is parsed in place by `httparse`, as nginx does; the client side
//! (hyper's server) is unchanged.
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
//!   was sent and nothing followed the response.
//!
//! **Invariant:** nothing here waits without a bound of its caller's:
//! connecting has its own timeout, the exchange runs under the proxy's
//! response timeout, and response bodies under its idle timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::StatusCode;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BoxError, ProxyBody};

/// A response head (or a trailer section) longer than this is refused.
pub(super) const MAX_HEAD: usize = 64 * 1024;
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
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub(super) async fn connect(backend: SocketAddr, timeout: Duration) -> Result<Conn, String> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(backend)).await {
            Err(_) => return Err(format!("connecting timed out after {}", humantime::format_duration(timeout))),
            Ok(Err(e)) => return Err(format!("cannot connect: {e}")),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream, buf: BytesMut::with_capacity(READ_SIZE) })
    }

    /// A kept connection is usable if the instance has neither closed it
    /// nor sent anything unasked. The reactor's readiness answers without
    /// a system call in the usual case (nothing happened since the last
    /// response was read).
    fn still_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
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
/// the `host` fallback (it names the backend) and the framing header.
pub(super) struct RequestHead {
    prefix: Vec<u8>,
    has_host: bool,
}

impl RequestHead {
    /// `headers` must already be what the instance gets (hop-by-hop and
    /// framing headers removed). hyper validated every part on the way
    /// in, so nothing here can split a line.
    pub(super) fn new(method: &hyper::Method, target: &str, headers: &HeaderMap) -> RequestHead {
        let mut prefix = Vec::with_capacity(256 + headers.len() * 32);
        prefix.extend_from_slice(method.as_str().as_bytes());
        prefix.push(b' ');
        prefix.extend_from_slice(target.as_bytes());
        prefix.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers {
            prefix.extend_from_slice(name.as_str().as_bytes());
            prefix.extend_from_slice(b": ");
            prefix.extend_from_slice(value.as_bytes());
            prefix.extend_from_slice(b"\r\n");
        }
        RequestHead { prefix, has_host: headers.contains_key(header::HOST) }
    }

    /// The whole head for one attempt on `backend`, with room for a small body behind it.
    fn encode(&self, backend: SocketAddr, framing: Framing, room: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prefix.len() + 64 + room);
        out.extend_from_slice(&self.prefix);
        if !self.has_host {
            // An HTTP/1.0 client may send none; HTTP/1.1 requires one.
            out.extend_from_slice(format!("host: {backend}\r\n").as_bytes());
        }
        match framing {
            Framing::None => {}
            Framing::Length(n) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
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

/// An exchange that failed, in the instance's words or ours.
#[derive(Debug)]
pub(super) struct Broken(pub(super) String);

fn broken(what: &str, e: io::Error) -> Broken {
    Broken(format!("{what}: {e}"))
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

/// Send one request on `conn` and read the response head. The body, if
/// any, follows with [`UpstreamBody`].
pub(super) async fn exchange(conn: &mut Conn, backend: SocketAddr, head: &RequestHead, body: Outgoing<'_>, head_request: bool) -> Result<ResponseHead, Broken> {
    match body {
        Outgoing::Buffered { data, trailers: None, send_framing } => {
            let framing = if data.is_empty() && !send_framing { Framing::None } else { Framing::Length(data.len() as u64) };
            let small = data.len() <= COPY_BODY;
            let mut out = head.encode(backend, framing, if small { data.len() } else { 0 });
            if small {
                out.extend_from_slice(data);
            }
            conn.stream.write_all(&out).await.map_err(|e| broken("sending the request", e))?;
            if !small {
                conn.stream.write_all(data).await.map_err(|e| broken("sending the request body", e))?;
            }
            read_head(&mut conn.stream, &mut conn.buf, head_request).await
        }
        Outgoing::Buffered { data, trailers: Some(trailers), .. } => {
            let mut out = head.encode(backend, Framing::Chunked, data.len() + 64);
            if !data.is_empty() {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            last_chunk(&mut out, Some(trailers));
            conn.stream.write_all(&out).await.map_err(|e| broken("sending the request", e))?;
            read_head(&mut conn.stream, &mut conn.buf, head_request).await
        }
        Outgoing::Streaming(body) => {
            let framing = match body.size_hint().exact() {
                Some(n) => Framing::Length(n),
                None => Framing::Chunked,
            };
            let out = head.encode(backend, framing, 0);
            let Conn { stream, buf } = conn;
            let (mut rd, mut wr) = stream.split();
            let write = write_streamed(&mut wr, out, body, framing);
            let read = read_head(&mut rd, buf, head_request);
            tokio::pin!(write, read);
            // The instance may answer before it has read the whole body
            // (a 413, say): that answer goes to the client, and the
            // connection is not kept since the body was cut short.
            tokio::select! {
                biased;
                written = &mut write => {
                    written?;
                    read.await
                }
                answered = &mut read => {
                    let mut head = answered?;
                    head.keep_alive = false;
                    Ok(head)
                }
            }
        }
    }
}

fn last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

async fn write_streamed<W: AsyncWrite + Unpin>(wr: &mut W, head: Vec<u8>, mut body: ProxyBody, framing: Framing) -> Result<(), Broken> {
    wr.write_all(&head).await.map_err(|e| broken("sending the request", e))?;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Broken(format!("reading the client's body: {e}")))?;
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if framing == Framing::Chunked {
                    wr.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await.map_err(|e| broken("sending the request body", e))?;
                }
                wr.write_all(&data).await.map_err(|e| broken("sending the request body", e))?;
                if framing == Framing::Chunked {
                    wr.write_all(b"\r\n").await.map_err(|e| broken("sending the request body", e))?;
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    if framing == Framing::Chunked {
        let mut end = Vec::new();
        last_chunk(&mut end, trailers.as_ref());
        wr.write_all(&end).await.map_err(|e| broken("sending the request body", e))?;
    }
    Ok(())
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
            return Err(Broken(if buf.is_empty() {
                "the instance closed the connection without answering".into()
            } else {
                "the instance closed the connection in the middle of its response head".into()
            }));
        }
    }
}

/// One head from the front of `buf` (consumed), or `None` if more bytes are needed.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, Broken> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Broken(format!("the response head is longer than {} KiB", MAX_HEAD / 1024)));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Broken(format!("invalid response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Broken(format!("invalid response status {code}")))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Broken("the instance switched protocols, which the proxy never asks for".into()));
    }
    let http10 = resp.version == Some(0);
    let mut headers = header_map(resp.headers)?;
    buf.advance(used);

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
    Ok(Some(ResponseHead { status, headers, body, keep_alive }))
}

fn header_map(parsed: &[httparse::Header<'_>]) -> Result<HeaderMap, Broken> {
    let mut headers = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| Broken(format!("invalid header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| Broken(format!("invalid value of header {:?}", h.name)))?;
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
                _ => return Err(Broken(format!("invalid content-length {:?}", String::from_utf8_lossy(v.as_bytes())))),
            }
        }
    }
    found.ok_or_else(|| Broken("invalid content-length".into()))
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
                State::ChunkSize if !conn.buf.is_empty() => match httparse::parse_chunk_size(&conn.buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        conn.buf.advance(used);
                        this.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                        continue;
                    }
                    Ok(httparse::Status::Partial) if conn.buf.len() > MAX_HEAD => return this.fail("a chunk size line is too long".into()),
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return this.fail("invalid chunk size line in the response body".into()),
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
                        Ok(httparse::Status::Complete((used, parsed))) => {
                            let trailers = match header_map(parsed) {
                                Ok(t) => t,
                                Err(Broken(e)) => return this.fail(format!("trailers: {e}")),
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
            let read = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf));
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
