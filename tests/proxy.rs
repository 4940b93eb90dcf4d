//! The service proxy over real sockets on 127.0.0.1: axum backends, the
//! proxy in front, reqwest (or raw TCP) clients.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::{any, get};
use serde_json::{Value, json};
use slipway::service::proxy::{Proxy, ProxyOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One backend instance: answers its name on `/`, slowly on `/slow`.
struct Backend {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(name: &'static str) -> Backend {
        let app = Router::new()
            .route("/", get(move || async move { name }))
            .route(
                "/slow",
                get(move || async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    name
                }),
            )
            .route("/hang", get(|| async { tokio::time::sleep(Duration::from_secs(30)).await }))
            .route("/stream", get(stream_body))
            .route("/echo", any(echo));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { signal.cancelled().await }).await.unwrap();
        });
        Backend { addr, stop, task }
    }

    /// Graceful stop, as a rollout would stop an old instance.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("backend stops").unwrap();
    }
}

/// 20 chunks, 50 ms apart.
async fn stream_body() -> Body {
    let chunks = futures_util::stream::unfold(0u32, |i| async move {
        if i == 20 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        Some((Ok::<_, std::io::Error>(format!("chunk {i}\n")), i + 1))
    });
    Body::from_stream(chunks)
}

/// What the backend saw.
async fn echo(req: Request) -> axum::Json<Value> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap();
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in &parts.headers {
        headers.entry(k.to_string()).or_default().push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    axum::Json(json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body_len": body.len(),
        "body_sum": body.iter().map(|b| *b as u64).sum::<u64>(),
    }))
}

async fn proxy(backends: &[&Backend]) -> (Proxy, CancellationToken) {
    let shutdown = CancellationToken::new();
    let p = Proxy::bind("web", "127.0.0.1:0".parse().unwrap(), shutdown.clone()).await.unwrap();
    p.set_backends(backends.iter().map(|b| b.addr).collect());
    (p, shutdown)
}

fn url(p: &Proxy, path: &str) -> String {
    format!("http://{}{path}", p.local_addr())
}

fn client() -> reqwest::Client {
    slipway::http::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

/// Poll `f` until it holds (5 s at most).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    common::eventually(Duration::from_secs(5), what, || std::future::ready(f())).await
}

/// An address where nothing listens.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn get_text(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn round_robin_then_swap() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (p, _shutdown) = proxy(&[&a, &b]).await;
    let c = client();

    let mut seen = Vec::new();
    for _ in 0..6 {
        let (status, body) = get_text(&c, &url(&p, "/")).await;
        assert_eq!(status, 200);
        seen.push(body);
    }
    // Strict alternation, whichever comes first.
    for w in seen.windows(2) {
        assert_ne!(w[0], w[1], "not round-robin: {seen:?}");
    }
    assert!(seen.contains(&"a".to_string()) && seen.contains(&"b".to_string()));

    p.set_backends(vec![b.addr]);
    assert_eq!(p.backends(), vec![b.addr]);
    for _ in 0..6 {
        assert_eq!(get_text(&c, &url(&p, "/")).await, (200, "b".to_string()));
    }
    assert_eq!(p.stats().requests, 12);
    assert_eq!(p.stats().errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_failed_requests_across_swaps() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c3 = Backend::start("c").await;
    let (p, _shutdown) = proxy(&[&a, &b]).await;
    let (a_addr, b_addr, c_addr) = (a.addr, b.addr, c3.addr);

    let done = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let done = done.clone();
        let url = url(&p, "/");
        workers.push(tokio::spawn(async move {
            // One keep-alive client per worker: its connection is reused.
            let c = client();
            let mut by_backend: HashMap<String, u64> = HashMap::new();
            let mut failures = Vec::new();
            while !done.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => match r.text().await {
                        Ok(body) => *by_backend.entry(body).or_default() += 1,
                        Err(e) => failures.push(format!("body: {e:?}")),
                    },
                    Ok(r) => {
                        let status = r.status();
                        failures.push(format!("{status}: {}", r.text().await.unwrap_or_default()));
                    }
                    Err(e) => failures.push(format!("send: {e:?}")),
                }
            }
            (by_backend, failures)
        }));
    }

    let start = Instant::now();
    let mut swaps = 0;
    let first = [vec![a_addr], vec![b_addr], vec![a_addr, b_addr]];
    while start.elapsed() < Duration::from_millis(1500) {
        p.set_backends(first[swaps % 3].clone());
        swaps += 1;
        // The swap cadence under load (scenario, not a wait).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Retire a the way a rollout does: out of the set, drained, stopped.
    p.set_backends(vec![b_addr]);
    eventually("a drained", || p.in_flight(a_addr) == 0).await;
    a.stop().await;
    assert!(TcpStream::connect(a_addr).await.is_err(), "a still listens");
    let second = [vec![b_addr], vec![c_addr], vec![b_addr, c_addr]];
    while start.elapsed() < Duration::from_millis(3000) {
        p.set_backends(second[swaps % 3].clone());
        swaps += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);

    let mut total: HashMap<String, u64> = HashMap::new();
    let mut failures = Vec::new();
    for w in workers {
        let (by_backend, f) = w.await.unwrap();
        for (k, v) in by_backend {
            *total.entry(k).or_default() += v;
        }
        failures.extend(f);
    }
    let ok: u64 = total.values().sum();
    println!("zero downtime: {ok} requests OK, {} failed, {swaps} swaps, per backend {total:?}", failures.len());
    assert!(failures.is_empty(), "{} failed requests, first: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    for name in ["a", "b", "c"] {
        assert!(total.get(name).copied().unwrap_or(0) > 0, "no request reached {name}: {total:?}");
    }
    assert_eq!(p.stats().errors, 0);
    assert_eq!(p.stats().requests, ok);
    for addr in [a_addr, b_addr, c_addr] {
        assert_eq!(p.in_flight(addr), 0);
    }
    b.stop().await;
    c3.stop().await;
}

