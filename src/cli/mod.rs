//! The `slipway` command line. `validate` and `plan` work on local
//! files; everything else is a client of a running `slipway serve`
//! through the HTTP API. Exit codes: [`exit`].

/// The process's log, for `slipway` and the tools built on the library:
/// to stderr, filtered by `SLIPWAY_LOG` (default `info,sqlx=warn`).
/// Whatever SLIPWAY_LOG asks, bollard stays at info: at debug it logs
/// request and response bodies, and those carry secrets (a container's
/// environment); so do the AWS SDK's crates (signing strings, bodies).
/// The AWS credential chain warns of every provider it tried on each call
/// without credentials: only its errors are logged (the call's own error
/// says what was missing).
pub fn init_logging(json: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    for directive in [
        "bollard=info",
        "aws_config=error",
        "aws_smithy_runtime=info",
        "aws_smithy_http_client=info",
        "aws_runtime=info",
        "aws_sigv4=info",
        "aws_sdk_ecs=info",
        "aws_sdk_ecr=info",
        "aws_sdk_sqs=info",
        // It logs each refused certificate at ERROR; the refusal is in the
        // error Slipway reports, with a hint, where it happened.
        "rustls_platform_verifier=off",
    ] {
        filter = filter.add_directive(directive.parse().expect("a constant, valid directive"));
    }
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        // One object per line: time, level, target, message and the
        // event's fields (deployment, job, environment, node…) at the top.
        fmt.json().flatten_event(true).with_current_span(false).with_span_list(false).init();
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}

/// How `serve` writes its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people (the default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

pub mod client;
pub mod exit;
mod gates;
mod progress;
pub mod serve;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::wire::*;
use crate::config::{self, ConfigErrors};
use crate::plan::{self, Selection};
use crate::store::{DeploymentState, JobState};
use client::{Client, ClientError};

