//! Exit codes of the `slipway` command. Documented in the README; scripts
//! rely on them, so they never change meaning.

/// Success; for `deploy`/`run` without `--detach`: the deployment succeeded.
pub const OK: u8 = 0;
/// The deployment ended other than succeeded (failed, cancelled, superseded).
pub const DEPLOYMENT_FAILED: u8 = 1;
/// Bad command-line usage (also clap's own code for it), including a
/// missing `--env` where the config has several environments, whether
/// the CLI (`plan`) or the server (`deploy`, `run`, …) notices.
pub const USAGE: u8 = 2;
/// The config is invalid (`validate`, `plan`, `serve`, or refused by the server).
pub const INVALID_CONFIG: u8 = 3;
/// The server or the store could not be reached, or timed out.
pub const UNAVAILABLE: u8 = 4;
/// No such deployment (or job).
pub const NOT_FOUND: u8 = 5;
/// The server refused the request (bad input, conflict, too large).
pub const REJECTED: u8 = 6;
/// The server refused the caller: no token, an unknown or revoked one
/// (401), or a role it lacks for that environment (403).
pub const NOT_ALLOWED: u8 = 7;
/// The store was upgraded by a newer Slipway (its schema version is newer
/// than this binary knows): this one refuses to use it.
pub const INCOMPATIBLE_STORE: u8 = 8;
/// A bug or an unexpected condition in Slipway itself.
pub const INTERNAL: u8 = 70;
/// Stopped by a signal (SIGINT or SIGTERM) before the work was done.
pub const INTERRUPTED: u8 = 130;