#[tokio::test]
async fn no_backend_is_503_and_dead_backend_is_502() {
    let shutdown = CancellationToken::new();
    let p = Proxy::bind("web", "127.0.0.1:0".parse().unwrap(), shutdown.clone()).await.unwrap();
    let c = client();

    let (status, body) = get_text(&c, &url(&p, "/")).await;
    assert_eq!(status, 503);
    assert!(body.contains("service web has no healthy instance"), "{body}");
    assert_eq!(p.stats().errors, 1);

    let dead = dead_addr().await;
    p.set_backends(vec![dead]);
    let (status, body) = get_text(&c, &url(&p, "/")).await;
    assert_eq!(status, 502);
    assert!(body.contains("service web") && body.contains(&dead.to_string()), "{body}");
    assert_eq!(p.stats().errors, 2);
    assert_eq!(p.stats().requests, 2);
    assert_eq!(p.in_flight(dead), 0);
}

#[tokio::test]
async fn dead_backend_in_the_set_is_retried_elsewhere() {
    let b = Backend::start("b").await;
    let dead = dead_addr().await;
    let (p, _shutdown) = proxy(&[&b]).await;
    p.set_backends(vec![dead, b.addr]);
    let c = client();
    for _ in 0..4 {
        assert_eq!(get_text(&c, &url(&p, "/")).await, (200, "b".to_string()));
        // Refused at connect: nothing was sent, so a POST may go elsewhere too.
        let r = c.post(url(&p, "/echo")).body("hello").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["body_len"], 5);
    }
    assert_eq!(p.stats().errors, 0);
}

/// A backend that reads each request and hangs up without answering;
/// counts the requests it read.
async fn hang_up_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn sent_requests_are_retried_only_if_idempotent() {
    let b = Backend::start("b").await;
    let (rude, seen) = hang_up_backend().await;
    let (p, _shutdown) = proxy(&[&b]).await;
    p.set_backends(vec![rude, b.addr]);
    let c = client();

    // The request reached `rude`, which hung up: a GET may be sent again.
    for _ in 0..4 {
        assert_eq!(get_text(&c, &url(&p, "/")).await, (200, "b".to_string()));
    }
    assert!(seen.load(Ordering::SeqCst) >= 2, "the hang-up backend was not tried");

    // A POST that reached it must not be: round-robin sends one of two there.
    let before = seen.load(Ordering::SeqCst);
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let r = c.post(url(&p, "/echo")).body("pay once").send().await.unwrap();
        statuses.push(r.status().as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 502]);
    assert_eq!(seen.load(Ordering::SeqCst), before + 1);
    assert_eq!(p.stats().errors, 1);
}

