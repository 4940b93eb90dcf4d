//! What the two load benches, `slipway-bench services` ([`super::service`])
//! and `slipway-bench docker` ([`super::docker`]), share: their options,
//! the errors both can meet, and wrk: found on `PATH`, run against an
//! address, its `--latency` output read.
//!
//! Each bench keeps its own error type, which holds a [`LoadBenchError`]
//! (its `Load` variant, shown as it is) beside the failures only it has.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::find_on_path;

/// What wrk may take beyond its own `-d`.
const WRK_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct LoadBenchOptions {
    /// Each wrk run (`-d`), whole seconds (`bench docker`: the change
    /// starts a quarter in).
    pub duration: Duration,
    /// wrk's `-c`.
    pub connections: u32,
    /// wrk's `-t`.
    pub threads: u32,
    /// Instances of the service (`bench docker`: containers) in the timed
    /// rollouts.
    pub rollout_instances: u32,
    /// `bench services`: wrk runs against each front, alternating.
    pub rounds: usize,
    /// Print a JSON report instead of the human text.
    pub json: bool,
}

impl Default for LoadBenchOptions {
    fn default() -> Self {
        LoadBenchOptions { duration: Duration::from_secs(10), connections: 32, threads: 2, rollout_instances: 4, rounds: 2, json: false }
    }
}

impl LoadBenchOptions {
    /// What wrk itself needs: a thread, and a connection per thread. (The
    /// duration and the instances each bench bounds its own way.)
    pub fn check_wrk(&self) -> Result<(), LoadBenchError> {
        if self.threads == 0 {
            return Err(LoadBenchError::Options("--threads must be at least 1".into()));
        }
        if self.connections < self.threads {
            return Err(LoadBenchError::Options(format!("--connections ({}) must be at least --threads ({})", self.connections, self.threads)));
        }
        Ok(())
    }
}

/// The failures both load benches share.
#[derive(Debug, thiserror::Error)]
pub enum LoadBenchError {
    #[error("wrk not found: apt-get install wrk")]
    WrkMissing,
    #[error("the demo service binary {0} does not exist (build it: cargo build --release -p slipway-demo)")]
    DemoMissing(PathBuf),
    #[error("invalid bench options: {0}")]
    Options(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what} did not finish within {}", humantime::format_duration(*.after))]
    Timeout { what: String, after: Duration },
    #[error("wrk failed: {0}")]
    Wrk(String),
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoadBenchError {
    let what = what.into();
    move |source| LoadBenchError::Io { what, source }
}

/// A port on 127.0.0.1 nothing listens on (at the time of asking).
pub fn free_port() -> Result<u16, LoadBenchError> {
    std::net::TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).map(|a| a.port()).map_err(io("cannot find a free port"))
}

/// The `slipway-demo` binary, resolved.
pub fn find_demo(demo_bin: &Path) -> Result<PathBuf, LoadBenchError> {
    let demo = std::fs::canonicalize(demo_bin).map_err(|_| LoadBenchError::DemoMissing(demo_bin.to_path_buf()))?;
    if !demo.is_file() {
        return Err(LoadBenchError::DemoMissing(demo_bin.to_path_buf()));
    }
    Ok(demo)
}

// ---------------------------------------------------------------- running wrk

pub fn find_wrk() -> Result<PathBuf, LoadBenchError> {
    find_on_path("wrk").ok_or(LoadBenchError::WrkMissing)
}

/// `wrk debian/4.1.0-3+b2 [epoll]`: the first line of `wrk --version`
/// without its copyright.
pub async fn wrk_version(wrk: &Path) -> Result<String, LoadBenchError> {
    // `wrk --version` prints its banner and usage, and exits 1.
    let run = tokio::process::Command::new(wrk).arg("--version").stdin(Stdio::null()).kill_on_drop(true).output();
    let limit = Duration::from_secs(10);
    match tokio::time::timeout(limit, run).await {
        Err(_) => Err(LoadBenchError::Timeout { what: format!("{} --version", wrk.display()), after: limit }),
        Ok(Err(e)) => Err(LoadBenchError::Io { what: format!("cannot run {}", wrk.display()), source: e }),
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stdout);
            // "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
            let first = text.lines().next().unwrap_or("wrk").trim();
            Ok(first.split(" Copyright").next().unwrap_or(first).to_string())
        }
    }
}

