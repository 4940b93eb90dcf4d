//! The host agent (src/targets/ssh/agent.rs), run as the node runs it:
//! `'<slipway>' agent ssh VERB` over SSH to a real sshd on 127.0.0.1, the
//! request as a JSON line on stdin. The host is this machine, so the
//! agent is the built binary itself (ensure_agent's upload is tested once).

mod sshd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use slipway::targets::ssh::agent::{self, EndEarlierReply, HasReply, Marker, RunRequest, SweepReply, UnpackReply};
use slipway::targets::ssh::session::{self, AgentBinary, Chunk, Connection, RemoteExit, RemoteProcess, SshErrorKind};
use sshd::Sshd;

const T: Duration = Duration::from_secs(30);

fn slipway() -> &'static str {
    env!("CARGO_BIN_EXE_slipway")
}

async fn connect(s: &Sshd) -> Connection {
    session::connect(&s.endpoint(T), &s.keys()).await.expect("connect")
}

/// A unique installation name per test (markers live under it).
fn installation() -> String {
    format!("test-{}-{}", std::process::id(), rand::random::<u32>())
}

fn request(dir: &Path, inst: &str, job: &str, attempt: i64, argv: &[&str]) -> RunRequest {
    RunRequest {
        dir: dir.display().to_string(),
        installation: inst.to_string(),
        owner: "1.2".into(),
        deployment: 5,
        job: job.to_string(),
        attempt,
        argv: Some(argv.iter().map(|a| a.to_string()).collect()),
        shell: None,
        env: [("GREETING".to_string(), "hi there".to_string())].into(),
        workdir: dir.display().to_string(),
        timeout_ms: 0,
        kill_grace_ms: 500,
        heartbeat_ms: 0,
    }
}

async fn start(conn: &Connection, req: &RunRequest) -> RemoteProcess {
    let mut p = conn.spawn(&session::agent_command(slipway(), "run")).await.expect("spawn the agent");
    let mut line = serde_json::to_vec(req).expect("json");
    line.push(b'\n');
    p.write(&line).await.expect("send the request");
    p
}

/// Everything until the channel closes: (stdout, stderr, exit).
async fn finish(p: &mut RemoteProcess) -> (String, String, Option<RemoteExit>) {
    let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(c) = tokio::time::timeout(T, p.next()).await.expect("the agent ends within the bound") {
        match c {
            Chunk::Stdout(b) => out.extend(b),
            Chunk::Stderr(b) => err.extend(b),
            Chunk::Exit(e) => exit = Some(e),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned(), exit)
}

/// One request/reply verb; (reply, exit).
async fn verb<T: serde::de::DeserializeOwned>(conn: &Connection, name: &str, request: serde_json::Value) -> (Result<T, String>, Option<RemoteExit>) {
    verb_with(conn, name, request, b"").await
}

async fn verb_with<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    name: &str,
    request: serde_json::Value,
    extra: &[u8],
) -> (Result<T, String>, Option<RemoteExit>) {
    let mut stdin = serde_json::to_vec(&request).expect("json");
    stdin.push(b'\n');
    stdin.extend_from_slice(extra);
    let out = conn.output(&session::agent_command(slipway(), name), &stdin, T).await.expect("run the agent");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let reply = serde_json::from_str::<T>(&text).map_err(|_| text.clone());
    (reply, out.status)
}

fn marker(dir: &Path, inst: &str, job: &str, attempt: i64) -> Option<Marker> {
    serde_json::from_slice(&std::fs::read(agent::marker_path(&dir.display().to_string(), inst, 5, job, attempt)).ok()?).ok()
}

