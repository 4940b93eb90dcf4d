//! Slipway: a continuous deployment engine.
//!
//! # Layout
//!
//! - [`config`]: `slipway.toml` — parsing, validation with source spans, revisions.
//! - [`process`]: this Slipway process on its host — owner marks, installation, argv filling for node-side commands.
//! - [`plan`]: from config to the job graph of a deployment (no IO).
//! - [`store`]: the durable state behind the [`store::Store`] trait (SQLite, PostgreSQL).
//! - [`node`]: one node — scheduler, API, gate loop and event consumers started, and stopped, together.
//! - [`events`]: a node's event bus — the scheduler, submitter and API emit; the log writer, metrics, server log and notifier consume.
//! - [`scheduler`]: a node's loop — claims jobs with leases, runs them, reports events.
//! - [`executor`]: between the scheduler and the targets — routes each job by its command and its spec's target.
//! - [`targets`]: where jobs and service instances run, behind the [`targets::Target`] trait; one folder and one registration line per target.
//! - [`git`]: an environment's config repository, mirrored and read with the system `git`.
//! - [`gate`]: approvals, soak times, deploy windows and promotions between environments.
//! - [`retention`]: registry tag retention — keep the newest N tags, delete older ones nothing runs or could roll back to.
//! - [`notify`]: outgoing webhooks about deployments, a consumer of the scheduler's events.
//! - [`why`]: why a service runs the version it runs, from the record alone (no IO).
//! - [`trigger`]: events from outside (GitHub and registry webhooks, published events) read, checked and decided into deployments.
//! - [`service`]: managed services — rollouts behind health checks, the proxy, rollback, supervision.
//! - [`api`]: the HTTP API, `/metrics`, `/healthz`; the only place wire types are serialized.
//! - [`ui`]: the dashboard at `/` — a page, a stylesheet and a script embedded in the binary, using only the API.
//! - [`aws`]: the `[aws]` table, and (feature `aws`) the SDK configuration every AWS client is built from, and AWS errors in words.
//! - [`http`]: every outgoing HTTP client — reqwest with rustls (ring provider) and the system's CA roots.
//! - [`values`]: versions, digests, image names and branches — checked once where they enter, then typed.
//! - [`cli`]: the `slipway` command line, a client of the API (and of the config for `validate`/`plan`).
//!
//! The benchmarks (`crates/slipway-bench`) and the demo service
//! (`crates/slipway-demo`) are crates of their own in this workspace.

pub mod api;
pub mod aws;
pub mod cli;
pub mod config;
pub mod events;
pub mod executor;
pub mod gate;
pub mod git;
pub mod http;
pub mod node;
pub mod notify;
pub mod plan;
pub mod process;
pub mod retention;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod submit;
pub mod targets;
pub mod trigger;
pub mod ui;
pub mod values;
pub mod why;