#[tokio::test]
async fn binding_a_port_in_use_says_which() {
    let shutdown = CancellationToken::new();
    let first = Proxy::bind("web", "127.0.0.1:0".parse().unwrap(), shutdown.clone()).await.unwrap();
    let addr = first.local_addr();
    let err = Proxy::bind("web", addr, shutdown.clone()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&addr.to_string()), "{msg}");
    assert!(msg.contains("service \"web\""), "{msg}");
    assert!(msg.contains("Address already in use"), "{msg}");
}

#[tokio::test]
async fn in_flight_counts_until_the_response_is_done() {
    let b = Backend::start("b").await;
    let (p, _shutdown) = proxy(&[&b]).await;
    let c = client();

    let slow = tokio::spawn({
        let c = c.clone();
        let url = url(&p, "/slow");
        async move { get_text(&c, &url).await }
    });
    eventually("request in flight", || p.in_flight(b.addr) == 1).await;
    assert_eq!(slow.await.unwrap(), (200, "b".to_string()));
    eventually("request done", || p.in_flight(b.addr) == 0).await;

    // A client that gives up while the backend is still thinking.
    let impatient = slipway::http::builder().timeout(Duration::from_millis(100)).build().unwrap();
    assert!(impatient.get(url(&p, "/slow")).send().await.is_err());
    eventually("abandoned request released", || p.in_flight(b.addr) == 0).await;

    // Counted while the body streams, released when the client hangs up mid-body.
    let mut r = c.get(url(&p, "/stream")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await.unwrap().is_some());
    assert_eq!(p.in_flight(b.addr), 1, "streaming response no longer counted");
    drop(r);
    drop(c);
    eventually("streaming request released", || p.in_flight(b.addr) == 0).await;

    // And a fully streamed body ends the count.
    let body = client().get(url(&p, "/stream")).send().await.unwrap().text().await.unwrap();
    assert_eq!(body.lines().count(), 20);
    eventually("streamed request done", || p.in_flight(b.addr) == 0).await;
}

#[tokio::test]
async fn forwards_headers_and_bodies() {
    let b = Backend::start("b").await;
    let (p, _shutdown) = proxy(&[&b]).await;

    // Raw bytes, to control exactly which hop-by-hop headers arrive.
    let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
    s.write_all(
        b"GET /echo?x=1&y=2 HTTP/1.1\r\nHost: example.test\r\nConnection: close, x-hop\r\nX-Hop: secret\r\n\
          Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: websocket\r\nTE: trailers\r\n\
          X-Forwarded-For: 10.0.0.1\r\nX-Custom: kept\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await.unwrap().unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let (_, body) = raw.split_once("\r\n\r\n").unwrap();
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["uri"], "/echo?x=1&y=2");
    let h = &v["headers"];
    assert_eq!(h["host"], json!(["example.test"]));
    assert_eq!(h["x-custom"], json!(["kept"]));
    assert_eq!(h["x-forwarded-for"], json!(["10.0.0.1, 127.0.0.1"]));
    assert_eq!(h["x-forwarded-proto"], json!(["http"]));
    for gone in ["x-hop", "keep-alive", "proxy-connection", "upgrade", "te"] {
        assert!(h.get(gone).is_none(), "{gone} forwarded: {h}");
    }

    let c = client();
    let r = c.head(url(&p, "/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-length").is_some_and(|v| v != "0"), "{:?}", r.headers());
    assert!(r.bytes().await.unwrap().is_empty());

    // Small (buffered), large with a length (streamed), large chunked
    // (buffered, then streamed once past the limit).
    for len in [0usize, 100_000, 3 * 1024 * 1024] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let sum: u64 = data.iter().map(|b| *b as u64).sum();
        let r = c.put(url(&p, "/echo")).body(data.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!((v["body_len"].as_u64(), v["body_sum"].as_u64()), (Some(len as u64), Some(sum)));

        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = data.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let r = c.post(url(&p, "/echo")).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!((v["body_len"].as_u64(), v["body_sum"].as_u64()), (Some(len as u64), Some(sum)));
    }
    assert_eq!(p.stats().errors, 0);
}

