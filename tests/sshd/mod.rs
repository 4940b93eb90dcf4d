//! A real OpenSSH sshd on 127.0.0.1 for the SSH tests (ssh_session.rs,
//! ssh_agent.rs): host and client keys made with ssh-keygen in a temp
//! dir, `sshd -D -e` with its own config, killed (with every session it
//! forked) on Drop. No network namespaces: loopback only.
#![allow(dead_code)]

use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use slipway::config::secret::{SecretRef, SecretSource};
use slipway::targets::ssh::session::{Endpoint, Keys};

const SSHD: &str = "/usr/sbin/sshd";

/// Run a command to completion within `within`; its output, or a panic
/// that says what failed.
pub fn run(cmd: &mut Command, within: Duration) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("collect output")
}

fn ensure_installed() {
    if Path::new(SSHD).exists() {
        return;
    }
    // A fresh machine: Debian's openssh-server, as the brief asks.
    let out = run(
        Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "openssh-server"]).env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(600),
    );
    assert!(Path::new(SSHD).exists(), "openssh-server is missing and could not be installed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A key pair made by ssh-keygen: (private key path, public key line).
pub fn keygen(dir: &Path, name: &str, kind: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = run(Command::new("ssh-keygen").args(["-q", "-t", kind, "-N", "", "-C", "", "-f"]).arg(&path), Duration::from_secs(30));
    assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("read public key");
    (path, public.trim().to_string())
}

/// `SHA256:…` of a public key file, as ssh-keygen prints it.
pub fn fingerprint(public_key_file: &Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(public_key_file), Duration::from_secs(30));
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap_or_default().to_string()
}

fn current_user() -> String {
    let out = run(Command::new("id").arg("-un"), Duration::from_secs(10));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub user: String,
    /// The client's private key file (authorized on this sshd).
    pub client_key: PathBuf,
    /// The host's public key line (`ssh-ed25519 AAAA…`) and file.
    pub host_public: String,
    pub host_public_file: PathBuf,
    /// Its second host key, ECDSA P-256.
    pub host_ecdsa_public: String,
    child: Child,
}

impl Sshd {
    pub fn start() -> Sshd {
        ensure_installed();
        let dir = tempfile::tempdir().expect("tempdir");
        keygen(dir.path(), "host_key", "ed25519");
        let (_, host_ecdsa_public) = keygen(dir.path(), "host_key_ecdsa", "ecdsa");
        let (client_key, client_public) = keygen(dir.path(), "client_key", "ed25519");
        std::fs::write(dir.path().join("authorized_keys"), format!("{client_public}\n")).expect("write authorized_keys");
        // sshd running as root needs its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let host_public_file = dir.path().join("host_key.pub");
        let host_public = std::fs::read_to_string(&host_public_file).expect("host key").trim().to_string();
        // A free port can be taken between our look and sshd's bind: retried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
            let config = dir.path().join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nHostKey {d}/host_key_ecdsa\nPidFile none\nAuthorizedKeysFile {d}/authorized_keys\n\
                     PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                     MaxStartups 100\nLogLevel ERROR\n",
                    d = dir.path().display()
                ),
            )
            .expect("write sshd_config");
            let log = std::fs::File::create(dir.path().join("sshd.log")).expect("create sshd.log");
            // In a mount namespace of its own where the user's ~/.bashrc is
            // empty: bash sources it for every command run over SSH, and
            // this machine's may block (a stale pyenv rehash lock waits 60 s).
            let mut child = Command::new("unshare")
                .args(["--mount", "--", "sh", "-c"])
                .arg(r#"mount --make-rprivate / && { [ ! -f "$HOME/.bashrc" ] || mount --bind /dev/null "$HOME/.bashrc"; } && exec "$0" "$@""#)
                .arg(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start sshd");
            if wait_ready(&mut child, port) {
                return Sshd { dir, port, user: current_user(), client_key, host_public, host_public_file, host_ecdsa_public, child };
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("sshd on port {port} did not come up: {}", std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default());
        }
        panic!("sshd did not start");
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The known_hosts line pinning this sshd's key.
    pub fn known_hosts(&self) -> String {
        format!("[127.0.0.1]:{} {}\n", self.port, self.host_public)
    }

    pub fn endpoint(&self, connect_timeout: Duration) -> Endpoint {
        Endpoint { name: "web-1".into(), address: self.address(), user: self.user.clone(), connect_timeout }
    }

    pub fn keys(&self) -> Keys {
        keys_with(&self.client_key, &self.known_hosts())
    }

    /// Every process this sshd forked (its sessions and their commands).
    pub fn session_pids(&self) -> Vec<i32> {
        descendants(self.child.id() as i32)
    }
}

/// Until sshd answers with its banner (bounded); false if it exited.
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() && &buf == b"SSH-" {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Keys from a private key file (read as the product reads secrets) and
/// a known_hosts text.
pub fn keys_with(private_key: &Path, known_hosts: &str) -> Keys {
    let secret = SecretRef { name: "ssh-key".into(), source: SecretSource::File(private_key.to_path_buf()) }.read().expect("read the key");
    Keys { private_key: secret, known_hosts: known_hosts.to_string() }
}

fn parent_of(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// All descendants of `root`, found through /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let all: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).filter_map(|p| Some((p, parent_of(p)?))).collect())
        .unwrap_or_default();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(all.iter().filter(|(_, parent)| *parent == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

impl Drop for Sshd {
    fn drop(&mut self) {
        for pid in descendants(self.child.id() as i32) {
            // SAFETY: plain kill of processes this sshd forked.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
