//! moto's server (PyPI `moto[server]`, a real implementation of the AWS
//! APIs Slipway calls) on a free 127.0.0.1 port, stopped when dropped, and
//! the Python fixtures (boto3, which moto brings) that set up and inspect
//! what a test needs. `scripts/test.sh` installs moto and sets
//! `SLIPWAY_MOTO` to its virtualenv's bin directory; without it a test is
//! skipped with a note, unless `SLIPWAY_REQUIRE_MOTO=1`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Moto {
    child: Child,
    pub url: String,
    pub bin: PathBuf,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh moto server, or `None` (with a note) where there is none.
pub fn start() -> Option<Moto> {
    let Some(bin) = std::env::var_os("SLIPWAY_MOTO").map(PathBuf::from).filter(|b| b.join("moto_server").exists()) else {
        assert!(std::env::var("SLIPWAY_REQUIRE_MOTO").as_deref() != Ok("1"), "SLIPWAY_REQUIRE_MOTO=1 but SLIPWAY_MOTO names no moto_server");
        eprintln!("note: no moto (set SLIPWAY_MOTO to a virtualenv's bin with moto[server]); skipped");
        return None;
    };
    let port = super::free_port();
    let child = Command::new(bin.join("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let moto = Moto { child, url: format!("http://127.0.0.1:{port}"), bin };
    super::wait_for(Duration::from_secs(60), "moto to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop));
    Some(moto)
}

impl Moto {
    /// `tests/fixtures/SCRIPT what URL`, its standard output as JSON.
    pub fn fixture(&self, script: &str, what: &str) -> serde_json::Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(script);
        let out = super::run_with_stdin(self.bin.join("python"), &[path.to_str().expect("path"), what, &self.url], "", Duration::from_secs(60));
        assert!(out.status.success(), "{script} {what}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("fixture JSON")
    }
}