/// The run's marker, once the agent has written it.
async fn wait_marker(dir: &Path, inst: &str, job: &str, attempt: i64) -> Marker {
    let deadline = Instant::now() + T;
    loop {
        if let Some(m) = marker(dir, inst, job, attempt) {
            return m;
        }
        assert!(Instant::now() < deadline, "no marker for {job}.{attempt}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: i32, start: u64) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else { return false };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.first() != Some(&"Z") && f.get(19).and_then(|s| s.parse::<u64>().ok()) == Some(start)
}

async fn wait_gone(pid: i32, start: u64) -> bool {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if !alive(pid, start) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn kill(pid: i32, signal: i32) {
    // SAFETY: plain kill of a process this test started.
    unsafe {
        libc::kill(pid, signal);
    }
}

#[tokio::test]
async fn runs_argv_without_a_shell_and_exits_with_the_jobs_status() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dir = s.dir.path();
    let inst = installation();
    // Each value stays one argument; nothing is expanded.
    let mut p = start(&conn, &request(dir, &inst, "j", 1, &["printf", "%s|", "a; rm -rf /", "$HOME", "*", "$(id)"])).await;
    let (out, err, exit) = finish(&mut p).await;
    assert_eq!((out.as_str(), err.as_str(), exit), ("a; rm -rf /|$HOME|*|$(id)|", "", Some(RemoteExit::Code(0))));
    // The exit code, both streams, the environment given and no other.
    let script = "echo \"out $GREETING\"; echo \"err ${SLIPWAY_OWNER:-none}\" >&2; exit 7";
    let mut p = start(&conn, &request(dir, &inst, "j", 2, &["sh", "-c", script])).await;
    let (out, err, exit) = finish(&mut p).await;
    assert_eq!((out.as_str(), err.as_str(), exit), ("out hi there\n", "err none\n", Some(RemoteExit::Code(7))));
    let m = marker(dir, &inst, "j", 2).expect("marker");
    assert_eq!((m.exit_code, m.signal, m.owner.as_str(), m.attempt), (Some(7), None, "1.2", 2));
    assert!(m.ended_at.is_some() && m.child_start > 0 && m.agent_start > 0);
    // Killed by a signal: 128 + its number.
    let mut p = start(&conn, &request(dir, &inst, "j", 3, &["sh", "-c", "kill -KILL $$"])).await;
    assert_eq!(finish(&mut p).await.2, Some(RemoteExit::Code(128 + 9)));
    assert_eq!(marker(dir, &inst, "j", 3).map(|m| m.signal), Some(Some(9)));
    // The job does not inherit the agent's ignored SIGPIPE.
    let mut p = start(&conn, &request(dir, &inst, "j", 4, &["grep", "SigIgn", "/proc/self/status"])).await;
    let (out, _, _) = finish(&mut p).await;
    let ignored = u64::from_str_radix(out.split_whitespace().nth(1).expect("SigIgn"), 16).expect("hex");
    assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    // A shell only when the spec says `shell`.
    let mut req = request(dir, &inst, "j", 5, &[]);
    req.argv = None;
    req.shell = Some("echo $((6 * 7))".into());
    let mut p = start(&conn, &req).await;
    assert_eq!(finish(&mut p).await.0, "42\n");
}

#[tokio::test]
async fn agent_side_failures_are_its_own_exit_code_and_stderr_line() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dir = s.dir.path();
    let inst = installation();
    let mut p = start(&conn, &request(dir, &inst, "j", 1, &["./nope"])).await;
    let (out, err, exit) = finish(&mut p).await;
    assert_eq!((out.as_str(), err.as_str(), exit), ("", "slipway-agent: cannot start \"./nope\": No such file or directory\n", Some(RemoteExit::Code(125))));
    let mut req = request(dir, &inst, "j", 2, &["true"]);
    req.workdir = dir.join("missing").display().to_string();
    let mut p = start(&conn, &req).await;
    let (_, err, exit) = finish(&mut p).await;
    assert_eq!(exit, Some(RemoteExit::Code(125)));
    assert!(err.contains("working directory") && err.contains("No such file or directory"), "{err}");
    let mut p = start(&conn, &request(dir, &inst, "../escape", 3, &["true"])).await;
    let (_, err, exit) = finish(&mut p).await;
    assert_eq!(exit, Some(RemoteExit::Code(125)));
    assert!(err.contains("invalid job"), "{err}");
    let mut p = conn.spawn(&session::agent_command(slipway(), "run")).await.expect("spawn");
    p.write(b"{not json\n").await.expect("write");
    let (_, err, exit) = finish(&mut p).await;
    assert_eq!(exit, Some(RemoteExit::Code(125)));
    assert!(err.starts_with("slipway-agent: bad request"), "{err}");
    let (reply, exit) = verb::<serde_json::Value>(&conn, "frobnicate", serde_json::json!({})).await;
    assert!(matches!(exit, Some(RemoteExit::Code(c)) if c != 0));
    assert!(reply.expect("json").get("error").is_some());
}

#[tokio::test]
async fn streams_the_jobs_output_as_it_comes() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dir = s.dir.path();
    let go = dir.join("go");
    let script = "echo one; i=0; while [ ! -e \"$1\" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo two >&2; echo three";
    let mut p = start(&conn, &request(dir, &installation(), "j", 1, &["sh", "-c", script, "sh", go.to_str().expect("utf-8")])).await;
    // "one" arrives while the job waits for the file: streamed, not at the end.
    assert_eq!(tokio::time::timeout(T, p.next()).await.expect("bounded"), Some(Chunk::Stdout(b"one\n".to_vec())));
    std::fs::write(&go, b"").expect("go");
    let (out, err, exit) = finish(&mut p).await;
    assert_eq!((out.as_str(), err.as_str(), exit), ("three\n", "two\n", Some(RemoteExit::Code(0))));
}

