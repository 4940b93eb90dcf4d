//! Jobs on SSH hosts (issue 15), through the real binary against a fleet
//! of real sshd hosts in network namespaces (`scripts/fleet.sh`): batches
//! and max_failed over 20 hosts, each host's result and output recorded
//! apart, dead hosts bounded by their timeout, a changed host key refused,
//! and a command cut off by a partition ended on the host, not run twice.
//! Needs root (the fleet); `scripts/test.sh` runs it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Server;
use common::fleet::Fleet;

/// A config for `fleet`'s hosts `1..=n` as group "web", plus `jobs`.
fn config(fleet: &Fleet, n: usize, jobs: &str) -> String {
    format!("{}{jobs}\n", fleet.hosts_toml(n))
}

fn detail(server: &Server, id: i64) -> serde_json::Value {
    common::get_json(&format!("{}/api/v1/deployments/{id}", server.url))
}

/// Run `job` to its end; the deployment's id.
fn run(server: &Server, dir: &Path, job: &str) -> (i64, std::process::Output) {
    let out = server.cli(dir, &["run", job]);
    let list = common::get_json(&format!("{}/api/v1/deployments", server.url));
    let id = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_i64())
        .max()
        .unwrap_or_else(|| panic!("no deployment: {list}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    (id, out)
}

/// Each host's part of the job's last attempt: name → (outcome, exit, reason).
fn hosts_of(detail: &serde_json::Value, job: &str) -> std::collections::BTreeMap<String, (String, Option<i64>, String)> {
    let attempts = detail["attempts"].as_array().cloned().unwrap_or_default();
    let last = attempts.iter().rev().find(|a| a["job"] == job).unwrap_or_else(|| panic!("no attempt of {job}: {detail}"));
    last["hosts"]
        .as_array()
        .unwrap_or_else(|| panic!("no hosts in {last}"))
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                (h["outcome"].as_str().unwrap().to_string(), h["exit_code"].as_i64(), h["reason"].as_str().unwrap_or("").to_string()),
            )
        })
        .collect()
}

/// The name a Slipway binary gets on a host: `slipway-` and the start of
/// its checksum.
fn agent_name(binary: &Path) -> String {
    use sha2::Digest as _;
    let sum = hex::encode(sha2::Sha256::digest(std::fs::read(binary).expect("read the binary")));
    format!("slipway-{}", &sum[..16])
}

