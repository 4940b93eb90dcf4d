//! Issue 18: the API and the dashboard over HTTPS (`serve --tls-cert
//! --tls-key`, the client's `--cacert`). Certificates are made by each test
//! with the `openssl` command (tests/common/pki.rs: a CA of its own, a
//! server certificate for 127.0.0.1 signed by it); clients are the real ones: Slipway's CLI,
//! curl, and Debian's Chromium for the dashboard.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use browser::Browser;
use common::pki::{make_ca, make_server, openssl};

fn config() -> tempfile::TempDir {
    common::config_dir("[[job]]\nname = \"hello\"\ncommand = [\"sh\", \"-c\", \"echo hello over tls\"]\n", &[])
}

fn https_server(config: &Path, state: &Path, cert: &Path, key: &Path) -> common::Server {
    let store = format!("sqlite://{}/s.db", state.display());
    let (cert, key) = (cert.to_str().expect("path"), key.to_str().expect("path"));
    let mut server = common::Server::start_logged(config, &store, &["--poll", "100ms", "--tls-cert", cert, "--tls-key", key], state, "");
    server.url = format!("https://127.0.0.1:{}", server.port);
    server
}

/// The CLI against `server`, with `--cacert ca` when given; never the
/// caller's own settings.
fn cli(server: &common::Server, config: &Path, ca: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = server.cli_command(config, &[]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.args(args).env_remove("SLIPWAY_CACERT").env_remove("SLIPWAY_TOKEN").output().expect("run slipway")
}

fn text(o: &Output) -> String {
    format!("{}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// curl (a client that is not Slipway's) with the test's CA: (status, headers, body).
fn curl(url: &str, ca: &Path, headers: &[&str]) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-D", "-", "-o", "-", "--cacert"]).arg(ca);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).stdin(Stdio::null()).output().expect("run curl");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

#[test]
fn issue18_the_api_and_the_cli_over_https_with_a_ca_the_test_made() {
    let dir = config();
    let state = tempfile::tempdir().expect("state");
    let pki = tempfile::tempdir().expect("pki");
    let ca = make_ca(pki.path(), "ca");
    let (cert, key) = make_server(pki.path(), "ca", "server");
    let server = https_server(dir.path(), state.path(), &cert, &key);
    let listening = format!("listening on https://127.0.0.1:{}", server.port);
    common::wait_for(Duration::from_secs(10), "serve to say it listens on https", || server.log_text().contains(&listening));

    // The first admin token may only be made from the Slipway host: the
    // peer's address reaches the API through TLS too.
    let out = cli(&server, dir.path(), Some(&ca), &["token", "create", "root", "--role", "*=admin"]);
    assert!(out.status.success(), "{}", text(&out));
    let token = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    assert!(!token.is_empty(), "a token printed: {}", text(&out));

    // A run, followed to its end over the log stream, then the record.
    let out = cli(&server, dir.path(), Some(&ca), &["--token", &token, "run", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    let ca_env = ca.to_str().expect("path");
    let out = server.cli_command(dir.path(), &["--token", &token, "logs", "1"]).env("SLIPWAY_CACERT", ca_env).output().expect("run slipway");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello over tls"), "SLIPWAY_CACERT is read: {}", text(&out));

    // Without the CA the system's roots refuse the certificate, and the
    // error says what to do: exit 4 (cannot reach), a hint to --cacert.
    let out = cli(&server, dir.path(), None, &["--token", &token, "status"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("over TLS") && err.contains("certificate") && err.contains("--cacert"), "{err}");

    // Plain http to the TLS port: refused, and the server goes on.
    let plain = Command::new("curl").args(["-sS", "--max-time", "5"]).arg(format!("http://127.0.0.1:{}/healthz", server.port)).output().expect("curl");
    assert!(!plain.status.success() || !String::from_utf8_lossy(&plain.stdout).contains("ok"), "plain http answered: {plain:?}");
    // https to a plain http server: the hint says which side is plain.
    let plain_dir = config();
    let plain_state = tempfile::tempdir().expect("state");
    let plain_server = common::Server::start_logged(plain_dir.path(), &format!("sqlite://{}/s.db", plain_state.path().display()), &[], plain_state.path(), "");
    let out = Command::new(common::slipway_bin())
        .args(["--server", &format!("https://127.0.0.1:{}", plain_server.port), "status"])
        .arg("--config")
        .arg(plain_dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run slipway");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plain http"), "{}", text(&out));
    // A SIGHUP (`systemctl reload`) to a node without TLS ends nothing.
    hangup(&plain_server);
    common::wait_for(Duration::from_secs(10), "the SIGHUP logged", || plain_server.log_text().contains("nothing to reload"));
    assert!(common::http_get(plain_server.port, "/healthz").is_some(), "the plain node still answers:\n{}", plain_server.log_text());

    // The dashboard and the API to another client, with the security
    // headers of the plain listener; the audit log saw the peer's address.
    let (status, head, body) = curl(&format!("{}/", server.url), &ca, &[]);
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("<html") && head.to_lowercase().contains("content-security-policy"), "{head}\n{body}");
    let (status, _, body) = curl(&format!("{}/api/v1/audit", server.url), &ca, &[&format!("Authorization: Bearer {token}")]);
    assert_eq!(status, 200, "{body}");
    let audit: serde_json::Value = serde_json::from_str(&body).expect("audit JSON");
    let rows = audit.as_array().or_else(|| audit["entries"].as_array()).cloned().unwrap_or_default();
    assert!(rows.iter().any(|r| r["address"] == "127.0.0.1"), "the peer's address in the audit log: {audit}");

    // A client that connects and never says hello holds only its own
    // connection: the next one is answered before its handshake's 10 s
    // are up (curl gives up after 5).
    let idle = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("idle connection");
    let (status, _, _) = curl(&format!("{}/healthz", server.url), &ca, &[]);
    assert_eq!(status, 200);
    drop(idle);
}

/// Write `from` over `to` the way certbot does: a new file renamed over.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, to).expect("rename");
}

fn hangup(server: &common::Server) {
    // SAFETY: a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) }, 0);
}

fn status_ok(server: &common::Server, config: &Path, ca: &Path) -> bool {
    cli(server, config, Some(ca), &["status"]).status.success()
}

#[test]
fn issue18_sighup_reloads_the_certificate_and_a_bad_renewal_keeps_the_old_one() {
    let dir = config();
    let state = tempfile::tempdir().expect("state");
    let pki = tempfile::tempdir().expect("pki");
    let old_ca = make_ca(pki.path(), "old");
    let new_ca = make_ca(pki.path(), "new");
    let (old_cert, old_key) = make_server(pki.path(), "old", "first");
    let (new_cert, new_key) = make_server(pki.path(), "new", "second");
    // The files serve is given, replaced in place below.
    let (cert, key) = (pki.path().join("live.crt"), pki.path().join("live.key"));
    replace(&old_cert, &cert);
    replace(&old_key, &key);
    let server = https_server(dir.path(), state.path(), &cert, &key);
    assert!(status_ok(&server, dir.path(), &old_ca));
    assert!(!status_ok(&server, dir.path(), &new_ca), "the new CA is not trusted by the old certificate");

    // A renewal gone wrong: the new certificate with the old key.
    replace(&new_cert, &cert);
    hangup(&server);
    common::wait_for(Duration::from_secs(20), "the failed reload in the log", || server.log_text().contains("not reloaded"));
    let log = server.log_text();
    assert!(log.contains("does not belong to the certificate"), "{log}");
    assert!(status_ok(&server, dir.path(), &old_ca), "the old certificate stays in use");

    // The key follows: the next SIGHUP takes the pair.
    replace(&new_key, &key);
    hangup(&server);
    let start = Instant::now();
    while !status_ok(&server, dir.path(), &new_ca) {
        assert!(start.elapsed() < Duration::from_secs(20), "the new certificate served after SIGHUP:\n{}", server.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!status_ok(&server, dir.path(), &old_ca), "the old certificate is gone");
    assert!(server.log_text().contains("TLS certificate reloaded"), "{}", server.log_text());
}

fn serve_fails(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    let port = common::free_port();
    let out = Command::new(common::slipway_bin())
        .arg("--config")
        .arg(config)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .env_remove("SLIPWAY_TLS_CERT")
        .env_remove("SLIPWAY_TLS_KEY")
        .stdin(Stdio::null())
        .output()
        .expect("run slipway serve");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn issue18_bad_tls_files_are_refused_naming_the_file_and_a_ca_certificate_is_explained() {
    let dir = config();
    let pki = tempfile::tempdir().expect("pki");
    make_ca(pki.path(), "ca");
    let (cert, key) = make_server(pki.path(), "ca", "server");
    let (_, other_key) = make_server(pki.path(), "ca", "other");
    let p = |p: &Path| p.to_str().expect("path").to_string();
    let missing = pki.path().join("missing.pem");

    let (code, err) = serve_fails(dir.path(), &["--tls-cert", &p(&missing), "--tls-key", &p(&key)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("--tls-cert {}: cannot read it", missing.display())), "{err}");

    let (code, err) = serve_fails(dir.path(), &["--tls-cert", &p(&cert), "--tls-key", &p(&other_key)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not belong to the certificate") && err.contains(&p(&other_key)), "{err}");

    let (code, err) = serve_fails(dir.path(), &["--tls-cert", &p(&key), "--tls-key", &p(&cert)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("swapped"), "{err}");

    let der = pki.path().join("server.der");
    openssl(pki.path(), &["x509", "-in", "server.pem", "-outform", "der", "-out", "server.der"]);
    let (code, err) = serve_fails(dir.path(), &["--tls-cert", &p(&der), "--tls-key", &p(&key)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not PEM") && err.contains("server.der"), "{err}");

    let (code, err) = serve_fails(dir.path(), &["--tls-cert", &p(&cert)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-key"), "{err}");

    // A self-signed certificate as `openssl req -x509` makes it by default
    // (a CA's): the server takes it, clients refuse it, and the CLI says why.
    openssl(
        pki.path(),
        &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-keyout", "self.key", "-out", "self.pem"]
            .into_iter()
            .chain(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
            .collect::<Vec<_>>(),
    );
    let state = tempfile::tempdir().expect("state");
    let server = https_server(dir.path(), state.path(), &pki.path().join("self.pem"), &pki.path().join("self.key"));
    let out = cli(&server, dir.path(), Some(&pki.path().join("self.pem")), &["status"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("basicConstraints=critical,CA:FALSE") && !err.contains("ERROR"), "{err}");
    drop(server);

    // The client's --cacert, checked before anything is sent.
    let out = Command::new(common::slipway_bin())
        .args(["--server", "https://127.0.0.1:9", "--cacert"])
        .arg(&missing)
        .arg("status")
        .stdin(Stdio::null())
        .output()
        .expect("run slipway");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("--cacert {}: cannot read it", missing.display())), "{}", text(&out));
}

/// The dashboard in a real browser over HTTPS. Chromium is told to trust
/// exactly this server's key (`--ignore-certificate-errors-spki-list`, the
/// SHA-256 of its public key), which is how a browser meets a certificate
/// from a CA it does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue18_the_dashboard_in_a_browser_over_https() {
    let dir = config();
    let state = tempfile::tempdir().expect("state");
    let pki = tempfile::tempdir().expect("pki");
    make_ca(pki.path(), "ca");
    let (cert, key) = make_server(pki.path(), "ca", "server");
    let server = https_server(dir.path(), state.path(), &cert, &key);
    let spki = Command::new("sh")
        .arg("-c")
        .arg("openssl x509 -in server.pem -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64")
        .current_dir(pki.path())
        .output()
        .expect("spki hash");
    let spki = String::from_utf8_lossy(&spki.stdout).trim().to_string();
    assert_eq!(spki.len(), 44, "a base64 SHA-256: {spki:?}");
    let b = Browser::start_with(1200, 800, &[format!("--ignore-certificate-errors-spki-list={spki}")]).await;
    b.goto(&format!("{}/", server.url)).await;
    // The overview, over TLS, with what the API answered through it.
    let out = cli(&server, dir.path(), Some(&pki.path().join("ca.pem")), &["run", "hello"]);
    assert!(out.status.success(), "{}", text(&out));
    b.until("the overview over https", "return location.protocol === 'https:' && document.body.innerText.includes('Recent deployments')").await;
    b.until_text("a", "#1").await;
    b.close().await;
}