#[derive(Debug, Parser)]
#[command(name = "slipway", version, about = "Slipway: continuous deployment in one binary", propagate_version = true)]
pub struct Cli {
    /// The config file, or the directory holding slipway.toml.
    #[arg(long, short = 'c', global = true, env = "SLIPWAY_CONFIG", default_value = ".")]
    pub config: PathBuf,
    /// The Slipway server the client commands talk to.
    #[arg(long, global = true, env = "SLIPWAY_SERVER", default_value = "http://127.0.0.1:7878")]
    pub server: String,
    /// PEM file of the certificate authorities the client trusts for an
    /// https --server, instead of the system's (a self-signed server's own
    /// certificate works too).
    #[arg(long, global = true, env = "SLIPWAY_CACERT", value_name = "PEM")]
    pub cacert: Option<PathBuf>,
    /// API token (once tokens exist, the API needs one).
    #[arg(long, global = true, env = "SLIPWAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the config and report every problem with file, line and column.
    Validate,
    /// The targets this Slipway deploys to (`target = "…"` in a
    /// `[[service]]`): what each can do and the keys it adds.
    Targets,
    /// Print a JSON Schema of `slipway.toml` for editors (taplo, Even
    /// Better TOML): every key, its type and what it is for.
    Schema,
    /// Print a shell completion script: `slipway completions bash >
    /// /etc/bash_completion.d/slipway` (zsh: into a directory of `$fpath`
    /// as `_slipway`; fish: `~/.config/fish/completions/slipway.fish`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (`slipway.1` and one per command, `slipway-deploy.1`
    /// …) into a directory, e.g. /usr/local/share/man/man1.
    Man {
        /// Where the pages go (made if missing).
        dir: PathBuf,
    },
    /// A target's side on a machine it deploys to, started there by
    /// Slipway itself over the target's own connection; not for people.
    #[command(hide = true)]
    Agent {
        kind: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show the job graph without running anything: order, parallel waves,
    /// critical path and estimated duration.
    Plan(PlanArgs),
    /// Run the daemon: scheduler, HTTP API, metrics.
    Serve(ServeArgs),
    /// Deploy a service at a version (runs the service's jobs and what they need).
    Deploy(DeployArgs),
    /// Run jobs by name (and what they need).
    Run(RunArgs),
    /// Return a service to the version it ran before (its rollout only).
    Rollback(RollbackArgs),
    /// API tokens: create (the token is printed once), list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log: every request that changed something (or tried to),
    /// newest first: when, who, from where, what, the answer.
    Audit {
        /// At most this many entries.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Why a service runs the version it runs and not the newest one seen:
    /// held (not opted in, filtered), queued behind a lock, rolled back…
    Why(WhyArgs),
    /// Deployments and their jobs.
    Status(StatusArgs),
    /// Output of a deployment's jobs; `-f` follows it live.
    Logs(LogsArgs),
    /// Cancel a deployment: queued ones never start, running jobs are stopped.
    Cancel { deployment: i64 },
    /// Approve a deployment waiting for an approval (needs the approver
    /// role for its environment). It starts once its other gates pass.
    Approve { deployment: i64 },
    /// Deploy the version a service runs in one environment to another
    /// (same digest); the target's gates (soak, approval, windows) apply.
    Promote {
        service: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
    /// Commits of an environment's config branch and what became of each
    /// (accepted and the jobs they ran, or rejected and why).
    Revisions {
        env: String,
        /// Fetch the branch now and decide on its head.
        #[arg(long)]
        check: bool,
    },
    /// List (or with --apply, remove) containers with Slipway's labels that
    /// no live Slipway holds, and images no environment runs or could roll
    /// back to. A dry run unless --apply.
    Gc(GcArgs),
    /// The hosts of `[[hosts]]` groups: reachable or why not, host key,
    /// drained, what runs on each; `drain HOST` / `undrain HOST` take a
    /// host out of service (no new deploys, no new connections) and back.
    Hosts {
        #[command(subcommand)]
        action: Option<HostsAction>,
    },
    /// Registry tag retention for services with `keep_tags`: per repository,
    /// the tags kept and why, and the older manifests nothing runs or could
    /// roll back to. A dry run unless --apply, which deletes them.
    Retention(GcArgs),
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[arg(long)]
    pub env: Option<String>,
    /// Plan one service's jobs.
    #[arg(long, conflicts_with = "jobs")]
    pub service: Option<String>,
    /// Plan these jobs (and what they need).
    #[arg(long, value_delimiter = ',')]
    pub jobs: Vec<String>,
    /// Graphviz output.
    #[arg(long, conflicts_with = "json")]
    pub dot: bool,
    /// Slots to estimate with (default: the config's parallelism, or 8).
    #[arg(long)]
    pub parallelism: Option<usize>,
    /// Store to read past durations from (default as for `serve`).
    #[arg(long, env = "SLIPWAY_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// With --to: the jobs a new commit of the environment's config
    /// branch runs (what changed from this commit or branch).
    #[arg(long, requires = "to", conflicts_with_all = ["service", "jobs", "dot"])]
    pub from: Option<String>,
    #[arg(long, requires = "from")]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: String,
    /// The log's format on stderr: text, or JSON (one object per line with
    /// the event's deployment, job, environment and node fields).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// sqlite://PATH or postgres://USER@HOST:PORT/DB (default: SQLite next to the config).
    #[arg(long, env = "SLIPWAY_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// Jobs this node runs at once.
    #[arg(long)]
    pub parallelism: Option<usize>,
    /// This node's id (default: host-pid-random).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Lease of claimed jobs and locks, e.g. "15s".
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lease: Option<Duration>,
    /// How often to look for work from other nodes and for expired leases.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    pub poll: Duration,
    /// On SIGTERM, how long running jobs may take to finish.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,
    /// Serve the API and the dashboard over HTTPS with this PEM certificate
    /// chain (the server's first); SIGHUP reloads it and the key.
    #[arg(long, env = "SLIPWAY_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "SLIPWAY_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    pub service: String,
    /// The version to deploy.
    #[arg(id = "artifact_version", value_name = "VERSION")]
    pub version: String,
    /// SHA-256 of the release tarball (services with an `artifact`).
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    #[command(flatten)]
    pub submit: SubmitArgs,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Remove what is listed (without it, nothing is touched).
    #[arg(long)]
    pub apply: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token. The first one must be `--role '*=admin'`, made on
    /// the Slipway host.
    Create {
        name: String,
        /// ENV=ROLE (or '*=ROLE' for every environment); ROLE is viewer,
        /// deployer, approver or admin. Repeatable.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Write the token into the store directly, not through the API:
        /// the way back in when no admin token is left. Needs what
        /// `serve` needs to open the store (its file, or its database URL).
        #[arg(long)]
        local: bool,
        /// With --local: the store, as `serve --store` (default: as `serve`
        /// finds it from the config).
        #[arg(long, env = "SLIPWAY_STORE", hide_env_values = true)]
        store: Option<String>,
    },
    List,
    Revoke {
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct WhyArgs {
    pub service: String,
    /// The environment (optional when the service runs in only one).
    #[arg(long)]
    pub env: Option<String>,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    pub service: String,
    /// The environment (optional when the service runs in only one).
    #[arg(long)]
    pub env: Option<String>,
    /// Return once the deployment is accepted instead of following it.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(required = true)]
    pub jobs: Vec<String>,
    #[command(flatten)]
    pub submit: SubmitArgs,
}

/// What `deploy` and `run` share.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The environment (optional when the config has only one).
    #[arg(long)]
    pub env: Option<String>,
    /// Idempotency key: the same request under it deploys once; another
    /// request under it is refused (exit 6).
    #[arg(long)]
    pub id: Option<String>,
    /// Return once the deployment is accepted instead of following it.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One deployment in detail; without it, the latest deployments.
    pub deployment: Option<i64>,
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    /// Only deployments in this state.
    #[arg(long)]
    pub state: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum HostsAction {
    /// Take a host out: rollouts pass it by, its proxies stop taking new
    /// connections (in-flight requests finish).
    Drain { host: String },
    /// Put a drained host back in service.
    Undrain { host: String },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub deployment: i64,
    pub job: Option<String>,
    /// Keep following until the deployment ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only the lines of this host (a job on a group of hosts): its name,
    /// or the first part of it ("web-2" for web-2.example.org).
    #[arg(long)]
    pub host: Option<String>,
}

/// An error the binary prints before exiting with `code`.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        CliError { code, message: message.into() }
    }
    pub fn config(e: ConfigErrors) -> Self {
        CliError::new(exit::INVALID_CONFIG, e.render(std::io::stderr().is_terminal()))
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        let mut message = e.to_string();
        if let ClientError::Api { problems, .. } = &e {
            for p in problems {
                match (p.line, p.column) {
                    (Some(l), Some(c)) => message.push_str(&format!("\n  {}:{l}:{c}: {}", p.file, p.message)),
                    _ => message.push_str(&format!("\n  {}: {}", p.file, p.message)),
                }
                if let Some(h) = &p.hint {
                    message.push_str(&format!("\n    hint: {h}"));
                }
            }
        }
        CliError::new(e.exit_code(), message)
    }
}

/// `slipway.1`, then `slipway-COMMAND.1` for each visible command.
fn man_pages(dir: &Path) -> Result<u8, CliError> {
    let io = |what: &Path, e: std::io::Error| CliError::new(exit::USAGE, format!("cannot write {}: {e}", what.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    // Global options (`--json`, `--server`…) reach each command's page.
    cmd.build();
    let mut written = 0;
    let mut page = |name: String, cmd: clap::Command| -> Result<(), CliError> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.display_name(name.clone())).render(&mut out).map_err(|e| io(&path, e))?;
        std::fs::write(&path, out).map_err(|e| io(&path, e))?;
        written += 1;
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(format!("slipway-{}", sub.get_name()), sub.clone())?;
    }
    page("slipway".into(), cmd)?;
    println!("{written} man pages in {}", dir.display());
    Ok(exit::OK)
}

/// A table for people: columns as wide as their widest cell (a version
/// with its digest, an ECS ARN), no borders, two spaces between columns,
/// never wrapped (a pipe gets whole lines). `right`: columns aligned right.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>, right: &[usize], indent: &str) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_content_arrangement(comfy_table::ContentArrangement::Disabled);
    t.set_header(headers.iter().copied());
    for r in rows {
        t.add_row(r);
    }
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, 2));
        if right.contains(&i) {
            col.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t.lines().map(|l| format!("{indent}{}\n", l.trim_end())).collect()
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn run(cli: Cli) -> Result<u8, CliError> {
    let roots = match &cli.cacert {
        Some(path) => Some(client::read_cacert(path).map_err(|e| CliError::new(exit::USAGE, e))?),
        None => None,
    };
    let client = Client::with_roots(&cli.server, cli.token.as_deref(), roots.as_deref());
    match cli.command {
        Command::Validate => validate(&cli.config, cli.json),
        Command::Targets => {
            targets_cmd(cli.json);
            Ok(exit::OK)
        }
        Command::Schema => {
            print_json(&crate::config::json_schema());
            Ok(exit::OK)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "slipway", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Man { dir } => man_pages(&dir),
        Command::Agent { kind, args } => match crate::targets::kind(&kind) {
            Some(k) => k.agent(args).await.map_err(|e| CliError::new(exit::USAGE, e)),
            None => Err(CliError::new(exit::USAGE, format!("no target {kind:?}"))),
        },
        Command::Plan(PlanArgs { env, from: Some(from), to: Some(to), parallelism, .. }) => {
            gates::plan_change(&cli.config, env, &from, &to, parallelism, cli.json).await
        }
        Command::Plan(a) => plan_cmd(&cli.config, a, cli.json).await,
        Command::Approve { deployment } => gates::approve(&client, deployment, cli.json).await,
        Command::Promote { service, from, to } => gates::promote(&client, &service, &from, &to, cli.json).await,
        Command::Revisions { env, check } => gates::revisions(&client, &env, check, cli.json).await,
        Command::Serve(a) => {
            serve::serve(serve::ServeOptions {
                config: cli.config,
                listen: a.listen,
                store: a.store,
                parallelism: a.parallelism,
                node_id: a.node_id,
                lease: a.lease,
                poll: a.poll,
                shutdown_grace: a.shutdown_grace,
                tls: a.tls_cert.zip(a.tls_key).map(|(cert, key)| crate::api::tls::TlsFiles { cert, key }),
            })
            .await
        }
        Command::Deploy(a) => {
            let req = EventRequest {
                kind: EventKind::Deploy,
                service: Some(a.service),
                version: Some(a.version),
                digest: a.sha256,
                jobs: vec![],
                image: None,
                environment: a.submit.env,
                id: a.submit.id,
            };
            submit(&client, req, a.submit.detach, cli.json).await
        }
        Command::Run(a) => {
            let req = EventRequest {
                kind: EventKind::Run,
                service: None,
                version: None,
                digest: None,
                jobs: a.jobs,
                image: None,
                environment: a.submit.env,
                id: a.submit.id,
            };
            submit(&client, req, a.submit.detach, cli.json).await
        }
        Command::Rollback(a) => rollback(&client, a, cli.json).await,
        Command::Why(a) => why(&client, a, cli.json).await,
        Command::Audit { limit } => audit(&client, limit, cli.json).await,
        Command::Token(TokenCommand::Create { name, roles, local: true, store }) => token_local(&cli.config, store.as_deref(), &name, &roles, cli.json).await,
        Command::Token(t) => token(&client, t, cli.json).await,
        Command::Status(a) => status(&client, a, cli.json).await,
        Command::Gc(a) => gc(&client, a, cli.json).await,
        Command::Hosts { action } => hosts(&client, action, cli.json).await,
        Command::Retention(a) => retention(&client, a, cli.json).await,
        Command::Logs(a) => logs(&client, a, cli.json).await,
        Command::Cancel { deployment } => {
            let d: Deployment = client.post_empty(&format!("/api/v1/deployments/{deployment}/cancel")).await?;
            if cli.json {
                print_json(&d);
            } else {
                println!(
                    "deployment {} {}",
                    d.id,
                    if d.state.is_terminal() { format!("is {}", d.state) } else { "is being cancelled: its running jobs are being stopped".into() }
                );
            }
            Ok(exit::OK)
        }
    }
}

/// Every registered target, from its kind: the same list the config's
/// key check and the docs use.
fn targets_cmd(json: bool) {
    let kinds = crate::targets::kinds();
    if json {
        let list: Vec<serde_json::Value> = kinds
            .iter()
            .map(|k| {
                let keys: Vec<serde_json::Value> =
                    k.service_keys().iter().map(|key| serde_json::json!({ "name": key.name, "type": key.kind, "doc": key.doc })).collect();
                serde_json::json!({ "name": k.name(), "about": k.about(), "default": k.name() == crate::targets::DEFAULT, "capabilities": k.capabilities(), "keys": keys })
            })
            .collect();
        print_json(&list);
        return;
    }
    for k in kinds {
        let c = k.capabilities();
        let can: Vec<&str> = [
            (c.runs_jobs, "runs jobs"),
            (c.runs_instances, "runs service instances"),
            (c.uses_images, "runs images (pinned by digest)"),
            (c.secret_files, "places secret files"),
            (c.own_rollout, "runs its own rollout"),
            (c.remote, "runs on other machines"),
            (c.proxied, "serves through Slipway's proxy"),
            (c.resumes_jobs, "resumes a cut-off job instead of running it twice"),
            (c.own_registry, "keeps images in a registry of its own (retention goes through it)"),
        ]
        .into_iter()
        .filter_map(|(yes, what)| yes.then_some(what))
        .collect();
        let default = if k.name() == crate::targets::DEFAULT { " (the default)" } else { "" };
        println!("{}{default}: {}", k.name(), k.about());
        println!("    can: {}", can.join(", "));
        for key in k.service_keys() {
            println!("    key {} ({}): {}", key.name, key.kind, key.doc);
        }
    }
}

fn validate(path: &std::path::Path, json: bool) -> Result<u8, CliError> {
    match config::load(path) {
        Ok(loaded) => {
            if json {
                print_json(&serde_json::json!({"valid": true, "file": loaded.path, "problems": []}));
            } else {
                let c = &loaded.config;
                println!(
                    "{}: valid ({} environment{}, {} service{}, {} job{})",
                    loaded.path.display(),
                    c.environment_names().len(),
                    if c.environment_names().len() == 1 { "" } else { "s" },
                    c.services.len(),
                    if c.services.len() == 1 { "" } else { "s" },
                    c.jobs.len(),
                    if c.jobs.len() == 1 { "" } else { "s" },
                );
            }
            Ok(exit::OK)
        }
        Err(e) if json => {
            print_json(&serde_json::json!({"valid": false, "file": e.file, "problems": e.reports()}));
            Ok(exit::INVALID_CONFIG)
        }
        Err(e) => Err(CliError::config(e)),
    }
}

async fn plan_cmd(path: &std::path::Path, a: PlanArgs, json: bool) -> Result<u8, CliError> {
    let loaded = config::load(path).map_err(CliError::config)?;
    let env = crate::submit::resolve_environment(&loaded.config, a.env.clone()).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let selection = match (&a.service, a.jobs.is_empty()) {
        (Some(s), _) => Selection::Service { service: s.clone() },
        (None, false) => Selection::Jobs { jobs: a.jobs.clone() },
        (None, true) => Selection::All,
    };
    // Past durations, if a store exists; planning never needs one.
    let url = serve::store_url(a.store.as_deref(), loaded.config.project.store.as_deref(), &loaded.dir);
    let sqlite_missing = url.strip_prefix("sqlite://").is_some_and(|p| !std::path::Path::new(p).exists());
    let (history, history_note) = if sqlite_missing {
        (Default::default(), None)
    } else {
        match tokio::time::timeout(Duration::from_secs(10), async {
            let store = crate::store::open(&url).await?;
            store.history(&env).await
        })
        .await
        {
            Ok(Ok(h)) => (h, None),
            Ok(Err(e)) => (Default::default(), Some(format!("note: no past durations ({e}); estimating from timeouts"))),
            Err(_) => (Default::default(), Some("note: the store did not answer in 10s; estimating from timeouts".to_string())),
        }
    };
    let parallelism = a.parallelism.or(loaded.config.project.parallelism).unwrap_or(8);
    let p = plan::build(&loaded.config, &env, &selection, parallelism, &history).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    if json {
        let mut v = serde_json::to_value(&p).unwrap_or_default();
        if let (Some(obj), Some(r)) = (v.as_object_mut(), plan_retention(&loaded.config, &url, sqlite_missing).await) {
            let r = match r {
                Ok(info) => serde_json::to_value(info).unwrap_or_default(),
                Err(note) => serde_json::json!({ "note": note }),
            };
            obj.insert("retention".into(), r);
        }
        print_json(&v);
    } else if a.dot {
        print!("{}", p.render_dot());
    } else {
        print!("{}", p.render_text());
        print!("{}", render_gates_and_checks(&loaded.config, &p));
        print!("{}", render_plan_retention(plan_retention(&loaded.config, &url, sqlite_missing).await, sqlite_missing));
        if let Some(n) = history_note {
            eprintln!("{n}");
        }
    }
    Ok(exit::OK)
}

/// What a deploy of this plan will wait at before it starts (the
/// environment's gates), and the checks after a rollout (`verify`).
fn render_gates_and_checks(config: &config::Config, p: &plan::Plan) -> String {
    let mut out = String::new();
    if let Some(env) = config.environment(&p.environment) {
        let mut gates = Vec::new();
        if env.approval {
            gates.push(format!("an approval by an approver of {} (not by whoever asked for it)", env.name));
        }
        if let Some(from) = &env.promote_from {
            let soak = if env.soak.is_zero() { String::new() } else { format!(", after it has run {} there", plan::format_duration(env.soak)) };
            gates.push(format!("versions come by promotion from {from}{soak}"));
        }
        if !env.windows.is_empty() {
            let w: Vec<&str> = env.windows.iter().map(|w| w.text.as_str()).collect();
            gates.push(format!("a deploy window: {} ({})", w.join(", "), env.timezone.name));
        }
        if !gates.is_empty() {
            out.push_str(&format!("\na deploy to {} waits for (not in the estimate):\n", env.name));
            for g in gates {
                out.push_str(&format!("  - {g}\n"));
            }
        }
    }
    let mut checks = Vec::new();
    for j in &p.jobs {
        let Some(service) = j.name.strip_suffix(".rollout") else { continue };
        if let Some(v) = config.services.iter().find(|s| s.name == service).and_then(|s| s.spec.as_ref()).and_then(|s| s.verify.as_ref()) {
            checks.push(format!("  - {}: then verify `{}` (within {}; failing rolls back)", j.name, v.command.join(" "), plan::format_duration(v.timeout)));
        }
    }
    if !checks.is_empty() {
        out.push_str("\nafter a rollout:\n");
        out.push_str(&checks.join("\n"));
        out.push('\n');
    }
    out
}

fn fmt_ms(ms: Option<i64>) -> String {
    ms.map(|m| plan::format_duration(Duration::from_millis(m.max(0) as u64))).unwrap_or_else(|| "-".into())
}

fn symbol(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "·",
        JobState::Ready => "…",
        JobState::Running => "▶",
        JobState::Succeeded => "✓",
        JobState::Failed => "✗",
        JobState::RolledBack => "↺",
        JobState::Skipped => "↷",
        JobState::Cancelled => "⊘",
    }
}

async fn submit(client: &Client, req: EventRequest, detach: bool, json: bool) -> Result<u8, CliError> {
    let accepted: EventAccepted = client.post("/api/v1/events", &req).await?;
    if !json {
        if accepted.duplicate {
            println!("event already seen: it created deployment {} (nothing new started)", accepted.deployment_id);
        } else {
            println!("deployment {} accepted (event {})", accepted.deployment_id, accepted.event_id);
        }
        for s in &accepted.superseded {
            println!("  deployment {s} (still queued) is superseded by {}", accepted.deployment_id);
        }
    }
    if detach {
        if json {
            print_json(&accepted);
        }
        return Ok(exit::OK);
    }
    follow(client, accepted.deployment_id, json).await
}

/// Live progress until the deployment ends (see [`progress`]): job starts
/// and ends, the rollout's steps, then the deployment's last line.
async fn follow(client: &Client, mut id: i64, json: bool) -> Result<u8, CliError> {
    let mut seen: std::collections::HashMap<String, (JobState, i64)> = Default::default();
    let mut last_state = None;
    let mut last_reason: Option<String> = None;
    let mut failures = 0;
    let mut shown_to: std::collections::HashMap<String, i64> = Default::default();
    let mut display = if json { None } else { Some(progress::Display::new()) };
    // Long polls: the server answers as soon as the deployment changes (or
    // after FOLLOW_WAIT); asked at most every FOLLOW_EVERY, so a graph of
    // many quick jobs is not read hundreds of times a second.
    let mut after: Option<u64> = None;
    let now = tokio::time::Instant::now();
    let mut asked = now.checked_sub(FOLLOW_EVERY).unwrap_or(now);
    loop {
        let path = match after {
            Some(seq) => format!("/api/v1/deployments/{id}?wait_ms={}&after={seq}", FOLLOW_WAIT.as_millis()),
            None => format!("/api/v1/deployments/{id}"),
        };
        tokio::time::sleep_until(asked + FOLLOW_EVERY).await;
        asked = tokio::time::Instant::now();
        let detail: DeploymentDetail = match client.get::<DeploymentDetail>(&path).await {
            Ok(d) => {
                failures = 0;
                after = Some(d.seq);
                d
            }
            Err(ClientError::Unreachable { .. }) if failures < 20 => {
                // The server may be restarting; the deployment is durable.
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let d = &detail.deployment;
        if let Some(out) = display.as_mut() {
            // The end is said once, after every job's lines (below).
            if last_state != Some(d.state) && !d.state.is_terminal() {
                out.line(&format!(
                    "deployment {id}: {}{}",
                    d.state,
                    if d.state == DeploymentState::Running { format!(" (revision {})", config::revision::short(&d.revision)) } else { String::new() }
                ));
                if d.state == DeploymentState::Waiting {
                    // A gate may hold it for hours: say that leaving is safe.
                    out.line("  it starts by itself once its gates pass; Ctrl-C stops following, not the deployment (or use --detach)");
                }
                last_state = Some(d.state);
            }
            // What a waiting deployment waits for changes as gates pass
            // (approved, now only the window…): show each change.
            if d.state == DeploymentState::Waiting && d.reason != last_reason {
                if let Some(r) = &d.reason {
                    out.line(&format!("  {r}"));
                }
                last_reason = d.reason.clone();
            }
            // The last output is flushed shortly after a job ends: one more
            // read of the log once the deployment is over (only where a
            // job's log is shown).
            if d.state.is_terminal() && detail.jobs.iter().any(|j| progress::shows_log(&j.name)) {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let mut said = progress::job_events(&mut seen, &detail, symbol);
            said.extend(rollout_steps(client, id, &detail, &mut shown_to).await);
            for s in &progress::in_order(said) {
                out.say(s);
            }
        }
        // Submitted again on a newer config while it waited (or replaced
        // by the same request): the deployment the caller asked for goes
        // on under the new id, so follow that one.
        if d.state == DeploymentState::Superseded
            && let Some(next) = d.superseded_by
        {
            let n = match client.get::<DeploymentDetail>(&format!("/api/v1/deployments/{next}")).await {
                Ok(n) => Some(n),
                Err(ClientError::Unreachable { .. }) if failures < 20 => {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) => None,
            };
            if n.is_some_and(|n| same_request(&detail, &n)) {
                if let Some(out) = display.as_ref() {
                    out.line(&format!("deployment {id}: {}; following deployment {next}", d.reason.as_deref().unwrap_or("superseded")));
                }
                id = next;
                after = None;
                seen.clear();
                shown_to.clear();
                last_state = None;
                last_reason = None;
                continue;
            }
        }
        if d.state.is_terminal() {
            match display.as_mut() {
                None => print_json(&detail),
                Some(out) => {
                    out.finish();
                    let done = detail.jobs.iter().filter(|j| j.state == JobState::Succeeded).count();
                    out.line(&format!(
                        "deployment {id} {} in {}: {done}/{} jobs succeeded{}",
                        d.state,
                        fmt_ms(d.duration_ms),
                        detail.jobs.len(),
                        d.reason.as_deref().map(|r| format!("\n  reason: {r}")).unwrap_or_default()
                    ));
                    if d.state != DeploymentState::Succeeded {
                        println!("  see the output with: slipway logs {id}");
                    }
                }
            }
            return Ok(if d.state == DeploymentState::Succeeded { exit::OK } else { exit::DEPLOYMENT_FAILED });
        }
    }
}

/// How long `follow` lets the server hold a read until the deployment
/// changes: also how late it sees what another node did.
const FOLLOW_WAIT: Duration = Duration::from_millis(500);
/// At most one read of a followed deployment this often.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// New lines of the deployment's rollout jobs (instances started, health,
/// traffic, draining), after what was shown of each. A failed read shows
/// nothing this time; the next look tries again.
async fn rollout_steps(client: &Client, id: i64, detail: &DeploymentDetail, shown_to: &mut std::collections::HashMap<String, i64>) -> Vec<progress::Said> {
    let mut out = Vec::new();
    for j in detail.jobs.iter().filter(|j| progress::shows_log(&j.name) && j.started_at.is_some()) {
        let after = shown_to.get(&j.name).copied().unwrap_or(0);
        let path = format!("/api/v1/deployments/{id}/logs?job={}&after={after}", j.name);
        let Ok(lines) = client.get::<Vec<LogLine>>(&path).await else { continue };
        for l in &lines {
            shown_to.insert(j.name.clone(), l.seq);
            // The engine's own note of the attempt's end repeats the job's
            // end line.
            if !l.line.starts_with("[slipway]") {
                out.push(progress::log_event(l));
            }
        }
    }
    out
}

/// Whether `next` carries on what `d` asked for: the same kind of
/// deployment of the same thing (version, or jobs) in the same environment
/// (a newer version superseding it is not).
fn same_request(d: &DeploymentDetail, next: &DeploymentDetail) -> bool {
    let jobs = |x: &DeploymentDetail| x.jobs.iter().map(|j| j.name.clone()).collect::<std::collections::BTreeSet<_>>();
    let (a, b) = (&d.deployment, &next.deployment);
    (a.kind, &a.environment, &a.service, &a.version) == (b.kind, &b.environment, &b.service, &b.version) && (a.service.is_some() || jobs(d) == jobs(next))
}

/// The environment a service command means: the one given, or the only
/// one the service has a recorded version in.
async fn service_env(client: &Client, service: &str, env: Option<String>) -> Result<String, CliError> {
    if let Some(e) = env {
        return Ok(e);
    }
    let services: Vec<ServiceInfo> = client.get("/api/v1/services").await?;
    let envs: Vec<String> = services.into_iter().filter(|s| s.service == service).map(|s| s.environment).collect();
    match envs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CliError::new(exit::NOT_FOUND, format!("service {service:?} has no recorded version in any environment; say which with --env"))),
        many => Err(CliError::new(exit::USAGE, format!("service {service:?} runs in {}; say which with --env", many.join(", ")))),
    }
}

/// `--role ENV=ROLE` flags as the API's `roles` object.
fn role_map(roles: &[String]) -> Result<serde_json::Map<String, serde_json::Value>, CliError> {
    let mut map = serde_json::Map::new();
    for r in roles {
        let Some((env, role)) = r.split_once('=') else {
            return Err(CliError::new(exit::USAGE, format!("--role {r:?}: write ENV=ROLE, e.g. staging=deployer or '*=viewer'")));
        };
        map.insert(env.to_string(), serde_json::Value::String(role.to_string()));
    }
    Ok(map)
}

/// `token create --local`: the token goes into the store directly, found
/// as `serve` finds it. Whoever can open the store (its file, or its
/// database with the URL's credentials) can already change anything in
/// it, so this grants nothing new; it is the way back in when every
/// admin token is gone, and it never goes through the network's API.
async fn token_local(config_path: &std::path::Path, store: Option<&str>, name: &str, roles: &[String], json: bool) -> Result<u8, CliError> {
    use crate::api::auth::{self, Role};
    let map = role_map(roles)?;
    let roles: std::collections::BTreeMap<String, Role> = serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| CliError::new(exit::USAGE, format!("--role: {e} (roles are viewer, deployer, approver or admin)")))?;
    if !config::valid_name(name) {
        return Err(CliError::new(exit::REJECTED, format!("invalid token name {name:?}")));
    }
    if roles.keys().any(|e| e != "*" && !config::valid_name(e)) {
        return Err(CliError::new(exit::REJECTED, "a token needs roles: environment (or \"*\") → viewer, deployer, approver or admin"));
    }
    let loaded = config::load(config_path).map_err(CliError::config)?;
    auth::check_roles(&roles, &loaded.config.environment_names()).map_err(|e| CliError::new(exit::REJECTED, e))?;
    let url = serve::store_url(store, loaded.config.project.store.as_deref(), &loaded.dir);
    let redacted = crate::store::sql::redact_url(&url);
    // Opening a SQLite URL creates the file: a mistyped path would get a
    // token in a new, empty store that no server reads.
    if let Some(path) = url.strip_prefix("sqlite://")
        && !std::path::Path::new(path).exists()
    {
        return Err(CliError::new(
            exit::UNAVAILABLE,
            format!("no store at {path}: is this the store `slipway serve` uses? (--config, or --store / SLIPWAY_STORE as given to serve)"),
        ));
    }
    let store = crate::store::open(&url).await.map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    let tokens = store.tokens().await.map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    // As for the API's first token: a store must keep a live admin for
    // "*", or the API would refuse everyone.
    if !auth::is_root_admin(&roles) && !tokens.iter().any(|t| t.is_root_admin()) {
        return Err(CliError::new(
            exit::REJECTED,
            format!("{redacted} has no live admin token for every environment: make one first (--role '*=admin'), or the API stays closed to everyone"),
        ));
    }
    let token = auth::generate();
    let row = crate::store::TokenRow {
        name: name.to_string(),
        hash: auth::hash(&token),
        roles: serde_json::to_string(&roles).unwrap_or_default(),
        created_at: crate::store::now_ms(),
        revoked_at: None,
    };
    if !store.create_token(row).await.map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))? {
        return Err(CliError::new(exit::REJECTED, format!("a token named {name:?} exists in {redacted} (revoked ones keep their name): pick another name")));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = std::env::var("USER").unwrap_or_else(|_| format!("uid {}", unsafe { libc::geteuid() }));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "this host".into());
    let entry = crate::store::AuditEntry {
        id: 0,
        at: crate::store::now_ms(),
        actor: format!("{user} on {host}, with the store (token create --local)"),
        address: "local".into(),
        action: "token create --local".into(),
        detail: format!("create token {name} with roles {}", serde_json::to_string(&roles).unwrap_or_default()),
        status: 201,
        environment: None,
    };
    // The token exists now; a failed audit row must not hide it.
    if let Err(e) = store.record_audit(entry).await {
        eprintln!("slipway: warning: the token was created, but the audit log could not record it: {e}");
    }
    if json {
        print_json(&TokenCreated { name: name.to_string(), token, roles });
    } else {
        println!("token {name} created in {redacted}; it is shown only now:\n{token}");
    }
    Ok(exit::OK)
}