#[tokio::test]
async fn a_job_whose_node_stops_sending_heartbeats_is_ended() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dir = s.dir.path();
    let inst = installation();
    let mut req = request(dir, &inst, "j", 1, &["sleep", "300"]);
    req.heartbeat_ms = 1000;
    let mut p = start(&conn, &req).await;
    let m = wait_marker(dir, &inst, "j", 1).await;
    // Heartbeats keep it running well past the heartbeat interval...
    for _ in 0..15 {
        p.write(b"\n").await.expect("heartbeat");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(alive(m.child_pid, m.child_start), "heartbeats keep the job running");
    // ...and without them it ends, though the channel is still open.
    assert!(wait_gone(m.child_pid, m.child_start).await, "the job is ended");
    let (_, err, exit) = finish(&mut p).await;
    assert!(err.contains("slipway-agent: no heartbeat from the node for 1s: ending the job"), "{err}");
    assert_eq!(exit, Some(RemoteExit::Code(128 + 15)));
    assert!(!alive(m.agent_pid, m.agent_start));
}

#[tokio::test]
async fn the_timeout_backstop_and_a_stopped_agent_end_the_job() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dir = s.dir.path();
    let inst = installation();
    let mut req = request(dir, &inst, "j", 1, &["sleep", "300"]);
    (req.timeout_ms, req.kill_grace_ms) = (300, 200);
    let mut p = start(&conn, &req).await;
    let (_, err, exit) = finish(&mut p).await;
    assert_eq!((err.as_str(), exit), ("slipway-agent: timed out after 300ms: ending the job\n", Some(RemoteExit::Code(128 + 15))));
    // SIGTERM to the agent: its job goes with it.
    let mut p = start(&conn, &request(dir, &inst, "j", 2, &["sleep", "300"])).await;
    let m = wait_marker(dir, &inst, "j", 2).await;
    kill(m.agent_pid, libc::SIGTERM);
    assert!(wait_gone(m.child_pid, m.child_start).await, "the job is ended");
    let (_, err, exit) = finish(&mut p).await;
    assert_eq!((err.as_str(), exit), ("slipway-agent: the agent was told to stop: ending the job\n", Some(RemoteExit::Code(128 + 15))));
}