#[tokio::test]
async fn slow_backend_is_504() {
    let b = Backend::start("b").await;
    let shutdown = CancellationToken::new();
    let options = ProxyOptions { response_timeout: Duration::from_millis(200), ..ProxyOptions::default() };
    let p = Proxy::bind_with("web", "127.0.0.1:0".parse().unwrap(), shutdown, options).await.unwrap();
    p.set_backends(vec![b.addr]);
    let (status, body) = get_text(&client(), &url(&p, "/hang")).await;
    assert_eq!(status, 504);
    assert!(body.contains("service web") && body.contains(&b.addr.to_string()), "{body}");
    assert_eq!(p.stats().errors, 1);
    assert_eq!(p.in_flight(b.addr), 0);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_requests_finish() {
    let b = Backend::start("b").await;
    let (p, shutdown) = proxy(&[&b]).await;
    let slow = tokio::spawn({
        let url = url(&p, "/slow");
        async move { get_text(&client(), &url).await }
    });
    eventually("request in flight", || p.in_flight(b.addr) == 1).await;
    shutdown.cancel();
    let addr = p.local_addr();
    common::eventually(Duration::from_secs(1), "the proxy to stop accepting after shutdown", || async { TcpStream::connect(addr).await.is_err() }).await;
    assert_eq!(slow.await.unwrap(), (200, "b".to_string()));
    tokio::time::timeout(Duration::from_secs(5), p.stopped()).await.expect("proxy stops");
}

#[tokio::test]
async fn issue19_shutdown_closes_an_idle_keep_alive_client_connection() {
    // A client connection waiting idle for its next request must close
    // at shutdown, not at its 75 s idle timeout: nothing else would wake
    // it, and the proxy would not stop before.
    let b = Backend::start("b").await;
    let (p, shutdown) = proxy(&[&b]).await;
    let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    while !got.windows(5).any(|w| w == b"\r\n\r\nb") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("the answer").unwrap();
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), p.stopped()).await.expect("the proxy stops with an idle client connection open");
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("the idle connection is closed").unwrap_or(0);
    assert_eq!(n, 0, "more bytes instead of a close: {}", String::from_utf8_lossy(&buf[..n]));
}

/// A raw HTTP/1.1 backend answering `ok` to GETs with keep-alive: on each
/// connection it answers `answers` requests, then reads the next one and
/// hangs up without answering (a keep-alive timeout firing just as a
/// request arrives). Counts the connections it accepted.
async fn keep_alive_backend(answers: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for answered in 0.. {
                    // One request head (the tests send no bodies to it).
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    if answered == answers {
                        return;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Issue 19 (each client connection keeps its own connections to the
/// backends): a client's requests reuse one backend connection, and a
/// kept connection the backend hung up on is replaced by a fresh one to
/// the same backend for a request that may be sent again, as nginx does
/// with its cached upstream connections, rather than counted as that
/// backend's try (with one backend, a 502).
#[tokio::test]
async fn issue19_backend_connections_are_kept_per_client_and_replaced_when_dropped() {
    // One client connection (reqwest keeps one when requests are sequential).
    let c = slipway::http::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(1).build().unwrap();

    let (steady, accepted) = keep_alive_backend(usize::MAX).await;
    let shutdown = CancellationToken::new();
    let p = Proxy::bind("web", "127.0.0.1:0".parse().unwrap(), shutdown.clone()).await.unwrap();
    p.set_backends(vec![steady]);
    for _ in 0..10 {
        assert_eq!(get_text(&c, &url(&p, "/")).await, (200, "ok".to_string()));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "ten requests of one client over one backend connection");

    // Every backend connection answers once, then drops the next request.
    let (rude, accepted) = keep_alive_backend(1).await;
    p.set_backends(vec![rude]);
    for i in 0..6 {
        assert_eq!(get_text(&c, &url(&p, "/")).await, (200, "ok".to_string()), "GET {i}");
    }
    assert_eq!(p.stats().errors, 0);
    assert_eq!(accepted.load(Ordering::SeqCst), 6, "the first GET opened one; each later one met a dropped request and opened another");
    // A POST that reached the backend is never sent again, fresh
    // connection or not: the backend may have acted on it.
    let r = c.post(url(&p, "/")).body("pay once").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 502);
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
    shutdown.cancel();
}