async fn token(client: &Client, t: TokenCommand, json: bool) -> Result<u8, CliError> {
    match t {
        TokenCommand::Create { name, roles, .. } => {
            let map = role_map(&roles)?;
            let created: TokenCreated = client.post("/api/v1/tokens", &serde_json::json!({ "name": name, "roles": map })).await?;
            if json {
                print_json(&created);
            } else {
                println!("token {} created; it is shown only now:\n{}", created.name, created.token);
            }
        }
        TokenCommand::List => {
            let tokens: Vec<TokenInfo> = client.get("/api/v1/tokens").await?;
            if json {
                print_json(&tokens);
            } else {
                let rows = tokens
                    .iter()
                    .map(|t| {
                        let roles: Vec<String> = t
                            .roles
                            .iter()
                            .map(|(e, r)| format!("{e}={}", serde_json::to_value(r).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()))
                            .collect();
                        vec![t.name.clone(), roles.join(","), if t.revoked_at.is_some() { "revoked" } else { "live" }.to_string()]
                    })
                    .collect();
                print!("{}", table(&["NAME", "ROLES", "STATE"], rows, &[], ""));
            }
        }
        TokenCommand::Revoke { name } => {
            let _: serde_json::Value = client.delete(&format!("/api/v1/tokens/{name}")).await?;
            if !json {
                println!("token {name} revoked");
            }
        }
    }
    Ok(exit::OK)
}