#[tokio::test]
async fn a_job_whose_connection_is_closed_is_ended() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dir = s.dir.path();
    let inst = installation();
    // No heartbeat required: the end of stdin alone ends it. The job also
    // leaves a process in its group, which goes with it.
    let mut req = request(dir, &inst, "j", 1, &["sh", "-c", "sleep 300 & echo $!; wait"]);
    req.kill_grace_ms = 200;
    let mut p = start(&conn, &req).await;
    let m = wait_marker(dir, &inst, "j", 1).await;
    let Some(Chunk::Stdout(b)) = tokio::time::timeout(T, p.next()).await.expect("bounded") else { panic!("the background pid") };
    let background: i32 = String::from_utf8_lossy(&b).trim().parse().expect("pid");
    let background_start = std::fs::read_to_string(format!("/proc/{background}/stat")).expect("stat");
    let background_start: u64 =
        background_start[background_start.rfind(')').expect(")") + 1..].split_whitespace().nth(19).expect("start").parse().expect("num");
    // Abruptly: the whole connection goes, without a word to the agent.
    drop(p);
    conn.close().await;
    assert!(wait_gone(m.child_pid, m.child_start).await, "the job is ended");
    assert!(wait_gone(background, background_start).await, "what it left in its group too");
    assert!(wait_gone(m.agent_pid, m.agent_start).await, "and the agent exits");
}

#[tokio::test]
async fn end_earlier_ends_only_earlier_attempts_of_the_same_job() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dir = s.dir.path();
    let inst = installation();
    let mut earlier = start(&conn, &request(dir, &inst, "j", 1, &["sleep", "300"])).await;
    let mut other = start(&conn, &request(dir, &inst, "k", 1, &["sleep", "300"])).await;
    let mut later = start(&conn, &request(dir, &inst, "j", 3, &["sleep", "300"])).await;
    let (m1, mk, m3) = (wait_marker(dir, &inst, "j", 1).await, wait_marker(dir, &inst, "k", 1).await, wait_marker(dir, &inst, "j", 3).await);
    let ask = serde_json::json!({"dir": dir, "installation": inst, "deployment": 5, "job": "j", "attempt": 2, "within_ms": 10000});
    let (reply, exit) = verb::<EndEarlierReply>(&conn, "end-earlier", ask.clone()).await;
    assert_eq!(reply, Ok(EndEarlierReply { found: 1, ended: true }));
    assert_eq!(exit, Some(RemoteExit::Code(0)));
    assert!(!alive(m1.child_pid, m1.child_start));
    assert!(alive(mk.child_pid, mk.child_start) && alive(m3.child_pid, m3.child_start), "another job and a later attempt are left alone");
    assert_eq!(finish(&mut earlier).await.2, Some(RemoteExit::Code(128 + 15)));
    // Nothing left to end.
    assert_eq!(verb::<EndEarlierReply>(&conn, "end-earlier", ask).await.0, Ok(EndEarlierReply { found: 0, ended: true }));
    other.close_stdin().await.expect("eof");
    later.close_stdin().await.expect("eof");
    assert!(wait_gone(mk.child_pid, mk.child_start).await && wait_gone(m3.child_pid, m3.child_start).await);
}

#[tokio::test]
async fn sweep_ends_runs_whose_agent_died_and_forgets_old_markers() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let dir = s.dir.path();
    let inst = installation();
    let _orphaned = start(&conn, &request(dir, &inst, "j", 1, &["sleep", "300"])).await;
    let _supervised = start(&conn, &request(dir, &inst, "k", 1, &["sleep", "300"])).await;
    let (orphan, supervised) = (wait_marker(dir, &inst, "j", 1).await, wait_marker(dir, &inst, "k", 1).await);
    // SIGKILL: the agent cannot end its job; the job (own session) lives on.
    kill(orphan.agent_pid, libc::SIGKILL);
    assert!(wait_gone(orphan.agent_pid, orphan.agent_start).await);
    assert!(alive(orphan.child_pid, orphan.child_start));
    // A finished run's marker from two days ago, and one from now.
    let mut old = orphan.clone();
    (old.attempt, old.ended_at, old.child_pid, old.agent_pid) = (7, Some(1), 999_999_999, 999_999_999);
    let old_path = agent::marker_path(&dir.display().to_string(), &inst, 5, "j", 7);
    std::fs::write(&old_path, serde_json::to_vec(&old).expect("json")).expect("write");
    std::fs::File::options().write(true).open(&old_path).and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(2 * 86400))).expect("age it");
    let recent_path = agent::marker_path(&dir.display().to_string(), &inst, 5, "j", 8);
    std::fs::write(&recent_path, serde_json::to_vec(&Marker { attempt: 8, ..old.clone() }).expect("json")).expect("write");
    let (reply, exit) = verb::<SweepReply>(&conn, "sweep", serde_json::json!({"dir": dir, "installation": inst})).await;
    assert_eq!(reply, Ok(SweepReply { ended: 1 }));
    assert_eq!(exit, Some(RemoteExit::Code(0)));
    assert!(!alive(orphan.child_pid, orphan.child_start), "the orphan is ended");
    assert!(alive(supervised.child_pid, supervised.child_start), "a supervised run is not the sweep's");
    assert!(!old_path.exists() && recent_path.exists());
    assert!(marker(dir, &inst, "j", 1).is_some_and(|m| m.ended_at.is_some()));
    // Another installation's sweep sees none of this.
    let (reply, _) = verb::<SweepReply>(&conn, "sweep", serde_json::json!({"dir": dir, "installation": installation()})).await;
    assert_eq!(reply, Ok(SweepReply { ended: 0 }));
}

fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        // Written raw: the builder itself refuses `..`, an archive from elsewhere need not.
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder.into_inner().and_then(|gz| gz.finish()).expect("tar.gz")
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test]
async fn put_and_unpack_check_what_they_are_given() {
    let s = Sshd::start();
    let conn = connect(&s).await;
    let base = s.dir.path().join("base");
    let blob = tar_gz(&[("app/run.sh", b"#!/bin/sh\necho hi\n"), ("README", b"read me")]);
    let sum = sha256(&blob);
    let (reply, _) = verb::<HasReply>(&conn, "has", serde_json::json!({"dir": base, "sha256": sum})).await;
    assert_eq!(reply, Ok(HasReply { blob: false, tree: false }));
    // A wrong checksum: refused, nothing kept.
    let wrong = sha256(b"something else");
    let (reply, exit) = verb_with::<serde_json::Value>(&conn, "put", serde_json::json!({"dir": base, "sha256": wrong, "size": blob.len()}), &blob).await;
    assert!(reply.expect("json")["error"].as_str().is_some_and(|e| e.contains("checksum mismatch")));
    assert_eq!(exit, Some(RemoteExit::Code(1)));
    assert_eq!(std::fs::read_dir(base.join("blobs")).expect("blobs").count(), 0, "nothing kept");
    // Fewer bytes than announced: refused.
    let (reply, _) = verb_with::<serde_json::Value>(&conn, "put", serde_json::json!({"dir": base, "sha256": sum, "size": blob.len()}), &blob[..10]).await;
    assert!(reply.expect("json")["error"].as_str().is_some_and(|e| e.contains("stdin ended after 10 of")));
    assert_eq!(std::fs::read_dir(base.join("blobs")).expect("blobs").count(), 0, "nothing kept");
    // The right one.
    let (reply, exit) = verb_with::<serde_json::Value>(&conn, "put", serde_json::json!({"dir": base, "sha256": sum, "size": blob.len()}), &blob).await;
    assert_eq!(reply, Ok(serde_json::json!({"ok": true})));
    assert_eq!(exit, Some(RemoteExit::Code(0)));
    assert_eq!(std::fs::read(base.join("blobs").join(&sum)).expect("blob"), blob);
    let (reply, _) = verb::<UnpackReply>(&conn, "unpack", serde_json::json!({"dir": base, "sha256": sum})).await;
    let tree = PathBuf::from(reply.expect("unpacked").path);
    assert_eq!(tree, std::fs::canonicalize(base.join("revisions").join(&sum)).expect("tree"));
    assert_eq!(std::fs::read(tree.join("app/run.sh")).expect("file"), b"#!/bin/sh\necho hi\n");
    assert_eq!(std::fs::read(tree.join("README")).expect("file"), b"read me");
    let (reply, _) = verb::<HasReply>(&conn, "has", serde_json::json!({"dir": base, "sha256": sum})).await;
    assert_eq!(reply, Ok(HasReply { blob: true, tree: true }));
    // Again: already there.
    let (reply, _) = verb::<UnpackReply>(&conn, "unpack", serde_json::json!({"dir": base, "sha256": sum})).await;
    assert_eq!(reply.map(|r| PathBuf::from(r.path)), Ok(tree));
    // An archive with an entry escaping its directory: refused, no tree.
    let evil = tar_gz(&[("ok.txt", b"fine"), ("../escaped.txt", b"bad")]);
    let evil_sum = sha256(&evil);
    let (reply, _) = verb_with::<serde_json::Value>(&conn, "put", serde_json::json!({"dir": base, "sha256": evil_sum, "size": evil.len()}), &evil).await;
    assert_eq!(reply, Ok(serde_json::json!({"ok": true})));
    let (reply, exit) = verb::<serde_json::Value>(&conn, "unpack", serde_json::json!({"dir": base, "sha256": evil_sum})).await;
    assert!(reply.expect("json")["error"].as_str().is_some_and(|e| e.contains("../escaped.txt escapes its directory")));
    assert_eq!(exit, Some(RemoteExit::Code(1)));
    assert!(!base.join("revisions").join(&evil_sum).exists() && !base.join("revisions/escaped.txt").exists() && !base.join("escaped.txt").exists());
    let leftovers: Vec<_> = std::fs::read_dir(base.join("revisions")).expect("revisions").flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers, [std::ffi::OsString::from(&sum)]);
    // Unpacking what was never put says so.
    let (reply, _) = verb::<serde_json::Value>(&conn, "unpack", serde_json::json!({"dir": base, "sha256": "0".repeat(64)})).await;
    assert!(reply.expect("json")["error"].as_str().is_some_and(|e| e.contains("put it first")));
}

