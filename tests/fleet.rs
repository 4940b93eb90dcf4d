//! The SSH test fleet itself (scripts/fleet.sh, tests/common/fleet.rs):
//! real sshd hosts in namespaces, reached with OpenSSH's client from the
//! bridge namespace, and the faults the SSH target's tests inject. Needs
//! root, as the fleet does.

mod common;

use std::process::Output;
use std::time::Duration;

use common::fleet::{self, Fleet};
use common::wait_for;

fn text(out: &Output) -> String {
    format!("status {}; stdout: {}; stderr: {}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `cmd` on host `k` through OpenSSH from the bridge namespace.
fn ssh(f: &Fleet, k: usize, cmd: &str) -> Output {
    f.ssh_command(k).arg(cmd).output().expect("run ssh")
}

fn ssh_ok(f: &Fleet, k: usize, cmd: &str) -> String {
    let out = ssh(f, k, cmd);
    assert!(out.status.success(), "ssh to h{k} `{cmd}`: {}", text(&out));
    stdout(&out)
}

/// OpenSSH failed by itself (255), not by the 60 s bound around it (124).
fn assert_ssh_failed(out: &Output, what: &str) {
    assert_eq!(out.status.code(), Some(255), "{what}: ssh should fail by itself: {}", text(out));
}

/// Host `k` runs a process whose command line is exactly `args`.
fn runs(f: &Fleet, k: usize, args: &str) -> bool {
    let out = f.exec_on(k, &["ps", "-eo", "args="]);
    assert!(out.status.success(), "ps on h{k}: {}", text(&out));
    stdout(&out).lines().any(|l| l.trim() == args)
}

/// A long sleep started on host `k` through SSH the way a deploy would
/// leave a process: its own session, no terminal, no ties to the login.
fn start_sleep(f: &Fleet, k: usize, secs: u32) -> String {
    ssh_ok(f, k, &format!("setsid -f sleep {secs} </dev/null >/dev/null 2>&1"));
    let args = format!("sleep {secs}");
    wait_for(Duration::from_secs(10), "the sleep to show in ps", || runs(f, k, &args));
    args
}

fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), rand::random::<u32>())
}

#[test]
fn three_hosts_take_logins_and_are_isolated() {
    let f = Fleet::up(3);
    assert_eq!(f.hosts().len(), 3);
    assert_eq!(f.user(), "root");
    assert_eq!(f.dir(), "/srv/slipway");
    for (i, h) in f.hosts().iter().enumerate() {
        assert_eq!(h.name, format!("h{}", i + 1));
        assert_eq!(h.address, format!("10.77.0.{}", 11 + i));
        assert!(h.ns.starts_with(f.prefix()), "{h:?}");
        // A real login with strict host key checking, and the right host.
        assert_eq!(ssh_ok(&f, i + 1, "hostname"), h.name);
    }
    let known = std::fs::read_to_string(f.known_hosts_path()).expect("known_hosts");
    assert_eq!(known.lines().count(), 3, "{known}");
    assert!(known.lines().all(|l| l.split(' ').nth(1) == Some("ssh-ed25519")), "{known}");

    // Files: h1's /srv/slipway and /tmp are its own.
    let file = unique("iso");
    ssh_ok(&f, 1, &format!("echo one > /srv/slipway/{file} && echo one > /tmp/{file}"));
    for dir in ["/srv/slipway", "/tmp"] {
        let path = format!("{dir}/{file}");
        let on_h1 = f.exec_on(1, &["cat", &path]);
        assert!(on_h1.status.success() && stdout(&on_h1) == "one", "h1 {path}: {}", text(&on_h1));
        let on_h2 = f.exec_on(2, &["test", "-e", &path]);
        assert_eq!(on_h2.status.code(), Some(1), "h2 must not see {path}: {}", text(&on_h2));
        assert!(!std::path::Path::new(&path).exists(), "the machine must not see h1's {path}");
    }
    assert!(f.host_root(1).join(&file).is_file(), "h1's /srv/slipway lives in the fleet dir");

    // Processes: h1's sleep is not in h2's ps.
    let sleep = start_sleep(&f, 1, 1000);
    assert!(!runs(&f, 2, &sleep), "h2 must not see h1's processes");
    let ps2 = f.exec_on(2, &["ps", "-eo", "args="]);
    assert!(!stdout(&ps2).contains("sleep 1000"), "{}", text(&ps2));
}

#[test]
fn link_down_fails_within_connect_timeout_and_link_up_heals() {
    let f = Fleet::up(2);
    ssh_ok(&f, 1, "true");
    f.ctl(1, "link-down");
    let out = ssh(&f, 1, "true");
    assert_ssh_failed(&out, "link down");
    let err = stderr(&out);
    assert!(err.contains("timed out") || err.contains("No route to host"), "a silent host, not a refusal: {err}");
    ssh_ok(&f, 2, "true");
    f.ctl(1, "link-up");
    wait_for(Duration::from_secs(20), "h1 to answer after link-up", || ssh(&f, 1, "true").status.success());
}

#[test]
fn stopped_sshd_refuses_at_once_and_the_host_keeps_running() {
    let f = Fleet::up(2);
    let sleep = start_sleep(&f, 1, 1001);
    f.ctl(1, "stop-sshd");
    let out = ssh(&f, 1, "true");
    assert_ssh_failed(&out, "sshd stopped");
    assert!(stderr(&out).contains("Connection refused"), "{}", text(&out));
    assert!(runs(&f, 1, &sleep), "the host's other processes outlive its sshd");
    ssh_ok(&f, 2, "true");
    f.ctl(1, "start-sshd");
    ssh_ok(&f, 1, "true");
    assert!(runs(&f, 1, &sleep));
}