async fn audit(client: &Client, limit: i64, json: bool) -> Result<u8, CliError> {
    let entries: Vec<AuditInfo> = client.get(&format!("/api/v1/audit?limit={}", limit.clamp(1, 1000))).await?;
    if json {
        print_json(&entries);
        return Ok(exit::OK);
    }
    if entries.is_empty() {
        println!("the audit log is empty");
    }
    for e in &entries {
        let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at.max(0) as u64));
        println!("{at}  {:<22} {:<15} {} {}  {}", e.actor, e.address, e.status, e.action, e.detail);
    }
    Ok(exit::OK)
}

async fn why(client: &Client, a: WhyArgs, json: bool) -> Result<u8, CliError> {
    let env = service_env(client, &a.service, a.env).await?;
    let w: WhyInfo = client.get(&format!("/api/v1/services/{env}/{}/why", a.service)).await?;
    if json {
        print_json(&w);
        return Ok(exit::OK);
    }
    println!("{}", w.verdict);
    if !w.history.is_empty() {
        println!("\nversions seen in {env}, newest first:");
        for h in &w.history {
            println!("  {h}");
        }
    }
    Ok(exit::OK)
}

async fn rollback(client: &Client, a: RollbackArgs, json: bool) -> Result<u8, CliError> {
    let env = service_env(client, &a.service, a.env).await?;
    let accepted: EventAccepted = client.post_empty(&format!("/api/v1/services/{env}/{}/rollback", a.service)).await?;
    if !json {
        println!("rollback of {} in {env}: deployment {} accepted", a.service, accepted.deployment_id);
    }
    if a.detach {
        if json {
            print_json(&accepted);
        }
        return Ok(exit::OK);
    }
    follow(client, accepted.deployment_id, json).await
}

