//! SSH hosts: jobs (and, later, services) on a fleet of servers, reached
//! over SSH. Host groups are `[[hosts]]` tables; a job with `hosts = "web"`
//! runs on every host of the group, batch by batch, and records each
//! host's result and output apart ([`crate::store::PartResult`]). On each
//! host Slipway runs its own binary as an agent (`slipway agent ssh …`,
//! uploaded once per checksum, [`session::ensure_agent`]) that supervises
//! the job's process there: the job's argv reaches it as JSON on stdin, so
//! nothing from a payload is ever a shell string, and a process a
//! partition cut off is ended by the agent when the node's heartbeats
//! stop. The pinned revision is shipped once per host and content hash.
//! Design: docs/design/ssh.md.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::{Capabilities, ConfigTables, JobRequest, Key, KeyTable, Line, NodeContext, OutputSink, RunResult, Settings, Stream, TableKeys, Target, TargetError, TargetKind};
use crate::store::{Outcome, PartResult};
use config::{Host, JobSettings};
use session::{Chunk, Connection, Endpoint, Keys, RemoteExit};

pub mod agent;
pub mod config;
mod machines;
mod rollout;
pub mod session;
pub mod supervisor;

pub static KIND: Kind = Kind;

pub struct Kind;

#[async_trait]
impl TargetKind for Kind {
    fn name(&self) -> &'static str {
        "ssh"
    }

    fn about(&self) -> &'static str {
        "commands on groups of hosts over SSH ([[hosts]]), batch by batch"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { runs_jobs: true, own_rollout: true, remote: true, proxied: true, ..Capabilities::default() }
    }

    fn service_keys(&self) -> &'static [Key] {
        config::SERVICE_KEYS
    }

    fn service_settings(&self, table: &mut KeyTable<'_, '_>) -> Option<Settings> {
        config::read_service(table)
    }

    fn tables(&self) -> &'static [TableKeys] {
        &[config::HOSTS]
    }

    fn read_tables(&self, tables: &mut ConfigTables<'_, '_>) -> Option<Settings> {
        config::read_groups(tables)
    }

    fn rollout_rounds(&self, settings: &Settings) -> u32 {
        let Ok(s) = settings.get::<JobSettings>() else { return 1 };
        let hosts = s.group.hosts.len();
        hosts.div_ceil(s.batch.map(|b| b.batch_of(hosts)).unwrap_or(1)) as u32
    }

    fn job_keys(&self) -> &'static [Key] {
        config::JOB_KEYS
    }

    fn job_settings(&self, table: &mut KeyTable<'_, '_>) -> Option<Settings> {
        config::read_job(table)
    }

    async fn build(&self, node: &NodeContext) -> Result<Arc<dyn Target>, TargetError> {
        Ok(Arc::new(SshTarget::new(node.installation.clone())))
    }

    async fn agent(&self, args: Vec<String>) -> Result<u8, String> {
        agent::main(args).await
    }
}

/// How often the node tells each agent it is alive, and how long an agent
/// waits without hearing from it before it ends the job's process there.
const HEARTBEAT: Duration = Duration::from_secs(1);
const HEARTBEAT_LOST: Duration = Duration::from_secs(15);
/// Bound on one short exchange with an agent (a check, an unpack).
const EXCHANGE: Duration = Duration::from_secs(60);
/// Bound on uploading the agent or a revision to one host.
const UPLOAD: Duration = Duration::from_secs(300);

pub struct SshTarget {
    installation: String,
    /// Who starts processes on hosts: this process, for the agents' marks.
    owner: String,
    /// Revisions packed for shipping, by local directory.
    packed: Mutex<HashMap<PathBuf, Arc<Packed>>>,
    /// Open connections, by host, user and the keys they were checked
    /// with: later jobs skip the handshake. A lost one is replaced.
    pool: Mutex<HashMap<String, Connection>>,
    /// Revisions already on a host (pool key, SHA-256) → where.
    shipped: Mutex<HashMap<(String, String), String>>,
    /// The binary uploaded to hosts as their agent.
    agent: Arc<session::AgentBinary>,
    /// When each group was last checked ([`Target::tend`]), and whether
    /// each host (group/name) answered then.
    tended: Mutex<HashMap<String, Instant>>,
    answered: Mutex<HashMap<String, bool>>,
}