/// `wrk -t -c -d --latency` against `http://addr/`, bounded: its output
/// (read it with [`read_wrk`]).
pub async fn run_wrk(wrk: &Path, opts: &LoadBenchOptions, addr: SocketAddr) -> Result<String, LoadBenchError> {
    let url = format!("http://{addr}/");
    let run = tokio::process::Command::new(wrk)
        .arg(format!("-t{}", opts.threads))
        .arg(format!("-c{}", opts.connections))
        .arg(format!("-d{}s", opts.duration.as_secs()))
        .arg("--latency")
        .arg(&url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let limit = opts.duration + WRK_MARGIN;
    let out = match tokio::time::timeout(limit, run).await {
        Err(_) => return Err(LoadBenchError::Timeout { what: format!("wrk against {url}"), after: limit }),
        Ok(Err(e)) => return Err(LoadBenchError::Io { what: format!("cannot run {}", wrk.display()), source: e }),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(LoadBenchError::Wrk(format!("{} against {url}: {}{}", out.status, stdout.trim(), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(stdout)
}

// ---------------------------------------------------------------- wrk output

/// What we read from `wrk --latency`.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkOutput {
    pub requests_per_sec: f64,
    pub p50: Option<Duration>,
    pub p99: Duration,
    /// "N requests in …".
    pub requests: u64,
    /// "Non-2xx or 3xx responses: N".
    pub non_2xx: u64,
    /// Sum of "Socket errors: connect a, read b, write c, timeout d".
    pub socket_errors: u64,
}

/// [`parse_wrk`], its failure a wrk failure that quotes the output.
pub fn read_wrk(text: &str) -> Result<WrkOutput, LoadBenchError> {
    parse_wrk(text).map_err(|e| LoadBenchError::Wrk(format!("cannot read its output ({e}):\n{text}")))
}

/// `264.31us`, `2.12ms`, `1.05s`, `1.20m`, `2.00h` as wrk prints them.
pub fn parse_wrk_time(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, scale) =
        [("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)].iter().find_map(|(unit, scale)| s.strip_suffix(unit).map(|n| (n, *scale)))?;
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v * scale))
}

pub fn parse_wrk(text: &str) -> Result<WrkOutput, String> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = 0;
    let mut non_2xx = 0;
    let mut socket_errors = 0;
    let mut in_distribution = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = Some(v.trim().parse::<f64>().map_err(|e| format!("bad Requests/sec {v:?}: {e}"))?);
        } else if t.starts_with("Latency Distribution") {
            in_distribution = true;
        } else if in_distribution && let Some((pct, value)) = t.split_once('%') {
            let at = parse_wrk_time(value).ok_or_else(|| format!("bad latency {value:?} in {t:?}"))?;
            match pct.trim() {
                "50" => p50 = Some(at),
                "99" => p99 = Some(at),
                _ => {}
            }
        } else {
            in_distribution = false;
            if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
                non_2xx = v.trim().parse().map_err(|e| format!("bad {t:?}: {e}"))?;
            } else if let Some(v) = t.strip_prefix("Socket errors:") {
                // connect 0, read 12, write 0, timeout 3
                for part in v.split(',') {
                    let n = part.split_whitespace().last().and_then(|n| n.parse::<u64>().ok()).ok_or_else(|| format!("bad {t:?}"))?;
                    socket_errors += n;
                }
            } else if let Some((n, rest)) = t.split_once(' ')
                && rest.starts_with("requests in ")
            {
                requests = n.parse().map_err(|e| format!("bad {t:?}: {e}"))?;
            }
        }
    }
    let requests_per_sec = rps.ok_or("no \"Requests/sec:\" line")?;
    let p99 = p99.ok_or("no 99% line in the latency distribution (was --latency passed?)")?;
    Ok(WrkOutput { requests_per_sec, p50, p99, requests, non_2xx, socket_errors })
}

