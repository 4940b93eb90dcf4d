//! The SSH connection layer (src/targets/ssh/session.rs) against a real
//! OpenSSH sshd on 127.0.0.1: commands, exit codes and signals, streaming,
//! uploads, forwarding, host key pinning, refused keys, dead and silent
//! hosts, a host that stops answering mid-command.

mod sshd;

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use slipway::targets::ssh::session::{self, Chunk, RemoteExit, SshErrorKind};
use sshd::Sshd;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const T: Duration = Duration::from_secs(20);

async fn connect(s: &Sshd) -> session::Connection {
    session::connect(&s.endpoint(T), &s.keys()).await.expect("connect")
}

#[tokio::test]
async fn runs_commands_with_their_output_and_exit_codes() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    assert_eq!(conn.fingerprint(), sshd::fingerprint(&s.host_public_file));
    assert!(conn.fingerprint().starts_with("SHA256:"));
    let out = conn.output("echo out; echo err >&2; exit 3", b"", T).await.expect("run");
    assert_eq!(out.status, Some(RemoteExit::Code(3)));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    // stdin reaches the command; a large input does not block a command
    // that writes as much before it reads.
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = conn.output("head -c 3000000 /dev/zero | wc -c; wc -c", &input, T).await.expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(), ["3000000", "3000000"]);
    let out = conn.output("kill -TERM $$", b"", T).await.expect("run");
    assert_eq!(out.status, Some(RemoteExit::Signal("TERM".into())));
    // A command that never reads its stdin still ends.
    let out = conn.output("exit 0", &vec![0u8; 5_000_000], T).await.expect("run");
    assert!(out.success());
    let err = conn.output("sleep 30", b"", Duration::from_millis(500)).await.expect_err("bounded");
    assert_eq!(err.kind, SshErrorKind::TimedOut);
    assert!(err.message.contains("did not finish within 500ms"), "{}", err.message);
    conn.close().await;
}

#[tokio::test]
async fn streams_output_as_it_comes() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let mut p = conn.spawn("echo first; read x; echo \"got $x\" >&2; exit 4").await.expect("spawn");
    // The first line arrives while the command waits for our input: streamed.
    assert_eq!(tokio::time::timeout(T, p.next()).await.expect("bounded"), Some(Chunk::Stdout(b"first\n".to_vec())));
    p.write(b"hello\n").await.expect("write");
    let mut rest = Vec::new();
    while let Some(c) = tokio::time::timeout(T, p.next()).await.expect("bounded") {
        rest.push(c);
    }
    assert_eq!(rest, [Chunk::Stderr(b"got hello\n".to_vec()), Chunk::Exit(RemoteExit::Code(4))]);
    assert!(p.lost().is_none());
    // EOF on stdin reaches the command.
    let mut p = conn.spawn("cat; echo done").await.expect("spawn");
    p.write(b"abc").await.expect("write");
    p.close_stdin().await.expect("eof");
    let mut out = Vec::new();
    while let Some(c) = tokio::time::timeout(T, p.next()).await.expect("bounded") {
        if let Chunk::Stdout(b) = c {
            out.extend(b);
        }
    }
    assert_eq!(out, b"abcdone\n");
}

#[tokio::test]
async fn uploads_files_atomically() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dest = s.dir.path().join("up/deeper/it's here");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    conn.upload(dest.to_str().expect("utf-8"), &bytes, 0o640, T).await.expect("upload");
    assert_eq!(std::fs::read(&dest).expect("uploaded"), bytes);
    assert_eq!(std::fs::metadata(&dest).expect("meta").permissions().mode() & 0o777, 0o640);
    // Replaced in place; gzip'd on the way.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"#!/bin/sh\necho replaced\n").expect("gzip");
    conn.upload_gzip(dest.to_str().expect("utf-8"), &gz.finish().expect("gzip"), 0o755, T).await.expect("upload");
    assert_eq!(std::fs::read(&dest).expect("uploaded"), b"#!/bin/sh\necho replaced\n");
    assert_eq!(std::fs::metadata(&dest).expect("meta").permissions().mode() & 0o777, 0o755);
    let names: Vec<String> =
        std::fs::read_dir(dest.parent().expect("parent")).expect("list").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["it's here"], "no temporary file is left");
    // A failure says so, and leaves nothing behind.
    let blocked = s.dir.path().join("a-file");
    std::fs::write(&blocked, b"x").expect("write");
    let err = conn.upload(&format!("{}/below", blocked.display()), b"data", 0o644, T).await.expect_err("a file is not a directory");
    assert_eq!(err.kind, SshErrorKind::Failed);
    assert!(err.message.contains("writing") && err.message.contains("exit code"), "{}", err.message);
}

