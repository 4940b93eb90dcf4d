//! The test fleet: real OpenSSH sshd hosts, each in its own network, mount,
//! PID and UTS namespaces, brought up and down by `scripts/fleet.sh`. The
//! client side (OpenSSH, Slipway, a test's own sockets) runs in the fleet's
//! bridge namespace: [`Fleet::client_command`] for a process,
//! [`Fleet::enter`] for the current thread. Needs root. Hosts are numbered
//! from 1 (`h1` is 10.77.0.11) in every method that takes `k`.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bounds for the script. `up` may first install openssh-server (apt), so
/// it gets long; everything else is quick unless something hangs.
const UP_TIMEOUT_S: &str = "1200";
const DOWN_TIMEOUT_S: &str = "120";
const CTL_TIMEOUT_S: &str = "60";
/// How long a command run by `exec_on` may take (the script's FLEET_TIMEOUT).
const EXEC_TIMEOUT_S: &str = "120";
/// How long an OpenSSH client from `ssh_command` may run in all.
const SSH_TIMEOUT_S: &str = "60";

pub fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fleet.sh")
}

#[derive(Clone, Debug)]
pub struct FleetHost {
    /// `h1`, `h2`, …
    pub name: String,
    /// Its eth0 address, reachable from the bridge namespace only.
    pub address: String,
    /// Its network namespace (`ip netns` name).
    pub ns: String,
}

/// A running fleet; `down` when dropped (also when the test panics).
pub struct Fleet {
    prefix: String,
    bridge_ns: String,
    key: PathBuf,
    known_hosts: PathBuf,
    user: String,
    remote_dir: String,
    hosts: Vec<FleetHost>,
    // Last: removed after Drop::drop has run `down`.
    local: tempfile::TempDir,
}