/// The agent binaries uploaded to host `k`.
fn agents_on(fleet: &Fleet, k: usize) -> Vec<String> {
    std::fs::read_dir(fleet.host_root(k).join("bin")).expect("the host's bin").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// The job's script: prints where it runs, fails with 3 on the hosts
/// named in FAIL_ON.
const CHECK: &str = "#!/bin/sh\necho \"on $(hostname) in $(pwd) for $SLIPWAY_JOB\"\necho \"to stderr\" >&2\ncase \" $FAIL_ON \" in *\" $(hostname) \"*) exit 3;; esac\nexit 0\n";

#[test]
fn issue15_a_job_on_twenty_hosts_in_batches_with_max_failed() {
    let fleet = Fleet::up(20);
    let jobs = r#"
[[job]]
name = "tolerant"
command = ["./check.sh"]
env = { FAIL_ON = "h4 h9" }
hosts = "web"
batch = 5
max_failed = 2

[[job]]
name = "strict"
command = ["./check.sh"]
env = { FAIL_ON = "h4 h9" }
hosts = "web"
batch = "25%"
max_failed = "5%"
"#;
    let dir = common::config_dir(&config(&fleet, 20, jobs), &[("check.sh", CHECK)]);
    let server = fleet.serve(dir.path());

    // Two failures, two tolerated: the job succeeds and says who failed.
    let (id, out) = run(&server, dir.path(), "tolerant");
    let first = id;
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let d = detail(&server, id);
    let hosts = hosts_of(&d, "tolerant");
    assert_eq!(hosts.len(), 20, "{hosts:?}");
    for (name, (outcome, code, reason)) in &hosts {
        if name == "10.77.0.14" || name == "10.77.0.19" {
            assert_eq!((outcome.as_str(), *code, reason.as_str()), ("failed", Some(3), "exit 3"), "{name}");
        } else {
            assert_eq!((outcome.as_str(), *code), ("succeeded", Some(0)), "{name}: {reason}");
        }
    }
    let job = d["jobs"].as_array().unwrap().iter().find(|j| j["name"] == "tolerant").unwrap().clone();
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("2 of 20 hosts failed, within max_failed 2") && reason.contains("10.77.0.14 (exit 3)"), "{reason}");

    // The hosts run the build SLIPWAY_SSH_AGENT names (here: this one
    // without debug information), uploaded under its own checksum.
    let (named, own) = (agent_name(&common::fleet::agent_binary()), agent_name(&common::slipway_bin()));
    assert_ne!(named, own, "strip made no other binary: nothing would tell the two apart");
    for k in [1, 20] {
        assert_eq!(agents_on(&fleet, k), std::slice::from_ref(&named), "host {k} got the named agent, and only it");
    }

    // Each host's output is its own: `logs --host` keeps one host's lines.
    let config = dir.path().to_path_buf();
    let logs = server.cli(&config, &["logs", &id.to_string(), "tolerant", "--host", "10.77.0.14"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("on h4 in /srv/slipway/revisions/") && text.contains("for tolerant"), "{text}");
    assert!(text.contains("stderr: to stderr"), "{text}");
    assert!(!text.contains("on h5 "), "another host's line under --host: {text}");
    let status = String::from_utf8_lossy(&server.cli(&config, &["status", &id.to_string()]).stdout).to_string();
    assert!(status.contains("tolerant attempt 1 on 20 hosts") && status.contains("10.77.0.19"), "{status}");

    // One failure tolerated (5% of 20): batch 2 (h6–h10) brings it to two,
    // so batches 3 and 4 never run.
    let (id, out) = run(&server, dir.path(), "strict");
    assert!(!out.status.success());
    let hosts = hosts_of(&detail(&server, id), "strict");
    let skipped: Vec<&String> = hosts.iter().filter(|(_, (o, _, _))| o == "skipped").map(|(n, _)| n).collect();
    assert_eq!(skipped.len(), 10, "{hosts:?}");
    for k in 11..=20 {
        assert!(skipped.contains(&&format!("10.77.0.{}", 10 + k)), "h{k} ran: {hosts:?}");
        // Not run there means not run: the revision never reached it for this job.
    }

    // A revision goes to a host once, by content hash (h1 ran both jobs,
    // whose revisions differ when the store or the log changed the config
    // directory between them); a host that never ran got nothing new.
    let revisions: std::collections::BTreeSet<String> =
        [first, id].iter().map(|i| detail(&server, *i)["deployment"]["revision"].as_str().unwrap().to_string()).collect();
    let trees = |k: usize| {
        std::fs::read_dir(fleet.host_root(k).join("revisions"))
            .map(|d| d.filter(|e| e.as_ref().is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))).count())
            .unwrap_or(0)
    };
    assert_eq!(trees(1), revisions.len());
    assert_eq!(trees(12), 1);
}