#[tokio::test]
async fn forwards_to_the_hosts_loopback() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    // "The host" is this machine: a server on its 127.0.0.1.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if sock.read_exact(&mut buf).await.is_ok() {
                    let _ = sock.write_all(format!("pong:{}", String::from_utf8_lossy(&buf)).as_bytes()).await;
                }
            });
        }
    });
    for _ in 0..2 {
        let mut tunnel = conn.forward(port).await.expect("forward");
        tunnel.write_all(b"ping").await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(T, tunnel.read_to_end(&mut answer)).await.expect("bounded").expect("read");
        assert_eq!(answer, b"pong:ping");
    }
    // Nothing listens there: refused by the host, as an error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let err = conn.forward(closed).await.err().expect("nothing listens");
    assert_eq!(err.kind, SshErrorKind::Failed);
    assert!(err.message.contains(&format!("127.0.0.1:{closed}")), "{}", err.message);
}

#[tokio::test]
async fn pins_host_keys_from_known_hosts() {
    let s = Sshd::start();
    let ep = s.endpoint(T);
    // Hashed entries (ssh-keygen -H), as OpenSSH writes them by default.
    let file = s.dir.path().join("known_hosts");
    std::fs::write(&file, s.known_hosts()).expect("write");
    let out = sshd::run(std::process::Command::new("ssh-keygen").arg("-H").arg("-f").arg(&file), T);
    assert!(out.status.success());
    let hashed = std::fs::read_to_string(&file).expect("read");
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let conn = session::connect(&ep, &sshd::keys_with(&s.client_key, &hashed)).await.expect("hashed entry");
    assert!(conn.output("true", b"", T).await.expect("run").success());
    // Another key pinned for this host: refused, both fingerprints named.
    let (_, other) = sshd::keygen(s.dir.path(), "other_host_key", "ed25519");
    let other_fp = sshd::fingerprint(&s.dir.path().join("other_host_key.pub"));
    let pinned = format!("[127.0.0.1]:{} {other}\n", s.port);
    let err = session::connect(&ep, &sshd::keys_with(&s.client_key, &pinned)).await.expect_err("changed key");
    assert_eq!(err.kind, SshErrorKind::HostKeyChanged);
    let offered = sshd::fingerprint(&s.host_public_file);
    assert!(
        err.message.starts_with(&format!(
            "web-1 (127.0.0.1:{}): host key mismatch: the host offered {offered}, known_hosts pins {other_fp} for [127.0.0.1]:{}",
            s.port, s.port
        )),
        "{}",
        err.message
    );
    assert!(err.message.contains("update the known_hosts secret"), "{}", err.message);
    // The key pinned for another host (or port) does not count.
    let elsewhere = format!("[127.0.0.1]:{} {}\nweb-1 {}\n", s.port + 1, s.host_public, s.host_public);
    let err = session::connect(&ep, &sshd::keys_with(&s.client_key, &elsewhere)).await.expect_err("unknown");
    assert_eq!(err.kind, SshErrorKind::HostKeyUnknown);
    assert!(err.message.contains(&format!("host key unknown (not in known_hosts): {offered}")), "{}", err.message);
    let err = session::connect(&ep, &sshd::keys_with(&s.client_key, "")).await.expect_err("unknown");
    assert_eq!(err.kind, SshErrorKind::HostKeyUnknown);
    // @revoked wins over a plain pin of the same key.
    let revoked = format!("{}@revoked [127.0.0.1]:{} {}\n", s.known_hosts(), s.port, s.host_public);
    let err = session::connect(&ep, &sshd::keys_with(&s.client_key, &revoked)).await.expect_err("revoked");
    assert_eq!(err.kind, SshErrorKind::HostKeyChanged);
    assert!(err.message.contains("@revoked"), "{}", err.message);
    // The host has an ECDSA key too: with only that one pinned, it is the
    // one asked for (as OpenSSH does), not the preferred Ed25519.
    let ecdsa_only = format!("[127.0.0.1]:{} {}\n", s.port, s.host_ecdsa_public);
    let conn = session::connect(&ep, &sshd::keys_with(&s.client_key, &ecdsa_only)).await.expect("the pinned type");
    assert_eq!(conn.fingerprint(), sshd::fingerprint(&s.dir.path().join("host_key_ecdsa.pub")));
}

