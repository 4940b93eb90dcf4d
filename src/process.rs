//! This Slipway process and the node-side commands it runs, shared by the
//! targets, the service manager's health checks and verify steps, and the
//! CLI: who we are on this host (the owner mark every process and
//! container we start carries, the installation it belongs to), and how an
//! argv command is filled in and started without a shell.
//!
//! Here rather than in a target's folder: every target marks what it
//! starts the same way, and nothing outside `targets/` may name a target.

/// The installation a store URL names, for marking processes: the
/// containers' scope ([`scope_of_store`], a digest of the URL
/// without credentials), with a SQLite path made absolute first, so that
/// two installations each using `sqlite://slipway.db` in their own
/// directory are two. Nodes of one installation share it when they spell
/// a PostgreSQL URL the same way.
pub fn installation_of_store(url: &str) -> String {
    match url.strip_prefix("sqlite://").and_then(|path| std::fs::canonicalize(path).ok()) {
        Some(path) => scope_of_store(&format!("sqlite://{}", path.display())),
        None => scope_of_store(url),
    }
}

/// Substitute `{name}` placeholders inside one argument. Values stay one
/// argument whatever they contain: no shell ever sees them.
pub fn substitute(arg: &str, values: &std::collections::BTreeMap<&'static str, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// Slipway's own credentials, which its environment may hold for it (the
/// store's URL and password, the CLI's token, the AWS keys of the ECS
/// target and the SQS trigger). No process it starts inherits them (Nomad
/// keeps the same out of tasks by default); one that needs a value lists
/// it as a secret, `[secret.aws] env = "AWS_SECRET_ACCESS_KEY"`.
pub const OWN_CREDENTIALS: &[&str] =
    &["SLIPWAY_STORE", "SLIPWAY_TOKEN", "PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN"];

/// Take the variables that hold secrets out of a child's environment (it
/// would inherit Slipway's own): a process gets a secret only by listing it.
pub(crate) fn hide_secret_sources(cmd: &mut std::process::Command) {
    for var in crate::config::secret::env_sources() {
        cmd.env_remove(var);
    }
    for var in OWN_CREDENTIALS {
        cmd.env_remove(var);
    }
}

/// This process on this host: `"<pid>.<start time>"`, the start time telling
/// it from a later process that reuses the pid.
pub(crate) fn owner_mark() -> &'static str {
    static MARK: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARK.get_or_init(|| {
        let pid = std::process::id() as i32;
        format!("{pid}.{}", proc_stat(pid).map(|s| s.start_time).unwrap_or(0))
    })
}

/// What /proc says of a process.
pub(crate) struct ProcStat {
    pub(crate) start_time: u64,
    /// 'Z': exited, not yet reaped by its parent: dead for our purposes.
    pub(crate) zombie: bool,
}

/// Start time (clock ticks since boot) from
/// /proc/PID/stat; the start time tells a process from a later one that
/// reused its pid.
pub(crate) fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted from after its closing parenthesis (field 3 = index 0).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat { start_time: fields.get(19)?.parse().ok()?, zombie: fields.first() == Some(&"Z") })
}

/// Whether the Slipway process named by an owner mark
/// (`"<pid>.<start time>"`) on this host is gone. A mark that does not
/// parse is not ours to judge: false.
pub(crate) fn owner_is_dead(owner: &str) -> bool {
    let Some((opid, ostart)) = owner.split_once('.') else { return false };
    let (Ok(opid), Ok(ostart)) = (opid.parse::<i32>(), ostart.parse::<u64>()) else { return false };
    !proc_stat(opid).is_some_and(|s| s.start_time == ostart && !s.zombie)
}

/// The program of an argv command: a relative path with a slash is
/// relative to `workdir` (the revision, or the unpacked release), not to
/// wherever Slipway was started; a bare name is looked up on PATH.
pub fn program_path(program: &str, workdir: &std::path::Path) -> std::ffi::OsString {
    if program.contains('/') && !program.starts_with('/') { workdir.join(program).into_os_string() } else { program.into() }
}

/// A store's scope label: a digest of its URL without the user and
/// password before its host, the same on every node that shares the
/// store. Its parameters are part of it as written, a `?password=`
/// included: leaving that out would change the label of an installation
/// that has one on upgrade (its containers and processes would be taken
/// for another installation's), so such a password is better given
/// before the host or in `PGPASSWORD`, which a rotation may change.
pub fn scope_of_store(url: &str) -> String {
    use sha2::Digest;
    let clean = match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.rsplit_once('@').map(|(_, host)| host).unwrap_or(rest)),
        None => url.to_string(),
    };
    hex::encode(&sha2::Sha256::digest(clean.as_bytes())[..6])
}

/// Signal a whole process group (`pgid` > 0; a group that is gone is no
/// error).
pub fn kill_group(pgid: i32, signal: i32) {
    if pgid > 0 {
        // SAFETY: plain syscall; a group that is gone gives ESRCH, ignored.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// How a process ended: its exit code, if it had one, and in words.
pub fn describe_exit(status: std::process::ExitStatus) -> (Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (Some(c), format!("exit code {c}")),
        (None, Some(s)) => (None, format!("killed by signal {s}")),
        _ => (None, "ended without exit code".into()),
    }
}