#[test]
fn issue15_dead_hosts_are_bounded_and_recorded_and_the_others_run() {
    let fleet = Fleet::up(6);
    let jobs = r#"
[[job]]
name = "hello"
command = ["./check.sh"]
hosts = "web"
max_failed = 4
timeout = "2m"
"#;
    let dir = common::config_dir(&config(&fleet, 6, jobs), &[("check.sh", CHECK)]);
    fleet.ctl(1, "link-down");
    fleet.ctl(2, "stop-sshd");
    fleet.ctl(3, "freeze");
    fleet.ctl(4, "rekey");
    let server = fleet.serve(dir.path());
    let started = std::time::Instant::now();
    let (id, out) = run(&server, dir.path(), "hello");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Every dead host bounded by its 3 s connect timeout (not the job's
    // two minutes), all in parallel.
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    let hosts = hosts_of(&detail(&server, id), "hello");
    let reason = |k: usize| hosts[&format!("10.77.0.{}", 10 + k)].2.clone();
    assert!(reason(1).contains("timed out after 3s") || reason(1).contains("unreachable"), "{}", reason(1));
    assert!(reason(2).contains("refused"), "{}", reason(2));
    assert!(reason(3).contains("timed out after 3s"), "{}", reason(3));
    assert!(reason(4).contains("host key mismatch"), "{}", reason(4));
    for k in 5..=6 {
        assert_eq!(hosts[&format!("10.77.0.{}", 10 + k)].0, "succeeded", "{hosts:?}");
    }
    fleet.ctl(3, "thaw");
    fleet.ctl(1, "link-up");
}

#[test]
fn issue15_a_command_cut_off_by_a_partition_is_ended_on_its_host() {
    let fleet = Fleet::up(2);
    let jobs = r#"
[[job]]
name = "long"
command = ["sh", "-c", "echo started; sleep 300"]
hosts = "web"
max_failed = 1
timeout = "10m"
"#;
    let dir = common::config_dir(&config(&fleet, 2, jobs), &[]);
    let server = fleet.serve(dir.path());
    let running_on = |k: usize| {
        let out = fleet.exec_on(k, &["sh", "-c", "ps -eo args | grep -c '^sleep 300' || true"]);
        String::from_utf8_lossy(&out.stdout).trim().parse::<usize>().unwrap_or(0)
    };
    let mut cli = server.cli_command(dir.path(), &["run", "long"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    common::wait_for(Duration::from_secs(60), "the command to run on h1", || (running_on(1) == 1).then_some(()));
    fleet.ctl(1, "link-down");
    // The node notices the partition (keepalives) and records h1 failed;
    // the command keeps running on h1 until its agent stops hearing the
    // node's heartbeats, then it is ended there.
    common::wait_for(Duration::from_secs(60), "the command on h1 to be ended by its agent", || (running_on(1) == 0).then_some(()));
    fleet.ctl(1, "link-up");
    assert_eq!(running_on(2), 1, "h2 is untouched by h1's partition");
    let _ = cli.kill();
    let _ = cli.wait();
}

#[test]
fn issue15_a_retry_after_a_partition_ends_the_cut_off_command_before_it_starts() {
    let fleet = Fleet::up(1);
    let jobs = r#"
[[job]]
name = "long"
command = ["sh", "-c", "echo started; sleep 300"]
hosts = "web"
timeout = "10m"
retry = { attempts = 2, backoff = "10s" }   # time for the test to heal the link first
"#;
    let dir = common::config_dir(&config(&fleet, 1, jobs), &[]);
    let server = fleet.serve(dir.path());
    // The pids of the job's `sleep`s on the host.
    let sleeps = || {
        let out = fleet.exec_on(1, &["ps", "-eo", "pid=,args="]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_start().split_once(' ').is_some_and(|(_, a)| a.trim() == "sleep 300"))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let mut cli = server.cli_command(dir.path(), &["run", "long"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let first = common::wait_for(Duration::from_secs(60), "attempt 1 to run on h1", || sleeps().first().cloned());
    fleet.ctl(1, "link-down");
    // The node notices (keepalives), fails attempt 1 and schedules attempt 2.
    let id = common::wait_for(Duration::from_secs(60), "attempt 1 to be recorded as failed", || {
        let list = common::get_json(&format!("{}/api/v1/deployments", server.url));
        let id = list.as_array()?.iter().filter_map(|d| d["id"].as_i64()).max()?;
        let d = detail(&server, id);
        d["attempts"].as_array().is_some_and(|a| !a.is_empty()).then_some(id)
    });
    fleet.ctl(1, "link-up");
    // Attempt 2 ends attempt 1's command before it starts its own: never
    // two at once, and the old one is gone.
    let second = common::wait_for(Duration::from_secs(60), "attempt 2 to run on h1", || {
        let now = sleeps();
        assert!(now.len() <= 1, "two attempts at once on h1: {now:?}");
        now.first().filter(|p| **p != first).cloned()
    });
    assert!(!sleeps().contains(&first), "attempt 1's command still runs beside attempt 2 ({second})");
    let hosts = hosts_of(&detail(&server, id), "long");
    assert!(hosts.values().any(|(o, _, r)| o == "failed" && (r.contains("lost") || r.contains("stopped answering"))), "{hosts:?}");
    let _ = cli.kill();
    let _ = cli.wait();
}

#[test]
fn issue15_a_job_whose_agent_was_killed_is_ended_by_the_nodes_host_check() {
    let fleet = Fleet::up(1);
    let jobs = r#"
[[job]]
name = "long"
command = ["sh", "-c", "echo started; sleep 300"]
hosts = "web"
timeout = "10m"
"#;
    let toml = config(&fleet, 1, jobs).replace("\ndir = ", "\ncheck_every = \"1s\"\ndir = ");
    assert!(toml.contains("check_every"), "{toml}");
    let dir = common::config_dir(&toml, &[]);
    let server = fleet.serve(dir.path());
    let pids_of = |what: &str| {
        let out = fleet.exec_on(1, &["ps", "-eo", "pid=,args="]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(what) && !l.contains("ps -eo"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let mut cli = server.cli_command(dir.path(), &["run", "long"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    common::wait_for(Duration::from_secs(60), "the command to run on h1", || (!pids_of("sleep 300").is_empty()).then_some(()));
    // The agent that supervises it dies (kill -9): its job's process group
    // lives on, in a session of its own, with nothing to end it...
    let agents = pids_of("agent ssh run");
    assert_eq!(agents.len(), 1, "one agent runs the job: {agents:?}");
    assert!(fleet.exec_on(1, &["kill", "-9", &agents[0]]).status.success());
    // ...but the node's next check of the host sweeps it.
    common::wait_for(Duration::from_secs(30), "the orphaned command to be ended", || pids_of("sleep 300").is_empty().then_some(()));
    common::wait_for(Duration::from_secs(10), "the node's log to say so", || {
        server.log_text().contains("ended job processes on a host whose agent had died").then_some(())
    });
    let _ = cli.kill();
    let _ = cli.wait();
}

#[test]
fn issue15_secrets_reach_jobs_on_hosts_masked_and_the_key_never_shows() {
    let fleet = Fleet::up(2);
    let secrets = tempfile::tempdir().expect("tempdir");
    let value = secrets.path().join("api");
    std::fs::write(&value, "topsecret-5521\n").expect("write the secret");
    let jobs = format!(
        r#"
[secret.api]
file = {value:?}

[[job]]
name = "leak"
shell = true
secrets = {{ API_KEY = "api" }}
command = "echo the key is $API_KEY on $(hostname); echo \"$API_KEY\" >&2; exit 3"
hosts = "web"
max_failed = 2
"#,
        value = value.display().to_string()
    );
    let dir = common::config_dir(&config(&fleet, 2, &jobs), &[]);
    let server = fleet.serve(dir.path());
    let (id, out) = run(&server, dir.path(), "leak");
    assert!(out.status.success(), "both hosts failed, 2 tolerated: {}", String::from_utf8_lossy(&out.stderr));
    let logs = server.cli(dir.path(), &["logs", &id.to_string(), "leak"]);
    let logs = format!("{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
    for h in ["h1", "h2"] {
        assert!(logs.contains(&format!("the key is [secret api] on {h}")), "each host had the value, masked in its output: {logs}");
    }
    // The private key's body and the secret's value appear nowhere: not in
    // the record, the API, the logs nor the node's own log.
    let key = std::fs::read_to_string(fleet.key_path()).expect("the private key");
    let body = key.lines().nth(1).expect("a key body line").to_string();
    let everything = format!("{logs}{}{}", detail(&server, id), server.log_text());
    assert!(!everything.contains("topsecret-5521"), "the secret's value leaked: {everything}");
    assert!(!everything.contains(&body), "the SSH private key leaked");
}

#[test]
fn issue15_hosts_called_by_names_of_their_own() {
    let fleet = Fleet::up(2);
    let (a1, a2) = (fleet.host(1).address.clone(), fleet.host(2).address.clone());
    // The group's addresses, given names: `{ name, address }` entries.
    let toml = config(&fleet, 2, "\n[[job]]\nname = \"where\"\ncommand = [\"hostname\"]\nhosts = \"web\"\n").replace(
        &format!("addresses = [\"{a1}\", \"{a2}\"]"),
        &format!("addresses = [{{ name = \"web-a\", address = \"{a1}\" }}, {{ name = \"web-b\", address = \"{a2}:22\" }}]"),
    );
    assert!(toml.contains("web-a"), "{toml}");
    let dir = common::config_dir(&toml, &[]);
    let server = fleet.serve(dir.path());
    let (id, out) = run(&server, dir.path(), "where");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hosts = hosts_of(&detail(&server, id), "where");
    assert_eq!(hosts.keys().cloned().collect::<Vec<_>>(), ["web-a", "web-b"], "the record names them: {hosts:?}");
    let logs = server.cli(dir.path(), &["logs", &id.to_string(), "where", "--host", "web-b"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("stdout: h2") && !text.contains("stdout: h1"), "{text}");
    let listed = server.cli(dir.path(), &["hosts"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success() && text.contains(&format!("web-a ({a1}:22)")) && text.contains(&format!("web-b ({a2}:22)")), "{text}");
}

#[test]
fn issue19_hosts_get_the_running_build_after_its_file_is_gone() {
    // A node ships its own binary to hosts as their agent. Its file can be
    // replaced or removed while it runs (a package upgraded in place; in
    // CI a `cargo build` relinking target/debug/slipway): the hosts must
    // still get the build that runs, not "cannot read … (deleted)".
    let fleet = Fleet::up(1);
    let dir = common::config_dir(&config(&fleet, 1, "\n[[job]]\nname = \"where\"\ncommand = [\"hostname\"]\nhosts = \"web\"\n"), &[]);
    let own = tempfile::tempdir().expect("tempdir");
    let bin = own.path().join("slipway");
    std::fs::copy(common::fleet::agent_binary(), &bin).expect("copy the binary");
    let name = agent_name(&bin);
    let server = fleet.serve_binary(dir.path(), &bin);
    std::fs::remove_file(&bin).expect("remove the running binary's file");

    let (id, out) = run(&server, dir.path(), "where");
    assert!(out.status.success(), "{}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr), server.log_text());
    let hosts = hosts_of(&detail(&server, id), "where");
    assert_eq!(hosts.values().map(|(o, _, _)| o.as_str()).collect::<Vec<_>>(), ["succeeded"], "{hosts:?}");
    assert_eq!(agents_on(&fleet, 1), [name], "the host runs the build the node runs");
}