#[tokio::test]
async fn ensure_agent_uploads_once_per_checksum() {
    let s = Sshd::start();
    let base = s.dir.path().join("srv");
    let binary = AgentBinary::at(slipway());
    let conn = connect(&s).await;
    // Measured apart: the checksum and the compressed bytes are computed
    // once per process, the upload once per host.
    let started = Instant::now();
    let hash = binary.short_hash().await.expect("hash");
    let hashing = started.elapsed();
    let started = Instant::now();
    let gz = binary.gzipped().await.expect("gzip").len();
    let gzipping = started.elapsed();
    let started = Instant::now();
    let path = session::ensure_agent_with(&conn, &binary, base.to_str().expect("utf-8"), Duration::from_secs(600)).await.expect("ensure");
    let size = std::fs::metadata(slipway()).expect("binary").len();
    eprintln!("ensure_agent: {size} bytes binary, sha256 in {hashing:?}; {gz} bytes gzip'd in {gzipping:?}; check + upload + check {:?}", started.elapsed());
    assert_eq!(path, format!("{}/bin/slipway-{hash}", base.display()));
    assert_eq!(std::fs::read(&path).expect("uploaded").len() as u64, size);
    let inode = |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("meta"));
    let uploaded = inode(&path);
    // The same connection: cached. Another one: found there, not uploaded again.
    let started = Instant::now();
    assert_eq!(session::ensure_agent_with(&conn, &binary, base.to_str().expect("utf-8"), T).await.expect("cached"), path);
    eprintln!("ensure_agent: cached call {:?}", started.elapsed());
    let again = connect(&s).await;
    let started = Instant::now();
    assert_eq!(session::ensure_agent_with(&again, &binary, base.to_str().expect("utf-8"), T).await.expect("found"), path);
    eprintln!("ensure_agent: new connection, binary present {:?}", started.elapsed());
    assert_eq!(inode(&path), uploaded, "not uploaded again");
    // It runs as the agent.
    let out = again.output(&session::agent_command(&path, "version"), b"", T).await.expect("version");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{{\"version\":\"{}\"}}", env!("CARGO_PKG_VERSION")));
    // A binary that is not Slipway does not pass for it.
    let fake_path = s.dir.path().join("not-slipway");
    std::fs::write(&fake_path, b"#!/bin/sh\nexit 3\n").expect("write");
    let err = session::ensure_agent_with(&again, &AgentBinary::at(&fake_path), base.to_str().expect("utf-8"), T).await.expect_err("not an agent");
    assert_eq!(err.kind, SshErrorKind::Failed);
    assert!(err.message.contains("does not run on the host"), "{}", err.message);
}
