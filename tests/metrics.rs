//! Issue 18: what Slipway tells machines. `/metrics` is the text format
//! Debian's `promtool` accepts and a real Prometheus (also Debian's,
//! installed by scripts/test.sh) scrapes and answers queries from; and
//! `serve --log-format json` writes one JSON object per line.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::Api;
use serde_json::{Value, json};

fn run_config() -> tempfile::TempDir {
    common::config_dir("[[job]]\nname = \"hello\"\ncommand = [\"sh\", \"-c\", \"echo hi; sleep 0.2\"]\n", &[])
}

async fn two_runs(api: &Api) {
    for _ in 0..2 {
        let (s, a) = api.call("POST", "/api/v1/events", None, Some(json!({"kind": "run", "jobs": ["hello"]}))).await;
        assert_eq!(s, 202, "{a}");
        api.wait_state(a["deployment_id"].as_i64().expect("id"), None, &["succeeded"]).await;
    }
}

/// Kills the child (Prometheus) when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue18_promtool_accepts_the_metrics_and_a_real_prometheus_scrapes_them() {
    let dir = run_config();
    let state = tempfile::tempdir().expect("state");
    let server = common::Server::start_logged(dir.path(), &format!("sqlite://{}/s.db", state.path().display()), &["--poll", "100ms"], state.path(), "");
    let api = Api::new(&server.url);
    two_runs(&api).await;

    let res = api.http.get(format!("{}/metrics", server.url)).send().await.expect("metrics");
    let content_type = res.headers()["content-type"].to_str().unwrap_or_default().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let body = res.text().await.expect("body");
    let file = state.path().join("metrics.txt");
    std::fs::write(&file, &body).expect("write");
    let check = Command::new("timeout")
        .args(["30", "sh", "-c", &format!("promtool check metrics < {}", file.display())])
        .output()
        .expect("promtool (scripts/test.sh installs Debian's prometheus)");
    assert!(check.status.success(), "promtool refuses the metrics:\n{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));

    // A real Prometheus, scraping this node every second.
    let port = common::free_port();
    let config = state.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: slipway\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            server.port
        ),
    )
    .expect("config");
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", state.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.path().join("prometheus.log")).expect("log"))
            .spawn()
            .expect("prometheus"),
    );
    let query = |q: &'static str| {
        let http = api.http.clone();
        async move {
            let encoded: String =
                q.bytes().map(|b| if b.is_ascii_alphanumeric() || b"_.-".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
            let url = format!("http://127.0.0.1:{port}/api/v1/query?query={encoded}");
            let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            v["data"]["result"][0]["value"][1].as_str().map(String::from)
        }
    };
    let log = state.path().join("prometheus.log");
    let succeeded = common::eventually(Duration::from_secs(60), "Prometheus to scrape the deployment count", || async {
        query("slipway_deployments{state=\"succeeded\"}").await.ok_or_else(|| std::fs::read_to_string(&log).unwrap_or_default())
    })
    .await;
    assert_eq!(succeeded, "2");
    let jobs = query("sum(slipway_job_duration_seconds_count{outcome=\"succeeded\"})").await;
    assert_eq!(jobs.as_deref(), Some("2"));
    let slowest = query("max(slipway_job_duration_seconds_sum)").await.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    assert!(slowest >= 0.4, "two jobs of at least 0.2 s each: {slowest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue18_serve_log_format_json_writes_one_object_per_line() {
    let dir = run_config();
    let state = tempfile::tempdir().expect("state");
    let server = common::Server::start_logged(
        dir.path(),
        &format!("sqlite://{}/s.db", state.path().display()),
        &["--poll", "100ms", "--log-format", "json"],
        state.path(),
        "",
    );
    let api = Api::new(&server.url);
    two_runs(&api).await;
    let text = server.log_text();
    let lines: Vec<Value> = text
        .lines()
        // The startup line is for people reading the terminal, not the log.
        .filter(|l| !l.trim().is_empty() && !l.starts_with("slipway serve: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{text}");
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string() && l["message"].is_string()), "{text}");
    assert!(lines.iter().any(|l| l.get("deployment").is_some() && l.get("job").is_some()), "a job's lines carry its deployment and job:\n{text}");
}