/// Services per environment: version, instances, health, last deployment.
fn print_services(services: &[ServiceInfo]) {
    if services.is_empty() {
        return;
    }
    let mut rows = Vec::new();
    for s in services {
        let up = s.instances.iter().filter(|i| i.running).count();
        let last = s.last_deployment.as_ref().map(|d| format!("#{} {} {}", d.id, d.version.as_deref().unwrap_or("-"), d.state)).unwrap_or_else(|| "-".into());
        rows.push(vec![
            s.environment.clone(),
            s.service.clone(),
            match &s.digest {
                Some(d) => format!("{} ({})", s.version, &d[..d.len().min(19)]),
                None => s.version.clone(),
            },
            s.previous_version.clone().unwrap_or_else(|| "-".into()),
            s.listen.clone().unwrap_or_else(|| if s.runs.is_some() { "-" } else { "(other node)" }.into()),
            format!("{up}/{}", s.instances.len()),
            format!("{last}{}", if s.restarts > 0 { format!("  ({} restarts)", s.restarts) } else { String::new() }),
        ]);
        // What the target itself runs (an ECS task definition), under it.
        if let Some(runs) = &s.runs {
            rows.push(vec![String::new(), format!("runs {runs}")]);
        }
    }
    print!("{}", table(&["ENV", "SERVICE", "VERSION", "PREVIOUS", "LISTEN", "INSTANCES", "LAST DEPLOYMENT"], rows, &[], ""));
    println!();
}