/// "Socket errors: connect a, read b, write c, timeout d" → [a, b, c, d].
pub fn socket_errors(wrk_output: &str) -> [u64; 4] {
    let mut out = [0; 4];
    if let Some(line) = wrk_output.lines().find_map(|l| l.trim().strip_prefix("Socket errors:")) {
        for part in line.split(',') {
            let mut words = part.split_whitespace();
            let (Some(kind), Some(n)) = (words.next(), words.next().and_then(|n| n.parse::<u64>().ok())) else { continue };
            match kind {
                "connect" => out[0] = n,
                "read" => out[1] = n,
                "write" => out[2] = n,
                "timeout" => out[3] = n,
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `wrk -t2 -c32 -d10s --latency` against the demo through a proxy that
    /// answered some requests with errors.
    const SAMPLE: &str = "Running 10s test @ http://127.0.0.1:41235/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.37ms    2.01ms  52.40ms   91.92%
    Req/Sec    13.52k     1.61k   17.21k    70.00%
  Latency Distribution
     50%  712.00us
     75%    1.44ms
     90%    3.12ms
     99%    9.87ms
  269012 requests in 10.01s, 35.15MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 17
Requests/sec:  26874.63
Transfer/sec:      3.51MB
";

    #[test]
    fn parses_wrk_latency_output() {
        let w = parse_wrk(SAMPLE).expect("parses");
        assert_eq!(w.requests_per_sec, 26874.63);
        assert_eq!(w.p50, Some(Duration::from_micros(712)));
        assert_eq!(w.p99, Duration::from_micros(9870));
        assert_eq!(w.requests, 269012);
        assert_eq!(w.non_2xx, 17);
        assert_eq!(w.socket_errors, 5);
    }

    #[test]
    fn parses_a_clean_run_with_second_latencies() {
        let text = "Running 1s test @ http://127.0.0.1:8080/\n  1 threads and 1 connections\n  Latency Distribution\n     50%  208.00us\n     99%    1.05s\n  293246 requests in 2.10s, 38.31MB read\nRequests/sec: 139644.21\n";
        let w = parse_wrk(text).expect("parses");
        assert_eq!(w.p99, Duration::from_millis(1050));
        assert_eq!((w.non_2xx, w.socket_errors, w.requests), (0, 0, 293246));
    }

    #[test]
    fn wrk_time_units() {
        assert_eq!(parse_wrk_time("264.31us"), Some(Duration::from_nanos(264_310)));
        assert_eq!(parse_wrk_time("2.12ms"), Some(Duration::from_micros(2120)));
        assert_eq!(parse_wrk_time(" 3.00s"), Some(Duration::from_secs(3)));
        assert_eq!(parse_wrk_time("1.50m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_wrk_time("2.00h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_wrk_time("12"), None);
        assert_eq!(parse_wrk_time("fast ms"), None);
    }

    #[test]
    fn output_without_a_distribution_is_an_error() {
        let text = "Running 1s test @ http://127.0.0.1:8080/\nRequests/sec: 10.00\n";
        assert!(parse_wrk(text).unwrap_err().contains("--latency"));
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_err());
        let e = read_wrk(text).unwrap_err().to_string();
        assert!(e.starts_with("wrk failed: cannot read its output (") && e.ends_with(text), "{e}");
    }

    #[test]
    fn socket_errors_are_read_by_kind() {
        let text = "  269012 requests in 10.01s, 35.15MB read\n  Socket errors: connect 4411, read 12, write 0, timeout 3\nRequests/sec: 1.0\n";
        assert_eq!(socket_errors(text), [4411, 12, 0, 3]);
        assert_eq!(socket_errors("Requests/sec: 1.0\n"), [0, 0, 0, 0]);
        assert_eq!(parse_wrk(SAMPLE).map(|w| w.socket_errors), Ok(socket_errors(SAMPLE).iter().sum()));
    }

    #[test]
    fn the_options_check_what_wrk_needs() {
        assert!(LoadBenchOptions::default().check_wrk().is_ok());
        let e = LoadBenchOptions { threads: 0, ..Default::default() }.check_wrk().unwrap_err();
        assert_eq!(e.to_string(), "invalid bench options: --threads must be at least 1");
        let e = LoadBenchOptions { threads: 4, connections: 2, ..Default::default() }.check_wrk().unwrap_err();
        assert_eq!(e.to_string(), "invalid bench options: --connections (2) must be at least --threads (4)");
    }
}