/// A directory as a gzip'd tar, named by its SHA-256.
struct Packed {
    sha256: String,
    bytes: Vec<u8>,
}

impl SshTarget {
    pub fn new(installation: String) -> Self {
        Self::with_agent(installation, default_agent())
    }

    /// A target whose hosts run `agent` (a Slipway binary) as their agent:
    /// for a process that is not itself Slipway's binary (a test).
    pub fn with_agent(installation: String, agent: Arc<session::AgentBinary>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        SshTarget {
            installation,
            owner: format!("{}@{host}", std::process::id()),
            packed: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            shipped: Mutex::new(HashMap::new()),
            agent,
            tended: Mutex::new(HashMap::new()),
            answered: Mutex::new(HashMap::new()),
        }
    }

    fn agent_binary(&self) -> &session::AgentBinary {
        &self.agent
    }

    /// A connection to `ep`: an open one if it is still alive, else a new one.
    async fn connection(&self, ep: &Endpoint, keys: &Keys) -> Result<(Connection, String), session::SshError> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(keys.private_key.expose().as_bytes());
        h.update(keys.known_hosts.as_bytes());
        let key = format!("{}|{}|{}", ep.user, ep.address, hex::encode(&h.finalize()[..8]));
        let cached = self.pool.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        if let Some(c) = cached
            && c.lost().is_none()
        {
            return Ok((c, key));
        }
        self.forget(&key);
        let c = session::connect(ep, keys).await?;
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), c.clone());
        Ok((c, key))
    }

    /// Drop a pooled connection and what was known through it.
    fn forget(&self, key: &str) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        self.shipped.lock().unwrap_or_else(|e| e.into_inner()).retain(|(k, _), _| k != key);
    }

    /// The revision directory packed once per process (a revision never
    /// changes once materialized).
    async fn pack(&self, dir: &Path) -> Result<Arc<Packed>, String> {
        if let Some(p) = self.packed.lock().unwrap_or_else(|e| e.into_inner()).get(dir) {
            return Ok(p.clone());
        }
        let d = dir.to_path_buf();
        let packed = tokio::task::spawn_blocking(move || pack(&d)).await.map_err(|e| format!("packing the revision failed: {e}"))??;
        let packed = Arc::new(packed);
        self.packed.lock().unwrap_or_else(|e| e.into_inner()).insert(dir.to_path_buf(), packed.clone());
        Ok(packed)
    }
}

fn pack(dir: &Path) -> Result<Packed, String> {
    use sha2::Digest as _;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir).map_err(|e| format!("cannot pack {} for the hosts: {e}", dir.display()))?;
    let bytes = tar.into_inner().and_then(|gz| gz.finish()).map_err(|e| format!("cannot pack {} for the hosts: {e}", dir.display()))?;
    Ok(Packed { sha256: hex::encode(sha2::Sha256::digest(&bytes)), bytes })
}

/// The Slipway binary the hosts run as their agent: this one, or the one
/// `SLIPWAY_SSH_AGENT` names (hosts of another platform than the node's;
/// a build without debug information, which uploads faster). One per
/// process: its checksum and compressed form are computed once.
fn default_agent() -> Arc<session::AgentBinary> {
    static AGENT: std::sync::OnceLock<Arc<session::AgentBinary>> = std::sync::OnceLock::new();
    AGENT
        .get_or_init(|| {
            Arc::new(match std::env::var_os("SLIPWAY_SSH_AGENT") {
                Some(p) if !p.is_empty() => session::AgentBinary::at(PathBuf::from(p)),
                _ => session::AgentBinary::at(session::own_binary()),
            })
        })
        .clone()
}

/// What every host of a job needs: the same for all of them.
struct Shared<'a> {
    target: &'a SshTarget,
    req: &'a JobRequest,
    settings: &'a JobSettings,
    keys: Keys,
    packed: Arc<Packed>,
    /// The agent's `run` request but for where the revision is unpacked.
    env: BTreeMap<String, String>,
    output: &'a OutputSink,
    cancel: &'a CancellationToken,
    deadline: Instant,
}