async fn gc(client: &Client, a: GcArgs, json: bool) -> Result<u8, CliError> {
    let g: GarbageInfo = if a.apply { client.post_empty("/api/v1/gc").await? } else { client.get("/api/v1/gc").await? };
    if json {
        print_json(&g);
        return Ok(exit::OK);
    }
    for n in &g.notes {
        println!("note: {n}");
    }
    if g.containers.is_empty() && g.images.is_empty() {
        println!("nothing to collect");
        return Ok(exit::OK);
    }
    let verb = if g.applied { "removed" } else { "would remove" };
    for c in &g.containers {
        println!("{verb} container {}: {}", short(&c.id), c.what);
    }
    for i in &g.images {
        println!("{verb} image {}: {}", short(i.id.trim_start_matches("sha256:")), i.what);
    }
    if !g.applied {
        println!("(dry run: `slipway gc --apply` removes them)");
    }
    Ok(exit::OK)
}

async fn retention(client: &Client, a: GcArgs, json: bool) -> Result<u8, CliError> {
    let r: RetentionInfo = if a.apply { client.post_empty("/api/v1/retention").await? } else { client.get("/api/v1/retention").await? };
    if json {
        print_json(&r);
    } else {
        print!("{}", render_retention(&r));
        if r.repositories.is_empty() {
            println!("no service sets keep_tags: nothing to do");
        } else if !r.applied && r.repositories.iter().any(|x| !x.delete.is_empty()) {
            println!("(dry run: `slipway retention --apply` deletes them)");
        }
    }
    // A registry that could not be asked (or refused) is a failure to report.
    Ok(if r.repositories.iter().any(|x| !x.errors.is_empty()) { exit::UNAVAILABLE } else { exit::OK })
}

