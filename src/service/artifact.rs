//! Release tarballs: fetched once per checksum into the node's cache,
//! verified against the SHA-256 the deploy request gave, unpacked, and
//! only then used. A service's commands run in the unpacked directory.
//!
//! Retries: a timeout, a connection error or a 5xx answer is tried again
//! with backoff (1 s, doubling, with jitter) up to the artifact's
//! `attempts`; a 4xx answer or a wrong checksum is final at once (asking
//! again would get the same answer).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::service::ArtifactSpec;
use crate::targets::{OutputSink, Stream};

/// Largest tarball accepted: a wrong URL must not fill the disk.
pub const MAX_BYTES: u64 = 4 << 30;

/// A SHA-256 as the API accepts it: 64 hex digits, optionally after
/// `sha256:`. Returned lowercase.
pub fn parse_sha256(s: &str) -> Option<String> {
    crate::values::Digest::parse(s).ok().map(String::from)
}

/// Where the tarball with this checksum is (or will be) unpacked.
pub fn dir_for(cache: &Path, sha256: &str) -> PathBuf {
    cache.join(sha256)
}

async fn say(out: &OutputSink, line: String) {
    let _ = out.send((Stream::Stdout, format!("[fetch] {line}")).into()).await;
}

enum TryError {
    /// Worth another try (timeout, connection, 5xx).
    Transient(String),
    /// Final (4xx, wrong checksum, bad archive).
    Final(String),
}

/// Downloads: a read may stall a minute, the whole try has `spec.timeout`.
pub(crate) fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    crate::http::client(|b| b.connect_timeout(Duration::from_secs(10)).read_timeout(Duration::from_secs(60)))
}

/// Fetch `url`, check it against `sha256`, unpack it under `cache`.
/// Returns the unpacked directory. Errors say what happened on each try.
pub async fn fetch(spec: &ArtifactSpec, url: &str, sha256: &str, cache: &Path, out: &OutputSink, cancel: &CancellationToken) -> Result<PathBuf, String> {
    // Shown with its path (which release), without credentials.
    let shown = crate::http::shown_url(url, true);
    let dir = dir_for(cache, sha256);
    if dir.join(".complete").exists() {
        say(out, format!("{shown}: sha256 {sha256} already in the cache ({})", dir.display())).await;
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).map_err(|e| format!("cannot create the artifact cache {}: {e}", cache.display()))?;
    let client = http_client().map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let mut failures: Vec<String> = Vec::new();
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=spec.attempts.max(1) {
        say(out, format!("GET {shown} (try {attempt} of {})", spec.attempts)).await;
        let tmp = cache.join(format!(".download-{sha256}-{}", std::process::id()));
        let result = tokio::select! {
            r = tokio::time::timeout(spec.timeout, download(&client, url, &tmp)) => match r {
                Ok(r) => r,
                Err(_) => Err(TryError::Transient(format!("no complete answer within {}", humantime::format_duration(spec.timeout)))),
            },
            _ = cancel.cancelled() => Err(TryError::Final("stopped on request".into())),
        };
        match result {
            Ok((bytes, got)) => {
                if got != sha256 {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(format!("{shown}: sha256 mismatch: expected {sha256}, got {got} ({bytes} bytes); refusing to use it"));
                }
                say(out, format!("{bytes} bytes, sha256 {got} matches")).await;
                let unpacked = unpack(&tmp, cache, sha256).await;
                let _ = std::fs::remove_file(&tmp);
                let dir = unpacked.map_err(|e| format!("{shown}: {e}"))?;
                say(out, format!("unpacked into {}", dir.display())).await;
                return Ok(dir);
            }
            Err(TryError::Final(e)) => {
                let _ = std::fs::remove_file(&tmp);
                failures.push(format!("try {attempt}: {e}"));
                return Err(format!("fetching {shown} failed after {attempt} tr{}: {}", if attempt == 1 { "y" } else { "ies" }, failures.join("; ")));
            }
            Err(TryError::Transient(e)) => {
                let _ = std::fs::remove_file(&tmp);
                say(out, format!("try {attempt} failed: {e}")).await;
                failures.push(format!("try {attempt}: {e}"));
                if attempt < spec.attempts {
                    let jitter = Duration::from_millis(rand::random::<u64>() % (delay.as_millis() as u64 / 4 + 1));
                    tokio::select! {
                        _ = tokio::time::sleep(delay + jitter) => {}
                        _ = cancel.cancelled() => return Err("stopped on request".into()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    Err(format!("fetching {shown} failed after {} tries: {}", spec.attempts, failures.join("; ")))
}

/// Stream the body to `tmp`, hashing as it comes. Returns (bytes, sha256).
async fn download(client: &reqwest::Client, url: &str, tmp: &Path) -> Result<(u64, String), TryError> {
    // Without the URL: it is shown apart, masked (`crate::http::shown_url`).
    let resp = client.get(url).send().await.map_err(|e| TryError::Transient(crate::http::error_chain(&e.without_url())))?;
    let status = resp.status();
    if !status.is_success() {
        let what = format!("HTTP {status}");
        // 408 and 429 say "try later"; other 4xx will not change.
        return Err(if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            TryError::Transient(what)
        } else {
            TryError::Final(what)
        });
    }
    let mut file = std::fs::File::create(tmp).map_err(|e| TryError::Final(format!("cannot write {}: {e}", tmp.display())))?;
    let mut hasher = Sha256::new();
    let mut bytes: u64 = 0;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| TryError::Transient(format!("download interrupted after {bytes} bytes: {}", crate::http::error_chain(&e.without_url()))))?;
        bytes += chunk.len() as u64;
        if bytes > MAX_BYTES {
            return Err(TryError::Final(format!("larger than {MAX_BYTES} bytes")));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(|e| TryError::Final(format!("cannot write {}: {e}", tmp.display())))?;
    }
    file.sync_all().map_err(|e| TryError::Final(format!("cannot write {}: {e}", tmp.display())))?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// Unpack a .tar.gz (or plain .tar) into `cache/<sha256>`, atomically:
/// a crash mid-way leaves no directory that looks complete.
async fn unpack(tarball: &Path, cache: &Path, sha256: &str) -> Result<PathBuf, String> {
    let (tarball, cache, sha256) = (tarball.to_path_buf(), cache.to_path_buf(), sha256.to_string());
    tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
        let staging = cache.join(format!(".unpack-{sha256}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
        let file = std::fs::File::open(&tarball).map_err(|e| format!("cannot read the download: {e}"))?;
        let mut magic = [0u8; 2];
        let gz = {
            use std::io::Read as _;
            let mut f = std::fs::File::open(&tarball).map_err(|e| format!("cannot read the download: {e}"))?;
            f.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]
        };
        let reader: Box<dyn std::io::Read> = if gz { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
        // `unpack` refuses entries that would land outside `staging`
        // (absolute paths, `..`).
        tar::Archive::new(reader).unpack(&staging).map_err(|e| format!("not a valid tar archive: {e}"))?;
        std::fs::write(staging.join(".complete"), b"").map_err(|e| format!("cannot mark {} complete: {e}", staging.display()))?;
        let dir = dir_for(&cache, &sha256);
        if dir.exists() {
            // Another fetch of the same checksum finished first: the same bytes.
            let _ = std::fs::remove_dir_all(&staging);
        } else {
            std::fs::rename(&staging, &dir).map_err(|e| format!("cannot move the unpacked release into place: {e}"))?;
        }
        Ok(dir)
    })
    .await
    .map_err(|e| format!("unpacking failed: {e}"))?
}