#[async_trait]
impl Target for SshTarget {
    async fn rollout(&self, req: &crate::service::RolloutRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
        rollout::run(self, req, output, cancel).await
    }

    async fn machines(&self, tables: &Settings) -> Vec<super::Machine> {
        machines::machines(self, tables).await
    }

    async fn tend(&self, tables: &Settings) {
        machines::tend(self, tables).await
    }

    async fn drain(&self, tables: &Settings, name: &str, drained: bool) -> Result<String, TargetError> {
        machines::drain(self, tables, name, drained).await
    }

    async fn run(&self, req: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
        let settings: JobSettings = match req.spec.settings.get() {
            Ok(s) => s,
            Err(e) => return RunResult::failed(format!("a job on SSH hosts needs its hosts: {e}")),
        };
        let keys = match (settings.group.key.read(), settings.group.known_hosts.read()) {
            (Ok(k), Ok(kh)) => Keys { private_key: k, known_hosts: kh.expose().to_string() },
            (Err(e), _) | (_, Err(e)) => return RunResult::failed(e),
        };
        let packed = match self.pack(&req.workdir).await {
            Ok(p) => p,
            Err(e) => return RunResult::failed(e),
        };
        let mut env: BTreeMap<String, String> = req.values.iter().map(|(k, v)| (format!("SLIPWAY_{}", k.to_ascii_uppercase()), v.clone())).collect();
        env.insert("SLIPWAY_JOB".into(), req.job.clone());
        env.insert("SLIPWAY_ATTEMPT".into(), req.attempt.to_string());
        env.extend(req.spec.env.clone());
        for (k, secret) in &req.spec.secrets {
            match secret.read() {
                Ok(v) => env.insert(k.clone(), v.expose().to_string()),
                Err(e) => return RunResult::failed(e),
            };
        }
        let timeout = Duration::from_millis(req.spec.timeout_ms.max(1));
        let shared = Shared { target: self, req: &req, settings: &settings, keys, packed, env, output: &output, cancel: &cancel, deadline: Instant::now() + timeout };
        if settings.one_host {
            return once(&shared, timeout).await;
        }
        let hosts = &settings.group.hosts;
        let batch = settings.batch.map(|b| b.batch_of(hosts.len())).unwrap_or(hosts.len().max(1));
        let tolerated = settings.max_failed.tolerated_of(hosts.len());
        let mut parts: Vec<PartResult> = Vec::new();
        let mut failed = 0usize;
        let mut stopped: Option<String> = None;
        for (i, chunk) in hosts.chunks(batch).enumerate() {
            if stopped.is_some() {
                let now = crate::store::now_ms();
                for h in chunk {
                    parts.push(PartResult {
                        part: h.name.clone(),
                        started_at: now,
                        finished_at: now,
                        outcome: Outcome::Skipped,
                        exit_code: None,
                        reason: stopped.clone(),
                    });
                }
                continue;
            }
            if hosts.len() > batch {
                note(&output, format!("[ssh] batch {} of {}: {}", i + 1, hosts.len().div_ceil(batch), names(chunk))).await;
            }
            let results: Vec<PartResult> = join_all(chunk.iter().map(|h| run_on(&shared, h))).await.into_iter().map(|(p, _)| p).collect();
            failed += results.iter().filter(|r| r.outcome != Outcome::Succeeded).count();
            parts.extend(results);
            if cancel.is_cancelled() {
                stopped = Some("not run: the job was stopped".into());
            } else if failed > tolerated {
                stopped = Some(format!("not run: {failed} hosts had failed, more than the {tolerated} tolerated (max_failed)"));
            } else if Instant::now() >= shared.deadline {
                stopped = Some(format!("not run: the job's timeout ({}) was reached", humantime::format_duration(timeout)));
            }
        }
        summarize(parts, failed, tolerated, cancel.is_cancelled(), timeout)
    }
}