/// Per repository: what stays and why, what goes.
fn render_retention(r: &RetentionInfo) -> String {
    let mut out = String::new();
    for repo in &r.repositories {
        out.push_str(&format!("{} (keep_tags = {}; {}):\n", repo.image, repo.keep_tags, repo.services.join(", ")));
        for e in &repo.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
        for k in &repo.kept {
            out.push_str(&format!("  keep          {:<20} {}\n", k.tag, k.reasons.join("; ")));
        }
        for d in &repo.delete {
            let verb = match (r.applied, d.deleted) {
                (false, _) => "would delete ",
                (true, true) => "deleted      ",
                (true, false) => "not deleted  ",
            };
            out.push_str(&format!("  {verb} {:<20} {}\n", d.tags.join(", "), short_digest(&d.digest)));
        }
        if repo.errors.is_empty() && repo.kept.is_empty() && repo.delete.is_empty() {
            out.push_str("  no tags\n");
        }
    }
    out
}

fn short_digest(d: &str) -> String {
    format!("sha256:{}", short(d.trim_start_matches("sha256:")))
}

/// `plan`'s retention section: the dry run against what the store
/// records. None without `keep_tags` anywhere. Never fails the plan: an
/// unreachable store or registry is a note (per repository, for a
/// registry).
async fn plan_retention(config: &config::Config, store_url: &str, sqlite_missing: bool) -> Option<Result<RetentionInfo, String>> {
    if crate::retention::policies(config).is_empty() {
        return None;
    }
    let (rows, deployments) = if sqlite_missing {
        (vec![], vec![])
    } else {
        let read = async {
            let store = crate::store::open(store_url).await?;
            Ok::<_, crate::store::StoreError>((store.services().await?, crate::retention::in_flight(store.as_ref()).await?))
        };
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Some(Err(format!("the store cannot say what runs ({e}): not planned"))),
            Err(_) => return Some(Err("the store did not answer in 10s: not planned".into())),
        }
    };
    // Images in a target's own registry (ECR) are listed through that
    // target, built here as a node would build it.
    let targets = crate::targets::Targets::new(crate::targets::NodeContext::default());
    Some(match tokio::time::timeout(Duration::from_secs(60), crate::retention::dry_run(config, &rows, &deployments, &targets)).await {
        Ok(report) => Ok(RetentionInfo::from(report)),
        Err(_) => Err("the registries did not answer within 60s: not planned".into()),
    })
}

fn render_plan_retention(r: Option<Result<RetentionInfo, String>>, sqlite_missing: bool) -> String {
    let Some(r) = r else { return String::new() };
    let mut out = String::from("\nretention (dry run; `slipway retention --apply` deletes):\n");
    if sqlite_missing {
        out.push_str("  note: no store yet: nothing is recorded as running\n");
    }
    match r {
        Err(note) => out.push_str(&format!("  {note}\n")),
        Ok(info) => {
            for repo in &info.repositories {
                if let Some(e) = repo.errors.first() {
                    // One line: the plan is about the jobs; this is a note.
                    out.push_str(&format!("  {}: not planned: {e}\n", repo.image));
                }
            }
            let ok = RetentionInfo { applied: false, repositories: info.repositories.into_iter().filter(|r| r.errors.is_empty()).collect() };
            for line in render_retention(&ok).lines() {
                out.push_str(&format!("  {line}\n"));
            }
        }
    }
    out
}

/// The first 12 characters of an id (as `docker ps` shows them).
fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// Orphaned containers, for `status`: only asked where services pinned
/// to an image digest are recorded, and quietly skipped when the node
/// cannot say.
async fn orphans(client: &Client, services: &[ServiceInfo]) -> Vec<GarbageItemInfo> {
    if !services.iter().any(|s| s.digest.is_some()) {
        return vec![];
    }
    // A side note of `status`: a slow Engine must not hold the rest up.
    match tokio::time::timeout(Duration::from_secs(5), client.get::<GarbageInfo>("/api/v1/gc")).await {
        Ok(Ok(g)) => g.containers,
        _ => vec![],
    }
}