#[tokio::test]
async fn a_refused_key_is_auth_refused() {
    let s = Sshd::start();
    let (stranger, _) = sshd::keygen(s.dir.path(), "stranger", "ed25519");
    let err = session::connect(&s.endpoint(T), &sshd::keys_with(&stranger, &s.known_hosts())).await.expect_err("not authorized");
    assert_eq!(err.kind, SshErrorKind::AuthRefused);
    assert_eq!(err.message, format!("web-1 (127.0.0.1:{}): the key was refused for user {}", s.port, s.user));
    // An RSA key works too (once authorized), with a SHA-2 signature.
    let (rsa, rsa_public) = sshd::keygen(s.dir.path(), "rsa_key", "rsa");
    std::fs::write(s.dir.path().join("authorized_keys"), format!("{rsa_public}\n")).expect("authorize");
    let conn = session::connect(&s.endpoint(T), &sshd::keys_with(&rsa, &s.known_hosts())).await.expect("rsa key");
    assert!(conn.output("true", b"", T).await.expect("run").success());
    // The private key is never in a Debug output or an error.
    let keys = s.keys();
    let text = std::fs::read_to_string(&s.client_key).expect("key");
    let body: String = text.lines().nth(1).unwrap_or_default().to_string();
    assert!(!format!("{keys:?}").contains(&body));
    let garbage = s.dir.path().join("garbage");
    std::fs::write(&garbage, "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key at all\n-----END OPENSSH PRIVATE KEY-----\n").expect("write");
    let err = session::connect(&s.endpoint(T), &sshd::keys_with(&garbage, &s.known_hosts())).await.expect_err("bad key");
    assert_eq!(err.kind, SshErrorKind::Failed);
    assert!(err.message.contains("the private key cannot be read") && !err.message.contains("not a key at all"), "{}", err.message);
}

#[tokio::test]
async fn a_closed_port_is_refused_at_once_and_a_silent_one_times_out() {
    let s = Sshd::start();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let mut ep = s.endpoint(T);
    ep.address = format!("127.0.0.1:{closed}");
    let started = Instant::now();
    let err = session::connect(&ep, &s.keys()).await.expect_err("refused");
    assert_eq!(err.kind, SshErrorKind::Refused);
    assert_eq!(err.message, format!("web-1 (127.0.0.1:{closed}): connection refused"));
    assert!(started.elapsed() < T, "not a timeout");
    // Accepts TCP, never sends a banner: the connect timeout ends it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    ep.address = silent.local_addr().expect("addr").to_string();
    let held = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            socks.push(sock);
        }
    });
    ep.connect_timeout = Duration::from_secs(1);
    let err = tokio::time::timeout(T, session::connect(&ep, &s.keys())).await.expect("bounded by the connect timeout").expect_err("silent");
    held.abort();
    assert_eq!(err.kind, SshErrorKind::TimedOut);
    assert!(err.message.contains("timed out after 1s: the host accepted the connection but did not complete the SSH handshake"), "{}", err.message);
}

#[tokio::test]
async fn a_host_that_stops_answering_is_lost() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let mut p = conn.spawn("echo up; sleep 60").await.expect("spawn");
    assert_eq!(tokio::time::timeout(T, p.next()).await.expect("bounded"), Some(Chunk::Stdout(b"up\n".to_vec())));
    // Freeze the host's side of the connection: TCP stays up, nothing answers.
    let frozen = s.session_pids();
    assert!(!frozen.is_empty());
    let cut = Instant::now();
    for pid in &frozen {
        // SAFETY: stops processes of the test's own sshd; Drop kills them.
        unsafe {
            libc::kill(*pid, libc::SIGSTOP);
        }
    }
    let end = tokio::time::timeout(T, p.next()).await.expect("keepalives notice it within the bound");
    assert_eq!(end, None);
    eprintln!("a frozen host was noticed {:?} after it froze", cut.elapsed());
    let lost = p.lost().expect("lost");
    assert_eq!(lost.kind, SshErrorKind::Lost);
    assert!(lost.message.contains("connection lost: the host stopped answering"), "{}", lost.message);
    assert_eq!(conn.lost().map(|e| e.kind), Some(SshErrorKind::Lost));
    let err = conn.spawn("true").await.err().expect("the connection is gone");
    assert_eq!(err.kind, SshErrorKind::Lost);
}