/// A service's own job (its migration): once per deployment, on the first
/// host that can be reached; hosts that cannot are recorded and skipped.
async fn once(s: &Shared<'_>, timeout: Duration) -> RunResult {
    let mut parts = Vec::new();
    for host in &s.settings.group.hosts {
        let (part, reached) = run_on(s, host).await;
        let outcome = part.outcome;
        let reason = part.reason.clone();
        let exit_code = part.exit_code.map(|c| c as i32);
        parts.push(part);
        if reached || outcome == Outcome::Cancelled || Instant::now() >= s.deadline {
            let reason = match (outcome, reason) {
                (Outcome::Succeeded, _) => None,
                (_, r) => Some(format!("on {}: {}", host.name, r.unwrap_or_else(|| outcome.to_string()))),
            };
            return RunResult { outcome, exit_code, reason, parts };
        }
    }
    let list = parts.iter().map(|p| format!("{} ({})", p.part, p.reason.clone().unwrap_or_default())).collect::<Vec<_>>().join(", ");
    let _ = timeout;
    RunResult { outcome: Outcome::Failed, exit_code: None, reason: Some(format!("no host of the group could be reached: {list}")), parts }
}

/// The job's result from its hosts' results.
fn summarize(parts: Vec<PartResult>, failed: usize, tolerated: usize, cancelled: bool, timeout: Duration) -> RunResult {
    let bad: Vec<&PartResult> = parts.iter().filter(|p| !matches!(p.outcome, Outcome::Succeeded | Outcome::Skipped)).collect();
    let skipped = parts.iter().filter(|p| p.outcome == Outcome::Skipped).count();
    let list = bad.iter().take(10).map(|p| format!("{} ({})", p.part, p.reason.clone().unwrap_or_else(|| p.outcome.as_str().to_string()))).collect::<Vec<_>>().join(", ");
    let more = if bad.len() > 10 { format!(" and {} more", bad.len() - 10) } else { String::new() };
    let total = parts.len();
    // One exit code for the job when every failed host agrees on it (a
    // retry on that code then means what it says).
    let codes: Vec<Option<i64>> = bad.iter().map(|p| p.exit_code).collect();
    let exit_code = codes.first().copied().flatten().filter(|c| codes.iter().all(|x| *x == Some(*c))).map(|c| c as i32);
    let skipped_note = if skipped > 0 { format!("; {skipped} not run") } else { String::new() };
    let (outcome, reason) = if cancelled {
        (Outcome::Cancelled, Some(format!("stopped on request{skipped_note}")))
    } else if failed > tolerated {
        let timed_out = bad.iter().all(|p| p.outcome == Outcome::TimedOut);
        let o = if timed_out { Outcome::TimedOut } else { Outcome::Failed };
        (o, Some(format!("{failed} of {total} hosts failed (max_failed {tolerated}): {list}{more}{skipped_note}")))
    } else if skipped > 0 {
        (Outcome::TimedOut, Some(format!("timed out after {}: {skipped} of {total} hosts not run", humantime::format_duration(timeout))))
    } else if failed > 0 {
        (Outcome::Succeeded, Some(format!("{failed} of {total} hosts failed, within max_failed {tolerated}: {list}{more}")))
    } else {
        (Outcome::Succeeded, None)
    };
    RunResult { outcome, exit_code: if outcome == Outcome::Succeeded { Some(0) } else { exit_code }, reason, parts }
}

fn names(hosts: &[Host]) -> String {
    hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
}

async fn note(output: &OutputSink, line: String) {
    let _ = output.send((Stream::Stdout, line).into()).await;
}