async fn status(client: &Client, a: StatusArgs, json: bool) -> Result<u8, CliError> {
    let Some(id) = a.deployment else {
        let services: Vec<ServiceInfo> = client.get("/api/v1/services").await?;
        let orphans = orphans(client, &services).await;
        let mut path = format!("/api/v1/deployments?limit={}", a.limit);
        if let Some(s) = &a.state {
            path.push_str(&format!("&state={s}"));
        }
        let list: Vec<Deployment> = client.get(&path).await?;
        if json {
            let approvals: Vec<crate::api::wire::ApprovalInfo> = client.get("/api/v1/approvals").await?;
            print_json(&serde_json::json!({ "services": services, "orphans": orphans, "waiting": approvals, "deployments": list }));
            return Ok(exit::OK);
        }
        print_services(&services);
        gates::print_gates(client).await?;
        if !orphans.is_empty() {
            println!("orphaned containers (no live Slipway holds them; `slipway gc --apply` removes them):");
            for o in &orphans {
                println!("  {} {}", short(&o.id), o.what);
            }
            println!();
        }
        if list.is_empty() {
            println!("no deployments yet");
        }
        // A rollback, a promotion or a config change is named as such.
        let kind = |d: &Deployment| match d.cause.as_deref() {
            Some(c) if c.starts_with("promotion") => "promote".to_string(),
            Some("config change") => "config".to_string(),
            Some(c) => c.to_string(),
            None => d.kind.as_str().to_string(),
        };
        let rows = list
            .iter()
            .map(|d| {
                let what = match (&d.service, &d.version) {
                    (Some(s), Some(v)) => format!("{s}@{v}"),
                    _ => "-".into(),
                };
                vec![
                    d.id.to_string(),
                    d.state.as_str().into(),
                    kind(d),
                    d.environment.clone(),
                    what,
                    fmt_ms(d.duration_ms),
                    d.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        print!("{}", table(&["ID", "STATE", "KIND", "ENV", "SERVICE@VERSION", "DURATION", "REASON"], rows, &[0, 5], ""));
        return Ok(exit::OK);
    };
    let detail: DeploymentDetail = client.get(&format!("/api/v1/deployments/{id}")).await?;
    if json {
        print_json(&detail);
        return Ok(exit::OK);
    }
    let d = &detail.deployment;
    println!("deployment {}: {} ({})", d.id, d.state, d.cause.as_deref().unwrap_or(d.kind.as_str()));
    println!("  environment: {}", d.environment);
    if let (Some(s), Some(v)) = (&d.service, &d.version) {
        println!("  service:     {s} {v}");
    }
    println!("  revision:    {}", d.revision);
    println!("  duration:    {}", fmt_ms(d.duration_ms));
    if let Some(r) = &d.reason {
        println!("  reason:      {r}");
    }
    if let Some(s) = d.superseded_by {
        println!("  superseded by deployment {s}");
    }
    println!();
    let rows = detail
        .jobs
        .iter()
        .map(|j| {
            vec![
                format!("{} {}", symbol(j.state), j.name),
                j.state.as_str().into(),
                j.attempt.to_string(),
                fmt_ms(j.duration_ms),
                j.reason.clone().or(j.node.clone()).unwrap_or_default(),
            ]
        })
        .collect();
    print!("{}", table(&["  JOB", "STATE", "ATTEMPT", "DURATION", "NODE / REASON"], rows, &[2, 3], "  "));
    // Jobs on hosts: each host of each job's last attempt.
    for j in &detail.jobs {
        let Some(last) = detail.attempts.iter().rev().find(|a| a.job == j.name && !a.hosts.is_empty()) else { continue };
        println!("\n  {} attempt {} on {} hosts:", j.name, last.attempt, last.hosts.len());
        for h in &last.hosts {
            let exit = h.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            println!(
                "    {:<24} {:<11} exit {:>3} {:>9}  {}",
                h.host,
                h.outcome.as_str(),
                exit,
                fmt_ms(Some(h.duration_ms)),
                h.reason.clone().unwrap_or_default()
            );
        }
    }
    let retried: Vec<&Attempt> = detail.attempts.iter().filter(|a| a.outcome != crate::store::Outcome::Succeeded).collect();
    if !retried.is_empty() {
        println!("\n  failed or interrupted attempts:");
        for a in retried {
            println!("    {} attempt {} on {}: {} {}", a.job, a.attempt, a.node, a.outcome.as_str(), a.reason.clone().unwrap_or_default());
        }
    }
    Ok(exit::OK)
}

/// Whether `host` (as `--host` wrote it) names the line's host.
fn host_matches(line: Option<&str>, host: &str) -> bool {
    line.is_some_and(|l| l == host || l.split('.').next() == Some(host))
}

async fn logs(client: &Client, a: LogsArgs, json: bool) -> Result<u8, CliError> {
    let only = a.host.clone();
    let print = |l: &LogLine| {
        if let Some(h) = &only
            && !host_matches(l.host.as_deref(), h)
        {
            return;
        }
        if json {
            println!("{}", serde_json::to_string(l).unwrap_or_default());
        } else {
            let secs = l.ts / 1000;
            let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
            match &l.host {
                Some(host) => println!("{h:02}:{m:02}:{s:02}.{:03} {} [{host}] {}: {}", l.ts % 1000, l.job, l.stream, l.line),
                None => println!("{h:02}:{m:02}:{s:02}.{:03} {} {}: {}", l.ts % 1000, l.job, l.stream, l.line),
            }
        }
    };
    if a.follow {
        let d = client.follow_logs(a.deployment, a.job.as_deref(), print).await?;
        if !json {
            eprintln!("deployment {} {}", d.id, d.state);
        }
        return Ok(if d.state == DeploymentState::Succeeded { exit::OK } else { exit::DEPLOYMENT_FAILED });
    }
    let mut after = 0;
    loop {
        let mut path = format!("/api/v1/deployments/{}/logs?after={after}&limit=5000", a.deployment);
        if let Some(j) = &a.job {
            path.push_str(&format!("&job={j}"));
        }
        let lines: Vec<LogLine> = client.get(&path).await?;
        for l in &lines {
            print(l);
        }
        match lines.last() {
            Some(l) if lines.len() == 5000 => after = l.seq,
            _ => break,
        }
    }
    Ok(exit::OK)
}

async fn hosts(client: &Client, action: Option<HostsAction>, json: bool) -> Result<u8, CliError> {
    let (host, verb) = match action {
        None => {
            let hosts: Vec<crate::api::wire::HostInfo> = client.get("/api/v1/hosts").await?;
            // Exit 4 while a host does not answer, whatever the format.
            let code = if hosts.iter().all(|h| h.reachable) { exit::OK } else { exit::UNAVAILABLE };
            if json {
                print_json(&hosts);
                return Ok(code);
            }
            if hosts.is_empty() {
                println!("no [[hosts]] groups in the config");
                return Ok(exit::OK);
            }
            let mut rows = Vec::new();
            for h in &hosts {
                let state = if !h.reachable {
                    "down"
                } else if h.drained {
                    "drained"
                } else {
                    "up"
                };
                let key = h.fingerprint.clone().or(h.error.clone()).unwrap_or_default();
                let runs = h
                    .services
                    .iter()
                    .map(|s| format!("{}/{} {} ({}/{})", s.environment, s.service, s.version, s.healthy, s.instances))
                    .collect::<Vec<_>>()
                    .join(", ");
                // A host with a name of its own shows where it is too.
                let host = if h.address.starts_with(&format!("{}:", h.name)) || h.address.starts_with(&format!("[{}]:", h.name)) {
                    h.name.clone()
                } else {
                    format!("{} ({})", h.name, h.address)
                };
                rows.push(vec![h.group.clone(), host, state.to_string(), key, if runs.is_empty() { "-".into() } else { runs }]);
            }
            print!("{}", table(&["GROUP", "HOST", "STATE", "HOST KEY / WHY", "RUNS"], rows, &[], ""));
            return Ok(code);
        }
        Some(HostsAction::Drain { host }) => (host, "drain"),
        Some(HostsAction::Undrain { host }) => (host, "undrain"),
    };
    let done: crate::api::wire::HostDrained = client.post_empty(&format!("/api/v1/hosts/{host}/{verb}")).await?;
    if json {
        print_json(&done);
    } else {
        println!("{}", done.message);
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod table_tests {
    use super::table;

    // Issue 18: a version that carries a digest widened its column past
    // the padding and pushed the rest of its row out of line.
    #[test]
    fn issue18_columns_stay_aligned_with_a_long_version() {
        let rows = vec![
            vec!["staging".into(), "web".into(), "1.4.0 (sha256:0123456789abcdef012)".into(), "2/2".into()],
            vec!["production".into(), "api".into(), "1.3".into(), "1/1".into()],
        ];
        let out = table(&["ENV", "SERVICE", "VERSION", "INSTANCES"], rows, &[], "");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        for col in ["SERVICE", "VERSION", "INSTANCES"] {
            let at = lines[0].find(col).expect(col);
            let starts: Vec<char> = lines[1..].iter().map(|l| l.chars().nth(at).unwrap_or(' ')).collect();
            assert!(starts.iter().all(|c| !c.is_whitespace()), "{col} does not line up:\n{out}");
            assert!(lines[1..].iter().all(|l| l.chars().nth(at - 1) == Some(' ')), "{col} does not line up:\n{out}");
        }
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "no trailing spaces:\n{out}");
    }
}
