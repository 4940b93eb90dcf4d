//! TLS is really there, for Slipway as a client: HTTPS servers on
//! 127.0.0.1 with certificates made by the `openssl` command-line tool
//! (tests/common/pki.rs: a test CA and a server certificate it signed,
//! plus a self-signed stranger), served with rustls from this test. The real `slipway` binary is the client:
//!
//! - the CLI (`--server https://…`) against the CA's server, first with
//!   the system roots (the certificate is refused as an unknown issuer,
//!   after a TLS handshake the server saw), then trusting the CA through
//!   `SSL_CERT_FILE` (rustls-platform-verifier reads it: the request
//!   arrives), then with no CA certificate at all (a file that does not
//!   exist: a warning, no panic, still refused);
//! - a node with `SSL_CERT_FILE` = the CA and two `[[notify]]` https URLs:
//!   the CA's server gets the deliveries, the stranger's refusal is logged
//!   as an unknown issuer.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const WAIT: Duration = Duration::from_secs(60);

/// `ca.pem`, `server.pem`/`server.key` (signed by the CA, for 127.0.0.1)
/// and `stranger.pem`/`stranger.key` (self-signed, for 127.0.0.1).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    common::pki::make_ca(dir.path(), "ca");
    common::pki::make_server(dir.path(), "ca", "server");
    common::pki::make_stranger(dir.path(), "stranger");
    Pki { dir }
}

/// An HTTPS server on 127.0.0.1:0 answering every request `200 {}`.
/// `seen` records each connection, handshake failure and request.
struct TlsServer {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl TlsServer {
    fn start(cert: &Path, key: &Path) -> TlsServer {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert).expect("cert").collect::<Result<_, _>>().expect("certs");
        let key = PrivateKeyDer::from_pem_file(key).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let s = seen.clone();
        std::thread::spawn(move || {
            for sock in listener.incoming().flatten() {
                let (config, seen) = (config.clone(), s.clone());
                std::thread::spawn(move || serve(sock, config, seen));
            }
        });
        TlsServer { port, seen }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str, f: impl Fn(&[String]) -> bool) -> Vec<String> {
        common::wait_for(WAIT, what, || {
            let seen = self.seen();
            if f(&seen) { Ok(seen) } else { Err(format!("the server saw {seen:?}")) }
        })
    }
}

fn serve(mut sock: TcpStream, config: Arc<rustls::ServerConfig>, seen: Arc<Mutex<Vec<String>>>) {
    let note = |s: String| seen.lock().unwrap().push(s);
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    note("connection".into());
    let mut conn = rustls::ServerConnection::new(config).expect("connection");
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            note(format!("handshake failed: {e}"));
            return;
        }
    }
    note("handshake done".into());
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    note(format!("request {}\n{body}", head.lines().next().unwrap_or("")));
    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// `slipway --server URL status`, with `env` on top of this environment
/// minus any SSL_CERT_FILE / SSL_CERT_DIR of its own.
fn cli_status(url: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new(common::slipway_bin())
        .args(["--server", url, "status"])
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env_remove("SLIPWAY_SERVER")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run slipway");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_cli_speaks_tls_and_checks_the_certificate() {
    let pki = pki();
    let server = TlsServer::start(&pki.path("server.pem"), &pki.path("server.key"));

    // The system roots do not know the test CA.
    let out = cli_status(&server.url(), &[]);
    assert!(out.contains("invalid peer certificate: UnknownIssuer"), "{out}");
    assert!(!out.contains("scheme is not http") && !out.contains("invalid URL") && !out.contains("panicked"), "{out}");
    let seen = server.wait_for("a refused handshake", |s| s.iter().any(|l| l.starts_with("handshake failed")));
    assert!(seen.iter().any(|l| l.contains("received fatal alert: UnknownCA")), "the client refused the certificate: {seen:?}");
    assert!(!seen.iter().any(|l| l.starts_with("request")), "{seen:?}");

    // Trusting the CA through SSL_CERT_FILE: the request arrives over TLS.
    let ca = pki.path("ca.pem");
    let out = cli_status(&server.url(), &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    let seen = server.wait_for("a request", |s| s.iter().any(|l| l.starts_with("request")));
    assert!(seen.iter().any(|l| l.starts_with("request GET /api/v1/services ")), "{seen:?}\n{out}");
    assert!(!out.contains("UnknownIssuer"), "{out}");

    // No CA certificate at all: no panic, every certificate is unknown.
    let before = server.seen().len();
    let out = cli_status(&server.url(), &[("SSL_CERT_FILE", "/nonexistent/ca.pem")]);
    assert!(out.contains("invalid peer certificate: UnknownIssuer") && !out.contains("panicked"), "{out}");
    assert!(out.contains("no CA certificates found on this system"), "{out}");
    server.wait_for("another refused handshake", |s| s[before..].iter().any(|l| l.starts_with("handshake failed")));
}

#[test]
fn notifications_go_over_https_to_trusted_servers_only() {
    let pki = pki();
    let trusted = TlsServer::start(&pki.path("server.pem"), &pki.path("server.key"));
    let stranger = TlsServer::start(&pki.path("stranger.pem"), &pki.path("stranger.key"));
    let config = format!(
        r#"
[[notify]]
url = "{trusted}/hook"

[[notify]]
url = "{stranger}/hook"
on = ["succeeded"]

[[job]]
name = "ok"
command = ["true"]
"#,
        trusted = trusted.url(),
        stranger = stranger.url()
    );
    let dir = common::config_dir(&config, &[]);
    let ext = tempfile::tempdir().expect("tempdir");
    let ca = pki.path("ca.pem");
    let server = common::Server::start_with_env(dir.path(), Some(&common::sqlite_url(ext.path())), &[], &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    let (status, body) = common::post_json(&format!("{}/api/v1/events", server.url), r#"{"kind": "run", "jobs": ["ok"]}"#);
    assert_eq!(status, 202, "{body}");

    let seen = trusted.wait_for("the succeeded notification", |s| s.iter().any(|l| l.starts_with("request POST /hook ") && l.contains("deployment.succeeded")));
    assert!(!seen.iter().any(|l| l.starts_with("handshake failed")), "{seen:?}");
    let delivered: Vec<&String> = seen.iter().filter(|l| l.starts_with("request POST /hook ")).collect();
    assert!(delivered.iter().any(|l| l.contains("deployment.started")), "{seen:?}");

    let seen = stranger.wait_for("a refused handshake", |s| s.iter().any(|l| l.starts_with("handshake failed")));
    assert!(seen.iter().any(|l| l.contains("received fatal alert: UnknownCA")), "{seen:?}");
    // Five tries, 1 + 2 + 4 + 8 s apart, then one line in the node's log.
    let line = common::wait_for(WAIT, "the failed notification in the node's log", || {
        let log = server.log_text();
        log.lines().find(|l| l.contains("notification failed after")).map(str::to_string).ok_or(log)
    });
    assert!(line.contains("invalid peer certificate: UnknownIssuer"), "{line}");
    assert!(!stranger.seen().iter().any(|l| l.starts_with("request")), "nothing was sent to the stranger");
}