/// One host's part of the job, from connecting to its end; and whether
/// the host was reached (logged in to) at all.
async fn run_on(s: &Shared<'_>, host: &Host) -> (PartResult, bool) {
    let started_at = crate::store::now_ms();
    let started = Instant::now();
    let result = attempt_on(s, host).await;
    let reached = !matches!(result, Err(End::Unreached(_)));
    let (outcome, exit_code, reason) = match result {
        Ok((RemoteExit::Code(0), _)) => (Outcome::Succeeded, Some(0), None),
        Ok((RemoteExit::Code(c), _)) if c == AGENT_FAILED => (Outcome::Failed, None, Some(format!("could not start: {}", agent_said(s, host)))),
        Ok((RemoteExit::Code(c), _)) => (Outcome::Failed, Some(c as i64), Some(format!("exit {c}"))),
        Ok((RemoteExit::Signal(sig), _)) => (Outcome::Failed, None, Some(format!("killed by signal {sig}"))),
        Err(End::Cancelled) => (Outcome::Cancelled, None, Some("stopped on request".into())),
        Err(End::TimedOut) => (Outcome::TimedOut, None, Some(format!("timed out after {}", humantime::format_duration(started.elapsed())))),
        Err(End::Failed(why)) | Err(End::Unreached(why)) => (Outcome::Failed, None, Some(why)),
    };
    let line = match &reason {
        Some(r) => format!("[ssh] {}: {} ({})", host.name, outcome.as_str(), r),
        None => format!("[ssh] {}: {} in {:.1?}", host.name, outcome.as_str(), started.elapsed()),
    };
    let _ = s.output.send(Line { stream: Stream::Stdout, text: line, part: Some(host.name.clone()), cut: false }).await;
    (PartResult { part: host.name.clone(), started_at, finished_at: crate::store::now_ms(), outcome, exit_code, reason }, reached)
}

/// The agent's own failures (it could not start the program) exit with
/// this code and say why on stderr, prefixed "slipway-agent: ".
const AGENT_FAILED: i32 = 125;

fn agent_said(_s: &Shared<'_>, _host: &Host) -> String {
    // The agent's line went to the host's output (stderr); point there.
    "see the host's output (slipway logs … --host)".to_string()
}

enum End {
    Cancelled,
    TimedOut,
    /// Could not connect or log in: nothing ran there.
    Unreached(String),
    Failed(String),
}

impl From<session::SshError> for End {
    fn from(e: session::SshError) -> Self {
        End::Failed(short(&e.message))
    }
}

/// Messages name the host already in the part; keep what follows it.
fn short(message: &str) -> String {
    message.split_once("): ").map(|(_, m)| m.to_string()).unwrap_or_else(|| message.to_string())
}

async fn attempt_on(s: &Shared<'_>, host: &Host) -> Result<(RemoteExit, ()), End> {
    let group = &s.settings.group;
    let ep = Endpoint { name: host.name.clone(), address: host.address.clone(), user: group.user.clone(), connect_timeout: group.connect_timeout() };
    let (conn, key) = tokio::select! {
        c = s.target.connection(&ep, &s.keys) => c.map_err(|e| End::Unreached(short(&e.message)))?,
        _ = s.cancel.cancelled() => return Err(End::Cancelled),
        _ = tokio::time::sleep_until(s.deadline.into()) => return Err(End::TimedOut),
    };
    let result = tokio::select! {
        r = on_connection(s, host, &conn, &key) => r,
        _ = tokio::time::sleep_until(s.deadline.into()) => Err(End::TimedOut),
    };
    if result.is_err() || conn.lost().is_some() {
        // Whatever went wrong, the next job starts from a new connection.
        s.target.forget(&key);
    }
    result
}