#[test]
fn frozen_sshd_accepts_tcp_but_sends_no_banner_until_thawed() {
    let f = Fleet::up(2);
    f.ctl(1, "freeze");
    let out = ssh(&f, 1, "true");
    assert_ssh_failed(&out, "sshd frozen");
    assert!(stderr(&out).contains("banner exchange"), "TCP accepted, no banner: {}", text(&out));
    ssh_ok(&f, 2, "true");
    f.ctl(1, "thaw");
    ssh_ok(&f, 1, "true");
}

#[test]
fn rekeyed_host_is_refused_by_strict_checking() {
    let f = Fleet::up(2);
    let before = std::fs::read_to_string(f.known_hosts_path()).expect("known_hosts");
    f.ctl(1, "rekey");
    assert_eq!(std::fs::read_to_string(f.known_hosts_path()).expect("known_hosts"), before, "rekey leaves known_hosts alone");
    let out = ssh(&f, 1, "true");
    assert_ssh_failed(&out, "host key changed");
    let err = stderr(&out);
    assert!(err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || err.contains("Host key verification failed"), "{err}");
    ssh_ok(&f, 2, "true");

    // sshd really serves a new key: what it offers now differs from the
    // recorded one, and a login trusting only the new key works.
    let addr = &f.host(1).address;
    let scan = f
        .client_command("timeout")
        .args(["20", "ssh-keyscan", "-T", "3", "-t", "ed25519", addr])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ssh-keyscan");
    let offered = stdout(&scan);
    let offered_key = offered.lines().find(|l| l.starts_with(addr.as_str())).unwrap_or_else(|| panic!("no key scanned: {}", text(&scan)));
    let recorded = before.lines().find(|l| l.starts_with(&format!("{addr} "))).expect("h1 in known_hosts");
    assert_ne!(offered_key.trim(), recorded.trim());
    let fresh = f.local_dir().join("known_hosts.new");
    std::fs::write(&fresh, format!("{offered_key}\n")).expect("write known_hosts.new");
    let out = f.ssh_command_with(1, &fresh).arg("true").output().expect("ssh");
    assert!(out.status.success(), "login with the new key: {}", text(&out));
}

#[test]
fn twenty_hosts_answer_and_down_leaves_nothing() {
    let f = Fleet::up(20);
    assert_eq!(f.hosts().len(), 20);
    let names: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=20)
            .map(|k| {
                s.spawn({
                    let f = &f;
                    move || ssh_ok(f, k, "hostname")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("ssh thread")).collect()
    });
    assert_eq!(names, (1..=20).map(|k| format!("h{k}")).collect::<Vec<_>>());

    let prefix = f.prefix().to_string();
    let dir = f.local_dir().to_path_buf();
    let pids: Vec<i32> = (1..=20).map(|k| std::fs::read_to_string(dir.join(format!("h{k}/pid"))).expect("pid file").trim().parse().expect("pid")).collect();
    f.down();
    let netns = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let left: Vec<String> = stdout(&netns).lines().filter(|l| l.starts_with(&prefix)).map(str::to_string).collect();
    assert!(left.is_empty(), "namespaces left after down: {left:?}");
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    assert!(!mounts.contains(&prefix), "mounts left after down: {mounts}");
    // The hosts' unshare processes are gone (or dead, awaiting their reaper).
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next()));
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert!(state.is_none() || state == Some(Some('Z')) || comm.trim() != "unshare", "host process {pid} still runs after down");
    }
    assert!(!dir.exists(), "the fleet's temp dir is removed");
}

#[test]
fn enter_moves_only_this_thread_into_the_bridge_namespace() {
    let f = Fleet::up(1);
    let addr = f.host(1).address.clone();
    let own = std::fs::read_link("/proc/thread-self/ns/net").expect("own netns");
    // A listener on this namespace's loopback, which the bridge namespace's
    // 127.0.0.1 is not.
    let here = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = here.local_addr().expect("addr").port();
    std::thread::scope(|s| {
        s.spawn(|| {
            f.enter();
            let entered = std::fs::read_link("/proc/thread-self/ns/net").expect("netns");
            assert_ne!(entered, own, "the thread changed namespace");
            // A socket of this thread reaches the host and reads sshd's banner.
            let sock: std::net::SocketAddr = format!("{addr}:22").parse().expect("addr");
            let mut conn = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5)).expect("connect to h1 from the bridge namespace");
            conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut banner = [0u8; 8];
            std::io::Read::read_exact(&mut conn, &mut banner).expect("banner");
            assert_eq!(&banner, b"SSH-2.0-");
            let err = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5));
            assert!(err.is_err(), "127.0.0.1 here is the bridge namespace's own");
            // A child spawned from this thread is there too.
            let ip = std::process::Command::new("ip").args(["-o", "-4", "addr", "show", "br0"]).output().expect("ip addr");
            assert!(stdout(&ip).contains("10.77.0.1/24"), "{}", text(&ip));
            // And a thread it starts.
            let inner = std::thread::spawn(|| std::fs::read_link("/proc/thread-self/ns/net").expect("netns")).join().expect("thread");
            assert_eq!(inner, entered);
            fleet::leave();
            assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").expect("netns"), own, "leave goes back");
        });
    });
    // The rest of the process never moved.
    assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").expect("own netns"), own);
    let ip = std::process::Command::new("ip").args(["-o", "-4", "addr", "show"]).output().expect("ip addr");
    assert!(!stdout(&ip).contains("10.77.0.1/24"), "the machine's namespace has no bridge address: {}", text(&ip));
    drop(here);
}