impl Fleet {
    /// Bring up `n` hosts (1..=60) in a temp dir of their own; panics with
    /// the script's output if they do not all take an SSH login.
    pub fn up(n: usize) -> Fleet {
        assert!(unsafe { libc::geteuid() } == 0, "the SSH test fleet needs root (network namespaces, mounts)");
        // Two fleets of one process never share a directory (and so never
        // a namespace prefix, which the script derives from it).
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let local = tempfile::Builder::new()
            .prefix(&format!("slipway-fleet-{}-{}-", std::process::id(), COUNT.fetch_add(1, Ordering::SeqCst)))
            .tempdir()
            .expect("fleet tempdir");
        let out = Command::new("timeout")
            .args(["-k", "10", UP_TIMEOUT_S, "bash", script(), "up"])
            .arg(local.path())
            .arg(n.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/fleet.sh up");
        if !out.status.success() {
            down(local.path());
            panic!(
                "scripts/fleet.sh up {} {n} failed ({}):\n{}{}",
                local.path().display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = std::fs::read_to_string(local.path().join("fleet.json")).expect("read fleet.json");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("fleet.json: {e}: {text}"));
        let s = |key: &str| v[key].as_str().unwrap_or_else(|| panic!("fleet.json has no string {key}: {text}")).to_string();
        let hosts = v["hosts"]
            .as_array()
            .unwrap_or_else(|| panic!("fleet.json has no hosts: {text}"))
            .iter()
            .map(|h| {
                let f = |key: &str| h[key].as_str().unwrap_or_else(|| panic!("fleet.json host without {key}: {text}")).to_string();
                FleetHost { name: f("name"), address: f("address"), ns: f("ns") }
            })
            .collect();
        Fleet {
            prefix: s("prefix"),
            bridge_ns: s("bridge_ns"),
            key: PathBuf::from(s("key")),
            known_hosts: PathBuf::from(s("known_hosts")),
            user: s("user"),
            remote_dir: s("dir"),
            hosts,
            local,
        }
    }

    pub fn hosts(&self) -> &[FleetHost] {
        &self.hosts
    }

    /// Host `k` (1-based).
    pub fn host(&self, k: usize) -> &FleetHost {
        assert!(k >= 1 && k <= self.hosts.len(), "no host {k} in a fleet of {}", self.hosts.len());
        &self.hosts[k - 1]
    }

    /// The client's private key (ed25519, no passphrase).
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// One line per host with its current key (not updated by `rekey`).
    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }

    /// The directory on each host Slipway may use: `/srv/slipway`.
    pub fn dir(&self) -> &str {
        &self.remote_dir
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The namespace prefix: every namespace of this fleet starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn bridge_ns(&self) -> &str {
        &self.bridge_ns
    }

    /// The fleet's directory on this machine (keys, fleet.json, hK/).
    pub fn local_dir(&self) -> &Path {
        self.local.path()
    }

    /// `[secret.deploy_key]`, `[secret.known]` and the `[[hosts]]` group
    /// "web" of hosts `1..=n` (connect_timeout 3 s, the fleet's dir): what
    /// the config of every test on this fleet starts from.
    pub fn hosts_toml(&self, n: usize) -> String {
        let addresses: Vec<String> = self.hosts()[..n].iter().map(|h| format!("{:?}", h.address)).collect();
        format!(
            "\n[secret.deploy_key]\nfile = {key:?}\n[secret.known]\nfile = {known:?}\n\n[[hosts]]\ngroup = \"web\"\naddresses = [{addresses}]\n\
             user = {user:?}\nkey = \"deploy_key\"\nknown_hosts = \"known\"\nconnect_timeout = \"3s\"\ndir = {dir:?}\n",
            key = self.key_path().display().to_string(),
            known = self.known_hosts_path().display().to_string(),
            addresses = addresses.join(", "),
            user = self.user(),
            dir = self.dir(),
        )
    }

    /// `slipway serve` of the config in `dir` (its SQLite store there),
    /// in the fleet's bridge namespace: the current thread enters it, so
    /// the CLI it runs later lives there too. The hosts get
    /// [`agent_binary`] (through `SLIPWAY_SSH_AGENT`).
    pub fn serve(&self, dir: &Path) -> super::Server {
        self.serve_as(dir, &super::slipway_bin(), agent_binary().to_str().expect("a UTF-8 path"))
    }

    /// [`Fleet::serve`] run from the binary `bin`, whose hosts get that
    /// binary itself (no `SLIPWAY_SSH_AGENT`).
    pub fn serve_binary(&self, dir: &Path, bin: &Path) -> super::Server {
        self.serve_as(dir, bin, "")
    }

    fn serve_as(&self, dir: &Path, bin: &Path, agent: &str) -> super::Server {
        self.enter();
        let store = format!("sqlite://{}/store.db", dir.display());
        super::Server::start_binary(bin, dir, Some(&store), &["--node-id", "n1"], &[("SLIPWAY_SSH_AGENT", agent)])
    }

    /// Where host `k`'s `/srv/slipway` lives on this machine.
    pub fn host_root(&self, k: usize) -> PathBuf {
        self.local.path().join(&self.host(k).name).join("root")
    }

    /// `scripts/fleet.sh ctl` on host `k`: `link-down`, `link-up`,
    /// `stop-sshd`, `start-sshd`, `freeze`, `thaw`, `rekey`. Panics if it
    /// fails: the fixture, not the code under test, is broken then.
    pub fn ctl(&self, k: usize, action: &str) {
        self.host(k);
        let out = Command::new("timeout")
            .args(["-k", "5", CTL_TIMEOUT_S, "bash", script(), "ctl"])
            .arg(self.local.path())
            .args([&k.to_string(), action])
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/fleet.sh ctl");
        assert!(out.status.success(), "fleet.sh ctl {k} {action} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }

    /// Run `argv` inside host `k` (its network, mount, PID and UTS
    /// namespaces) as root, to its end (at most 120 s).
    pub fn exec_on(&self, k: usize, argv: &[&str]) -> Output {
        self.host(k);
        assert!(!argv.is_empty(), "exec_on needs a command");
        Command::new("bash")
            .args([script(), "exec"])
            .arg(self.local.path())
            .arg(k.to_string())
            .args(argv)
            .env("FLEET_TIMEOUT", EXEC_TIMEOUT_S)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/fleet.sh exec")
    }

    /// `program` in the bridge namespace (`ip netns exec`), not started;
    /// no time bound of its own (it may be a server).
    pub fn client_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.bridge_ns]).arg(program);
        cmd
    }

    /// OpenSSH's client from the bridge namespace to host `k` with the
    /// fleet's key and strict known_hosts checking, not started: append
    /// the remote command. ConnectTimeout 3 s, keepalive 1 s × 3, and 60 s
    /// in all (`timeout` exits 124 then).
    pub fn ssh_command(&self, k: usize) -> Command {
        self.ssh_command_with(k, &self.known_hosts)
    }

    /// [`Fleet::ssh_command`] checking host keys against `known_hosts`.
    pub fn ssh_command_with(&self, k: usize, known_hosts: &Path) -> Command {
        let host = self.host(k);
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", SSH_TIMEOUT_S, "ip", "netns", "exec", &self.bridge_ns, "ssh", "-F", "/dev/null", "-i"])
            .arg(&self.key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "GlobalKnownHostsFile=/dev/null"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3"])
            .args(["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"])
            .arg(format!("{}@{}", self.user, host.address))
            .stdin(Stdio::null());
        cmd
    }

    /// Move the current thread into the bridge namespace (setns with
    /// CLONE_NEWNET; a network namespace is per thread, so the rest of the
    /// process stays where it is). Afterwards processes spawned from this
    /// thread, threads it creates (a tokio runtime built here) and sockets
    /// it opens live in the bridge namespace: 127.0.0.1 there is the
    /// bridge's own loopback, and the hosts are reachable. [`leave`] goes
    /// back.
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.bridge_ns);
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        ORIGINAL_NETNS.with(|o| {
            let mut o = o.borrow_mut();
            if o.is_none() {
                *o = Some(File::open("/proc/thread-self/ns/net").expect("open this thread's network namespace"));
            }
        });
        setns_net(&ns, &path);
    }