async fn on_connection(s: &Shared<'_>, host: &Host, conn: &Connection, key: &str) -> Result<(RemoteExit, ()), End> {
    let dir = &s.settings.group.dir;
    let agent = session::ensure_agent_with(conn, s.target.agent_binary(), dir, UPLOAD).await?;
    let workdir = s.target.ship_once(conn, key, &agent, dir, &s.packed).await?;
    let req = s.req;
    if req.attempt > 1 {
        // An earlier attempt's process may still run there (a partition
        // cut it off): it ends before this one starts, never beside it.
        let ask = agent::EndEarlierRequest {
            dir: dir.clone(),
            installation: s.target.installation.clone(),
            deployment: req.deployment_id,
            job: req.job.clone(),
            attempt: req.attempt,
            within_ms: req.spec.kill_grace_ms + 5000,
        };
        let answer = exchange(conn, &agent, "end-earlier", &ask, &[]).await?;
        if answer.get("ended").and_then(|e| e.as_bool()) == Some(false) {
            return Err(End::Failed("a process of an earlier attempt of this job is still running there and did not end".into()));
        }
    }
    let (argv, shell) = match &req.spec.command {
        crate::config::Command::Argv(a) => (Some(a.iter().map(|x| crate::process::substitute(x, &req.values)).collect::<Vec<_>>()), None),
        crate::config::Command::Shell(line) => (None, Some(line.clone())),
        other => return Err(End::Failed(format!("{} does not run on SSH hosts", command_name(other)))),
    };
    let run = agent::RunRequest {
        dir: dir.clone(),
        installation: s.target.installation.clone(),
        owner: s.target.owner.clone(),
        deployment: req.deployment_id,
        job: req.job.clone(),
        attempt: req.attempt,
        argv,
        shell,
        env: s.env.clone(),
        workdir,
        timeout_ms: req.spec.timeout_ms,
        kill_grace_ms: req.spec.kill_grace_ms,
        heartbeat_ms: HEARTBEAT_LOST.as_millis() as u64,
    };
    let mut process = conn.spawn(&session::agent_command(&agent, "run")).await?;
    let mut first = serde_json::to_vec(&run).map_err(|e| End::Failed(e.to_string()))?;
    first.push(b'\n');
    process.write(&first).await?;
    let mut out = Splitter::new(Stream::Stdout, host.name.clone());
    let mut err = Splitter::new(Stream::Stderr, host.name.clone());
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut stopping = false;
    let mut exit = None;
    loop {
        tokio::select! {
            chunk = process.next() => match chunk {
                Some(Chunk::Stdout(b)) => out.feed(&b, s.output).await,
                Some(Chunk::Stderr(b)) => err.feed(&b, s.output).await,
                Some(Chunk::Exit(e)) => exit = Some(e),
                None => break,
            },
            _ = beat.tick(), if !stopping => {
                // A write that fails means the connection is gone: `next`
                // says so next.
                let _ = process.write(b"\n").await;
            }
            _ = s.cancel.cancelled(), if !stopping => {
                // EOF on its stdin: the agent ends the process (TERM, the
                // job's kill grace, KILL) and exits.
                stopping = true;
                let _ = process.close_stdin().await;
            }
        }
    }
    out.flush(s.output).await;
    err.flush(s.output).await;
    if stopping {
        return Err(End::Cancelled);
    }
    match (exit, process.lost()) {
        (Some(e), _) => Ok((e, ())),
        (None, Some(lost)) => Err(End::Failed(short(&lost.message))),
        (None, None) => Err(End::Failed("the host closed the session without an exit status".into())),
    }
}

fn command_name(c: &crate::config::Command) -> &'static str {
    match c {
        crate::config::Command::Rollout(_) => "a rollout",
        crate::config::Command::Fetch(_) => "an artifact fetch",
        crate::config::Command::Pull(_) => "an image pull",
        crate::config::Command::Unreadable(_) => "an unreadable job",
        _ => "this command",
    }
}

impl SshTarget {
    /// [`ship_to`], remembered per connection: a revision already there is
    /// not asked about again.
    async fn ship_once(&self, conn: &Connection, key: &str, agent: &str, dir: &str, packed: &Packed) -> Result<String, End> {
        let k = (key.to_string(), format!("{dir}|{}", packed.sha256));
        if let Some(w) = self.shipped.lock().unwrap_or_else(|e| e.into_inner()).get(&k) {
            return Ok(w.clone());
        }
        let w = ship_to(conn, agent, dir, packed).await?;
        self.shipped.lock().unwrap_or_else(|e| e.into_inner()).insert(k, w.clone());
        Ok(w)
    }
}

