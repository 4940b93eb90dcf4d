//! Config from git: a bare mirror of an environment's repository, kept
//! under `.slipway/git/`, read with the system `git`.
//!
//! Every command is an argument vector (no shell), runs with a timeout and
//! is killed past it, never prompts (`GIT_TERMINAL_PROMPT=0`), and cannot
//! use the `ext::` transport. Branch names and commit ids are checked
//! before they become arguments; the repository URL comes from the
//! node's own config.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::GitSource;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git {what} timed out after {}s", timeout.as_secs())]
    Timeout { what: String, timeout: Duration },
    #[error("git {what} failed: {message}")]
    Failed { what: String, message: String },
    #[error("cannot run git: {0} (is git installed?)")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A full commit id: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits.
pub fn valid_commit(c: &str) -> bool {
    (c.len() == 40 || c.len() == 64) && c.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// What `plan --from/--to` accepts: a commit id (possibly short) or a
/// branch-like name; never an option or a range.
pub fn valid_rev(r: &str) -> bool {
    crate::config::environment::valid_branch(r) || (r.len() >= 4 && r.len() <= 64 && r.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Most output a git command may give (an archive of a config directory).
const MAX_OUTPUT: u64 = crate::config::revision::MAX_REVISION_BYTES + (16 << 20);

pub struct Mirror {
    pub dir: PathBuf,
    pub source: GitSource,
}

impl Mirror {
    /// The mirror of `source` under `state_dir` (`.slipway/git/<digest>.git`).
    pub fn new(state_dir: &Path, source: &GitSource) -> Mirror {
        let digest = hex::encode(Sha256::digest(source.url.as_bytes()));
        Mirror { dir: state_dir.join("git").join(format!("{}.git", &digest[..16])), source: source.clone() }
    }

    fn remote_ref(&self) -> String {
        format!("refs/slipway/{}", self.source.branch)
    }

    async fn git(&self, what: &str, args: &[&str], cwd: Option<&Path>) -> Result<Vec<u8>, GitError> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.args(["-c", "protocol.ext.allow=never", "-c", "core.hooksPath=/dev/null"]);
        if let Some(d) = cwd {
            cmd.arg("-C").arg(d);
        }
        // Credentials go through git's environment (GIT_CONFIG_*), never
        // its arguments (which `ps` shows) nor the URL.
        // Nor does git inherit the variables that hold Slipway's secrets
        // or its own credentials.
        crate::process::hide_secret_sources(cmd.as_std_mut());
        if let Some(header) = self.source.authorization().map_err(|e| GitError::Invalid(format!("git credentials: {e}")))? {
            cmd.env("GIT_CONFIG_COUNT", "1").env("GIT_CONFIG_KEY_0", "http.extraHeader").env("GIT_CONFIG_VALUE_0", header);
        }
        cmd.args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            // No interactive host-key question: an unknown host fails.
            .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(GitError::Spawn)?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(GitError::Invalid("git's output pipes are missing".into()));
        };
        let run = async {
            use tokio::io::AsyncReadExt;
            // Bounded: a repository cannot make the node hold more than a
            // revision may be (plus the tar framing).
            let mut out = Vec::new();
            let mut err = Vec::new();
            let (mut stdout, mut stderr) = (stdout.take(MAX_OUTPUT + 1), stderr.take(64 << 10));
            let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
            o.and(e).map_err(GitError::Spawn)?;
            if out.len() as u64 > MAX_OUTPUT {
                // It would block on a full pipe until the timeout.
                let _ = child.kill().await;
            }
            let status = child.wait().await.map_err(GitError::Spawn)?;
            Ok::<_, GitError>((status, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(self.source.timeout, run).await {
            Err(_) => return Err(GitError::Timeout { what: what.to_string(), timeout: self.source.timeout }),
            Ok(r) => r?,
        };
        if out.len() as u64 > MAX_OUTPUT {
            return Err(GitError::Invalid(format!(
                "git {what}: more than {MAX_OUTPUT} bytes of output; a config directory is at most {} bytes",
                crate::config::revision::MAX_REVISION_BYTES
            )));
        }
        if !status.success() {
            // (stderr is read up to 64 KiB: git's messages are short.)
            let err = String::from_utf8_lossy(&err);
            let message = err.lines().filter(|l| !l.trim().is_empty()).take(4).collect::<Vec<_>>().join(" / ");
            // Git may echo the URL, credentials and all.
            let message = message.replace(&self.source.url, &self.source.shown());
            return Err(GitError::Failed { what: what.to_string(), message: if message.is_empty() { status.to_string() } else { message } });
        }
        Ok(out)
    }

    /// Fetch the branch into the mirror (created on first use) and return
    /// the commit it points at.
    pub async fn fetch(&self) -> Result<String, GitError> {
        // The branch is a `Branch`: checked once, when the config was read.
        if !self.dir.join("HEAD").exists() {
            std::fs::create_dir_all(&self.dir).map_err(GitError::Spawn)?;
            self.git("init", &["init", "--quiet", "--bare"], Some(&self.dir)).await?;
        }
        let refspec = format!("+refs/heads/{}:{}", self.source.branch, self.remote_ref());
        self.git(
            &format!("fetch of {} from {}", self.source.branch, self.source.shown()),
            &["fetch", "--quiet", "--no-tags", "--", &self.source.url, &refspec],
            Some(&self.dir),
        )
        .await?;
        self.resolve(&self.remote_ref()).await
    }

    /// A revision (commit id, short id, or branch of the source) as a full
    /// commit id.
    pub async fn resolve(&self, rev: &str) -> Result<String, GitError> {
        if !valid_rev(rev) && !rev.starts_with("refs/slipway/") {
            return Err(GitError::Invalid(format!("{rev:?} is not a commit id or branch name")));
        }
        let named = if self.source.branch == rev { self.remote_ref() } else { rev.to_string() };
        let out = self
            .git(&format!("rev-parse {rev}"), &["rev-parse", "--verify", "--quiet", "--end-of-options", &format!("{named}^{{commit}}")], Some(&self.dir))
            .await
            .map_err(|e| match e {
                GitError::Failed { .. } => {
                    GitError::Invalid(format!("{rev:?} is not a commit of {} (fetched branch {})", self.source.shown(), self.source.branch))
                }
                e => e,
            })?;
        let id = String::from_utf8_lossy(&out).trim().to_string();
        if !valid_commit(&id) {
            return Err(GitError::Invalid(format!("git named {id:?} for {rev:?}")));
        }
        Ok(id)
    }

    /// Whether `a` is an ancestor of `b` (or the same commit).
    pub async fn is_ancestor(&self, a: &str, b: &str) -> Result<bool, GitError> {
        for c in [a, b] {
            if !valid_commit(c) {
                return Err(GitError::Invalid(format!("{c:?} is not a full commit id")));
            }
        }
        match self.git("merge-base", &["merge-base", "--is-ancestor", a, b], Some(&self.dir)).await {
            Ok(_) => Ok(true),
            // Exit 1: not an ancestor (or one of them is unknown here).
            Err(GitError::Failed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Paths changed between two commits, relative to the config
    /// directory (`path`); paths outside it are left out.
    pub async fn changed(&self, from: &str, to: &str) -> Result<Vec<String>, GitError> {
        for c in [from, to] {
            if !valid_commit(c) {
                return Err(GitError::Invalid(format!("{c:?} is not a full commit id")));
            }
        }
        let out = self.git("diff", &["diff", "--name-only", "--no-renames", "-z", from, to, "--"], Some(&self.dir)).await?;
        let prefix = if self.source.path.is_empty() { String::new() } else { format!("{}/", self.source.path) };
        Ok(out
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .filter_map(|p| String::from_utf8_lossy(p).strip_prefix(prefix.as_str()).map(str::to_string))
            .collect())
    }

    /// Write the config directory of `commit` into `dest` (which must not
    /// exist): `git archive` of `commit:path`, unpacked.
    pub async fn checkout(&self, commit: &str, dest: &Path) -> Result<(), GitError> {
        if !valid_commit(commit) {
            return Err(GitError::Invalid(format!("{commit:?} is not a full commit id")));
        }
        let tree = if self.source.path.is_empty() { commit.to_string() } else { format!("{commit}:{}", self.source.path) };
        let tar = self.git(&format!("archive of {tree}"), &["archive", "--format=tar", &tree], Some(&self.dir)).await?;
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dest)?;
            let mut archive = tar::Archive::new(tar.as_slice());
            archive.set_preserve_permissions(true);
            archive.unpack(&dest)
        })
        .await
        .map_err(|e| GitError::Invalid(format!("unpacking failed: {e}")))?
        .map_err(|e| GitError::Failed { what: "unpacking the archive".into(), message: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_ids_and_revs_are_checked() {
        assert!(valid_commit(&"a".repeat(40)));
        assert!(!valid_commit(&"A".repeat(40)));
        assert!(!valid_commit("abc"));
        for ok in ["main", "abc1234", "release/2"] {
            assert!(valid_rev(ok), "{ok}");
        }
        for bad in ["--output=/tmp/x", "main..dev", "HEAD~1", "a b", "$(id)"] {
            assert!(!valid_rev(bad), "{bad}");
        }
    }
}