    /// Stop every host now (what Drop does).
    pub fn down(self) {}
}

thread_local! {
    /// The namespace a thread was in before its first [`Fleet::enter`].
    static ORIGINAL_NETNS: RefCell<Option<File>> = const { RefCell::new(None) };
}

/// Move the current thread back to the network namespace it had before
/// [`Fleet::enter`]; nothing if it never entered one.
/// `from` without its debug information, made once per test process as
/// `name` in a directory of its own (a quarter of the size: what uploads
/// to 20 hosts save); a copy where `strip` fails.
pub fn stripped(name: &str, from: &Path) -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    // Tests of one binary run in parallel: one strips, the others wait.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let out = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir")).path().join(name);
    if !out.exists() {
        let ok = Command::new("strip").arg("--strip-debug").arg("-o").arg(&out).arg(from).status().is_ok_and(|s| s.success());
        if !ok {
            std::fs::copy(from, &out).expect("copy the binary");
        }
    }
    out
}

/// The Slipway the hosts run as agent and supervisor: this build,
/// [`stripped`].
pub fn agent_binary() -> PathBuf {
    stripped("slipway-agent", &super::slipway_bin())
}

pub fn leave() {
    ORIGINAL_NETNS.with(|o| {
        if let Some(ns) = o.borrow_mut().take() {
            setns_net(&ns, "the original network namespace");
        }
    });
}

fn setns_net(ns: &File, what: &str) {
    // SAFETY: setns on a valid, open namespace fd; it changes only the
    // calling thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(rc == 0, "setns into {what}: {}", std::io::Error::last_os_error());
}

/// `scripts/fleet.sh down DIR`; reports, never panics (it runs in Drop).
fn down(dir: &Path) {
    let out = Command::new("timeout").args(["-k", "5", DOWN_TIMEOUT_S, "bash", script(), "down"]).arg(dir).stdin(Stdio::null()).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!("fleet.sh down {} failed ({}): {}", dir.display(), o.status, String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("cannot run fleet.sh down {}: {e}", dir.display()),
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        down(self.local.path());
    }
}