/// Make a revision (or release) available on the host, once per content
/// hash; where it is there.
async fn ship_to(conn: &Connection, agent: &str, dir: &str, packed: &Packed) -> Result<String, End> {
    let sha = &packed.sha256;
    let blob = agent::BlobRequest { dir: dir.to_string(), sha256: sha.clone() };
    let has = exchange(conn, agent, "has", &blob, &[]).await?;
    if has.get("tree").and_then(|t| t.as_bool()) != Some(true) {
        if has.get("blob").and_then(|t| t.as_bool()) != Some(true) {
            let put = agent::PutRequest { dir: dir.to_string(), sha256: sha.clone(), size: packed.bytes.len() as u64 };
            exchange(conn, agent, "put", &put, &packed.bytes).await?;
        }
        let unpacked = exchange(conn, agent, "unpack", &blob, &[]).await?;
        return unpacked.get("path").and_then(|p| p.as_str()).map(str::to_string).ok_or_else(|| End::Failed("the agent did not say where it unpacked the revision".into()));
    }
    Ok(format!("{}/revisions/{sha}", dir.trim_end_matches('/')))
}

/// One request to the agent and its one-line JSON answer.
async fn exchange<R: serde::Serialize + ?Sized>(conn: &Connection, agent: &str, verb: &str, request: &R, body: &[u8]) -> Result<serde_json::Value, End> {
    let mut input = serde_json::to_vec(request).map_err(|e| End::Failed(e.to_string()))?;
    input.push(b'\n');
    input.extend_from_slice(body);
    let bound = if body.is_empty() { EXCHANGE } else { UPLOAD };
    let out = conn.output(&session::agent_command(agent, verb), &input, bound).await?;
    let answer: Option<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().rev().find_map(|l| serde_json::from_str(l).ok());
    match answer {
        Some(a) if a.get("error").is_none() && out.success() => Ok(a),
        Some(a) => Err(End::Failed(format!("the agent's {verb} failed: {}", a.get("error").and_then(|e| e.as_str()).unwrap_or("no reason")))),
        None => Err(End::Failed(format!("the agent's {verb} failed: {}", out.describe()))),
    }
}

/// Bytes from a host into lines of one stream, each marked with the host.
struct Splitter {
    stream: Stream,
    host: String,
    lines: super::LineCutter,
}

impl Splitter {
    fn new(stream: Stream, host: String) -> Self {
        Splitter { stream, host, lines: super::LineCutter::default() }
    }

    async fn feed(&mut self, bytes: &[u8], output: &OutputSink) {
        for (text, cut) in self.lines.feed(bytes) {
            self.send(text, cut, output).await;
        }
    }

    async fn flush(&mut self, output: &OutputSink) {
        if let Some(rest) = self.lines.finish() {
            self.send(rest, false, output).await;
        }
    }

    async fn send(&self, text: String, cut: bool, output: &OutputSink) {
        let _ = output.send(Line { stream: self.stream, text, part: Some(self.host.clone()), cut }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, outcome: Outcome, code: Option<i64>, reason: Option<&str>) -> PartResult {
        PartResult { part: name.into(), started_at: 0, finished_at: 1, outcome, exit_code: code, reason: reason.map(str::to_string) }
    }

    #[test]
    fn a_job_fails_when_more_hosts_fail_than_it_tolerates() {
        let parts = vec![
            part("a", Outcome::Succeeded, Some(0), None),
            part("b", Outcome::Failed, Some(3), Some("exit 3")),
            part("c", Outcome::Failed, None, Some("connection timed out after 3s")),
            part("d", Outcome::Skipped, None, Some("not run")),
        ];
        let r = summarize(parts.clone(), 2, 1, false, Duration::from_secs(60));
        assert_eq!(r.outcome, Outcome::Failed);
        let reason = r.reason.unwrap();
        assert!(reason.contains("2 of 4 hosts failed (max_failed 1): b (exit 3), c (connection timed out after 3s); 1 not run"), "{reason}");
        assert_eq!(r.exit_code, None, "the failed hosts disagree on an exit code");
        let r = summarize(parts[..3].to_vec(), 2, 2, false, Duration::from_secs(60));
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert!(r.reason.unwrap().contains("within max_failed 2"));
        let same = vec![part("a", Outcome::Failed, Some(3), None), part("b", Outcome::Failed, Some(3), None)];
        assert_eq!(summarize(same, 2, 0, false, Duration::from_secs(1)).exit_code, Some(3));
    }
}
