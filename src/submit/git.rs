//! Config revisions from git: a commit of an environment's branch is
//! accepted (stored as the revision its deployments run against, and the
//! jobs its changes touch are run) or rejected (recorded with the
//! validation errors; the environment stays on its last good commit).
//!
//! Each verdict is an event of kind `revision:<env>:` under a key derived
//! from the environment and the commit, so a webhook and a poll, or two
//! nodes, deciding on the same commit record it once and run its jobs once.

use serde::{Deserialize, Serialize};

use super::{Source, SubmitError, Submitter, key_of, parse_for};
use crate::config::{self, revision};
use crate::git::{GitError, Mirror};
use crate::plan::changes::{self, Touched};
use crate::store::{DeploymentKind, NewEvent};

/// What became of a commit (stored as the event's payload).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevisionRecord {
    pub environment: String,
    pub commit: String,
    /// The revision id deployments name (the commit, plus the config
    /// directory's digest when it is not the repository's root).
    pub revision: String,
    pub branch: String,
    /// "accepted" or "rejected".
    pub state: String,
    /// The last accepted commit before this one.
    pub previous: Option<String>,
    #[serde(default)]
    pub changed: Vec<String>,
    #[serde(default)]
    pub jobs: Vec<Touched>,
    pub deployment: Option<i64>,
    /// Services this environment runs whose definition the commit
    /// changed: each is redeployed at the version it runs.
    #[serde(default)]
    pub redeploy: Vec<String>,
    pub errors: Option<String>,
    #[serde(default)]
    pub at: i64,
    /// The id of the event this record is (not stored in it).
    #[serde(skip)]
    pub event: i64,
}

impl RevisionRecord {
    pub fn short(&self) -> &str {
        revision::short(&self.commit)
    }
    pub fn accepted(&self) -> bool {
        self.state == "accepted"
    }
}

/// A spec as far as a redeploy cares: one environment's address is not
/// another's change (`for_environment` keeps every environment's map).
fn comparable(spec: &crate::config::service::ServiceSpec) -> crate::config::service::ServiceSpec {
    let mut s = spec.clone();
    s.listen_in.clear();
    s
}

/// What the drift check remembers having settled: a service's record (by
/// the deployment that wrote it) against an accepted revision.
fn settled_key(environment: &str, row: &crate::store::ServiceRow, revision: &str) -> String {
    format!("{environment}\n{}\n{}\n{revision}", row.service, row.deployment_id)
}

/// The event kind of an environment's revision records (names cannot
/// hold ':', so one environment's prefix never matches another's).
pub fn event_kind(environment: &str) -> String {
    format!("revision:{environment}:")
}

fn revision_id(commit: &str, path: &str) -> String {
    if path.is_empty() { commit.to_string() } else { format!("{commit}.{}", &key_of("p", &[path])[2..10]) }
}

impl Submitter {
    /// The records of an environment's commits, newest first.
    pub async fn revisions(&self, environment: &str, limit: i64) -> Result<Vec<RevisionRecord>, SubmitError> {
        let rows = self.store.events_of_kind(&event_kind(environment), limit).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let mut rec: RevisionRecord = serde_json::from_str(&r.payload).ok()?;
                rec.at = r.received_at;
                rec.event = r.id;
                rec.deployment = rec.deployment.or(r.deployment_id);
                Some(rec)
            })
            .collect())
    }

    pub async fn accepted_revision(&self, environment: &str) -> Result<Option<RevisionRecord>, SubmitError> {
        // Asked on every deploy and by the gate loop each second: the
        // newest few records nearly always hold it; only a run of
        // rejections makes it look further back.
        if let Some(r) = self.revisions(environment, 20).await?.into_iter().find(|r| r.accepted()) {
            return Ok(Some(r));
        }
        Ok(self.revisions(environment, 1000).await?.into_iter().find(|r| r.accepted()))
    }

    /// The mirror of an environment's repository, if it has one.
    pub async fn mirror(&self, environment: &str) -> Result<Option<Mirror>, SubmitError> {
        let disk = self.config().await?;
        let Some(git) = disk.config.environment(environment).and_then(|e| e.git.clone()) else { return Ok(None) };
        Ok(Some(Mirror::new(&disk.dir.join(".slipway"), &git)))
    }

    /// Fetch an environment's branch and decide on its head commit.
    pub async fn check_revision(&self, environment: &str) -> Result<RevisionRecord, SubmitError> {
        let mirror =
            self.mirror(environment).await?.ok_or_else(|| SubmitError::Invalid(format!("environment {environment} does not take its config from git")))?;
        let lock = self
            .deciding
            .lock()
            .map(|mut m| m.entry(environment.to_string()).or_default().clone())
            .map_err(|_| SubmitError::Invalid("a decision panicked".into()))?;
        // Bounded: fetch and checkout have their own timeouts.
        let _one = tokio::time::timeout(mirror.source.timeout * 3, lock.lock())
            .await
            .map_err(|_| SubmitError::Unavailable(format!("another decision on {environment}'s config is taking too long")))?;
        let head = self.fetch(environment, &mirror).await?;
        self.decide_commit(environment, &mirror, &head).await
    }

    /// Fetch the branch, keeping this node's record of the last failed
    /// fetch (for `status`) current: set on failure, cleared on success.
    async fn fetch(&self, environment: &str, mirror: &Mirror) -> Result<String, SubmitError> {
        let fetched = mirror.fetch().await;
        if let Ok(mut f) = self.fetch_failures.lock() {
            match &fetched {
                Ok(_) => f.remove(environment),
                Err(e) => {
                    f.insert(environment.to_string(), FetchFailure { at: crate::store::now_ms(), error: e.to_string(), source: source_of(&mirror.source) })
                }
            };
        }
        fetched.map_err(git_error)
    }

    /// This node's last failed fetch of `environment`'s branch, if no
    /// fetch has succeeded since and it was of the source the config
    /// names now (a fixed URL makes an old failure moot).
    pub fn fetch_failure(&self, environment: &str, source: &crate::config::environment::GitSource) -> Option<FetchFailure> {
        self.fetch_failures.lock().ok()?.get(environment).filter(|f| f.source == source_of(source)).cloned()
    }

    /// Accept or reject `commit` for `environment` (once: a commit decided
    /// before returns its record).
    pub async fn decide_commit(&self, environment: &str, mirror: &Mirror, commit: &str) -> Result<RevisionRecord, SubmitError> {
        // The node's own config, read once for the whole decision.
        let disk = self.config().await?.config;
        let history = self.revisions(environment, 1000).await?;
        let current = history.iter().find(|r| r.accepted());
        let previous = current.map(|r| r.commit.clone());
        // The decision that made the current commit current, which the
        // next acceptance names (a commit may become current more than once).
        let after = current.map(|r| format!("{}/{}", r.commit, r.event)).unwrap_or_default();
        if let Some(seen) = history.iter().find(|r| r.commit == commit) {
            // Decided before: the same answer. Unless it is an older
            // accepted commit that is the branch head again (a force-push
            // back): then it is accepted anew, after the current one.
            if !seen.accepted() || previous.as_deref() == Some(commit) || self.fetch(environment, mirror).await? != commit {
                return Ok(seen.clone());
            }
        } else if let Some(prev) = &previous
            && mirror.is_ancestor(commit, prev).await.map_err(git_error)?
            && self.fetch(environment, mirror).await? != commit
        {
            // Older than what is accepted and no longer the head: a
            // decision that lost a race with a newer commit.
            return Err(SubmitError::Conflict(format!(
                "{} is older than the accepted {} and not the head of {} any more: nothing to decide",
                revision::short(commit),
                revision::short(prev),
                mirror.source.branch
            )));
        }
        let key = key_of("git", &[environment, commit]);
        // Accepting is a compare-and-set on the commit it follows: of two
        // nodes (or a webhook and a poll) deciding different commits after
        // the same one, one wins, and the other's key is a duplicate.
        let successor_key = key_of("git", &[environment, "after", &after]);
        let mut record = RevisionRecord {
            environment: environment.to_string(),
            commit: commit.to_string(),
            revision: revision_id(commit, &mirror.source.path),
            branch: mirror.source.branch.to_string(),
            state: "accepted".into(),
            previous: previous.clone(),
            changed: vec![],
            jobs: vec![],
            deployment: None,
            redeploy: vec![],
            errors: None,
            at: 0,
            event: 0,
        };
        let tmp = mirror.dir.with_extension(format!("checkout.{}", rand::random::<u32>()));
        let checked = self.check_commit(environment, &disk, mirror, commit, &tmp).await;
        let _ = std::fs::remove_dir_all(&tmp);
        let (config, rev) = match checked {
            Ok(x) => x,
            // Git or the disk failing says nothing about the commit: no
            // verdict is recorded, the next push or poll tries again.
            Err(Checked::Unavailable(e)) => return Err(SubmitError::Unavailable(e)),
            Err(Checked::Invalid(errors)) => {
                record.state = "rejected".into();
                record.errors = Some(errors);
                tracing::warn!(environment, commit, "config revision rejected; the environment stays on {}", previous.as_deref().unwrap_or("no revision"));
                let (_, seen_before) = self
                    .store
                    .record_event(NewEvent { key: Some(key), kind: event_kind(environment), payload: serde_json::to_string(&record).unwrap_or_default() })
                    .await?;
                // Once, however many nodes decided it.
                if !seen_before && let Some(bus) = &self.events {
                    bus.emit(crate::events::Event::RevisionRejected {
                        environment: environment.to_string(),
                        commit: commit.to_string(),
                        errors: record.errors.clone().unwrap_or_default(),
                    })
                    .await;
                }
                return Ok(record);
            }
        };
        // The first commit seen is the baseline: nothing changed yet.
        if let Some(prev) = &previous {
            record.changed = mirror.changed(prev, commit).await.map_err(git_error)?;
            record.jobs = changes::touched(&config, environment, &record.changed);
        }
        if let Some(cur) = current {
            record.redeploy = self.respecified(environment, &disk, cur, &config).await?;
        }
        self.store.put_revision(&rev).await?;
        record.changed.truncate(1000);
        let source = Source { disk, config, environment: environment.to_string(), revision: None, revision_id: rev.id.clone() };
        let won = if record.jobs.is_empty() {
            // (record_event says whether the key was taken before.)
            !self
                .store
                .record_event(NewEvent { key: Some(successor_key), kind: event_kind(environment), payload: serde_json::to_string(&record).unwrap_or_default() })
                .await?
                .1
        } else {
            let jobs = record.jobs.iter().map(|t| t.job.clone()).collect();
            // The deployment's event is the record: submit and record are
            // one transaction.
            let pending = serde_json::to_string(&RevisionRecord { deployment: None, ..record.clone() }).unwrap_or_default();
            let sub = self.submit_revision(source, jobs, successor_key, event_kind(environment), pending).await?;
            record.deployment = Some(sub.deployment_id);
            !sub.duplicate
        };
        if !won {
            let winner = self.accepted_revision(environment).await?;
            return match winner {
                Some(w) if w.commit == commit => Ok(w),
                w => Err(SubmitError::Conflict(format!(
                    "{} was not accepted: {} was accepted after {} meanwhile; the next push or poll decides again",
                    revision::short(commit),
                    w.map(|w| w.short().to_string()).unwrap_or_else(|| "another commit".into()),
                    previous.as_deref().map(revision::short).unwrap_or("the start")
                ))),
            };
        }
        tracing::info!(environment, commit, jobs = record.jobs.len(), "config revision accepted");
        // Now that the commit is what the environment runs, services whose
        // definition it changed roll out again at their running version.
        self.redeploy(environment, &record.redeploy).await;
        Ok(record)
    }

    /// Services the environment runs whose spec differs between the
    /// current accepted commit and `config`.
    async fn respecified(
        &self,
        environment: &str,
        disk: &config::Config,
        current: &RevisionRecord,
        config: &config::Config,
    ) -> Result<Vec<String>, SubmitError> {
        let Some(old) = self.store.revision(&current.revision).await? else { return Ok(vec![]) };
        let Ok(old) = parse_for(environment, &disk.environment_names(), "previous", &old.config_text) else { return Ok(vec![]) };
        let running = self.store.services().await?;
        Ok(config
            .services
            .iter()
            .filter(|s| running.iter().any(|r| r.environment == environment && r.service == s.name))
            .filter_map(|s| {
                let new = comparable(&s.spec.as_ref()?.for_environment(environment));
                let before = old.services.iter().find(|o| o.name == s.name).and_then(|o| o.spec.as_ref()).map(|o| comparable(&o.for_environment(environment)));
                (before.as_ref() != Some(&new)).then(|| s.name.clone())
            })
            .collect())
    }

    /// A commit changed these services' definitions. A deploy of one
    /// still waiting at a gate (a promotion in its soak, a deploy waiting
    /// for approval) is submitted again on the new revision now, keeping
    /// its version, digest, promotion and approval, rather than being
    /// superseded by a redeploy of the older running version. Every other
    /// service is rolled out again by the gate loop's drift check
    /// ([`Submitter::redeploy_drifted`]) once nothing of it is in flight.
    async fn redeploy(&self, environment: &str, services: &[String]) {
        let waiting = match self.store.holds().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(environment, "waiting deploys not moved to the new revision (the gate loop will, when they are released): {e}");
                return;
            }
        };
        for name in services {
            let Some((pending, hold)) = waiting
                .iter()
                .filter(|(d, _)| d.environment == environment && d.kind == DeploymentKind::Deploy && d.service.as_deref() == Some(name.as_str()))
                .max_by_key(|(d, _)| d.id)
            else {
                continue;
            };
            match self.resubmit_if_moved(pending, hold).await {
                Ok(Some(s)) => {
                    tracing::info!(environment, service = %name, deployment = s.deployment_id, of = pending.id, "its definition changed: its waiting deploy submitted again on the new revision")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(environment, service = %name, "waiting deploy {} not submitted again after the definition changed: {e}", pending.id),
            }
        }
    }

    /// The drift check, for the gate loop: in each environment that takes
    /// its config from git, a service whose recorded definition differs
    /// from its accepted commit's is rolled out again at the version (and
    /// digest) it runs, on that commit — only when nothing of it is
    /// waiting, queued or running and its record is the one read here
    /// (the store checks both in the submit's transaction, so it never
    /// supersedes anyone's deploy nor redeploys a version just replaced).
    /// Once per (environment, revision, service), whichever node sees it:
    /// a redeploy that fails is not tried again until the next commit.
    pub async fn redeploy_drifted(&self, disk: &config::Config, rows: &[crate::store::ServiceRow]) -> Result<(), SubmitError> {
        for env in disk.environments.iter().filter(|e| e.git.is_some()) {
            let here: Vec<&crate::store::ServiceRow> = rows.iter().filter(|r| r.environment == env.name).collect();
            if here.is_empty() {
                continue;
            }
            let Some(accepted) = self.accepted_revision(&env.name).await? else { continue };
            // What this node has settled: (service, record, revision) seen
            // in step, or redeployed.
            let settled =
                |r: &crate::store::ServiceRow| self.redeployed.lock().map(|d| d.contains(&settled_key(&env.name, r, &accepted.revision))).unwrap_or(false);
            let candidates: Vec<&&crate::store::ServiceRow> = here.iter().filter(|r| r.revision != accepted.revision && !settled(r)).collect();
            if candidates.is_empty() {
                continue;
            }
            let Ok(config) = self.config_for(&env.name).await else { continue };
            for row in candidates {
                let want =
                    config.services.iter().find(|s| s.name == row.service).and_then(|s| s.spec.as_ref()).map(|s| comparable(&s.for_environment(&env.name)));
                let runs = crate::store::spec::decode_service(&row.spec).ok();
                let settle = || {
                    if let Ok(mut d) = self.redeployed.lock() {
                        d.insert(settled_key(&env.name, row, &accepted.revision));
                    }
                };
                let Some(want) = want else {
                    // Gone from the config: nothing to roll out.
                    settle();
                    continue;
                };
                if runs.as_ref().map(comparable).as_ref() == Some(&want) {
                    settle();
                    continue;
                }
                // A digest is only the same kind of thing if the artifact
                // kind is (an image's digest, a tarball's checksum).
                let same_kind = runs.as_ref().is_some_and(|r| r.image.is_some() == want.image.is_some());
                let digest = if same_kind { row.sha256.clone() } else { None };
                let name = &row.service;
                // Cheap first: the submit below does much more before its
                // store transaction refuses the same way.
                if self.store.in_flight_on(&super::lock_key(&env.name, Some(name))).await? {
                    continue;
                }
                let payload = serde_json::json!({ "kind": "deploy", "service": name, "version": row.version, "environment": env.name, "reason": format!("its definition changed in {}", revision::short(&accepted.commit)) }).to_string();
                let key = key_of("git", &[&env.name, &accepted.revision, "redeploy", name]);
                match self.redeploy_if_idle(row, digest, key, payload).await {
                    // Something of it is in flight: asked again next second.
                    Ok(s) if s.busy => {}
                    Ok(s) => {
                        if !s.duplicate {
                            tracing::info!(environment = %env.name, service = %name, deployment = s.deployment_id, "service redeployed: its definition changed");
                        }
                        settle();
                    }
                    // An outage passes: tried again next second, quietly.
                    Err(e @ (SubmitError::Unavailable(_) | SubmitError::Store(_))) => {
                        tracing::debug!(environment = %env.name, service = %name, "service not redeployed yet after its definition changed: {e}")
                    }
                    // Anything else would fail the same way each second:
                    // said once, and left until the next commit.
                    Err(e) => {
                        tracing::warn!(environment = %env.name, service = %name, "service not redeployed after its definition changed: {e}");
                        settle();
                    }
                }
            }
        }
        Ok(())
    }

    /// Check out and validate a commit: its config, as a revision whose id
    /// is the commit.
    async fn check_commit(
        &self,
        environment: &str,
        disk: &config::Config,
        mirror: &Mirror,
        commit: &str,
        dir: &std::path::Path,
    ) -> Result<(config::Config, revision::Revision), Checked> {
        let unavailable = |e: String| Checked::Unavailable(e);
        mirror.checkout(commit, dir).await.map_err(|e| match e {
            // A tree too large for a revision is the commit's fault.
            GitError::Invalid(m) => Checked::Invalid(m),
            e => Checked::Unavailable(e.to_string()),
        })?;
        let file = dir.join(config::CONFIG_FILE);
        let at = format!("{} of {}", revision::short(commit), mirror.source.shown());
        // A regular file of reasonable size: a symlink could point at
        // /dev/zero or at a file of this host (whose lines would end up in
        // the rejection report).
        match std::fs::symlink_metadata(&file) {
            Ok(m) if m.file_type().is_file() && m.len() <= MAX_CONFIG_BYTES => {}
            Ok(m) if m.file_type().is_file() => {
                return Err(Checked::Invalid(format!("{} at {at} is larger than {MAX_CONFIG_BYTES} bytes", config::CONFIG_FILE)));
            }
            Ok(_) => return Err(Checked::Invalid(format!("{} at {at} is not a regular file (a symlink?)", config::CONFIG_FILE))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Checked::Invalid(format!(
                    "no {} at {at}{}",
                    config::CONFIG_FILE,
                    if mirror.source.path.is_empty() { String::new() } else { format!(" in {}/", mirror.source.path) }
                )));
            }
            Err(e) => return Err(unavailable(format!("cannot read {}: {e}", file.display()))),
        }
        let text = std::fs::read_to_string(&file).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Checked::Invalid(format!("{} at {at} is not UTF-8", config::CONFIG_FILE)),
            _ => unavailable(format!("cannot read {}: {e}", file.display())),
        })?;
        let shown = if mirror.source.path.is_empty() {
            format!("{}@{}", config::CONFIG_FILE, revision::short(commit))
        } else {
            format!("{}/{}@{}", mirror.source.path, config::CONFIG_FILE, revision::short(commit))
        };
        let config = parse_for(environment, &disk.environment_names(), &shown, &text).map_err(|e| Checked::Invalid(e.render(false)))?;
        let (dir, path) = (dir.to_path_buf(), mirror.source.path.clone());
        let commit = commit.to_string();
        tokio::task::spawn_blocking(move || {
            revision::snapshot(&dir, &text).map(|mut rev| {
                rev.id = revision_id(&commit, &path);
                (config, rev)
            })
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|e| match e {
            revision::RevisionError::TooLarge { .. } | revision::RevisionError::Ignore { .. } => Checked::Invalid(e.to_string()),
            e => unavailable(e.to_string()),
        })
    }
}

/// Largest `slipway.toml` a commit may carry.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why a commit could not be checked: its own fault (rejected) or not.
enum Checked {
    Invalid(String),
    Unavailable(String),
}

fn git_error(e: GitError) -> SubmitError {
    match e {
        GitError::Invalid(m) => SubmitError::Invalid(m),
        e => SubmitError::Unavailable(e.to_string()),
    }
}

/// A fetch of an environment's branch that failed on this node.
#[derive(Debug, Clone)]
pub struct FetchFailure {
    /// When (ms since the epoch).
    pub at: i64,
    /// What git said (the URL shown without credentials).
    pub error: String,
    /// What it was a fetch of: the repository (credentials hidden) and
    /// the branch, as `source_of` writes it.
    pub source: String,
}

/// What a fetch failure was of: the repository (credentials hidden) and
/// branch.
fn source_of(s: &crate::config::environment::GitSource) -> String {
    format!("{} {}", s.shown(), s.branch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(staging: u16, production: u16, instances: u32) -> crate::config::service::ServiceSpec {
        let text = format!(
            "[[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\n[[service]]\nname = \"web\"\ninstances = {instances}\nlisten = {{ staging = \"127.0.0.1:{staging}\", production = \"127.0.0.1:{production}\" }}\ncommand = [\"/bin/web\", \"{{port}}\"]\n"
        );
        let c = config::parse("slipway.toml", &text).expect("valid");
        c.services[0].spec.clone().expect("a managed service")
    }

    // Issue 6 (review): one environment's address is not another's change.
    #[test]
    fn only_the_environment_whose_definition_changed_differs() {
        let (before, moved) = (web(8001, 9001, 1), web(8001, 9002, 1));
        assert_eq!(comparable(&before.for_environment("staging")), comparable(&moved.for_environment("staging")));
        assert_ne!(comparable(&before.for_environment("production")), comparable(&moved.for_environment("production")));
        assert_ne!(comparable(&before.for_environment("staging")), comparable(&web(8001, 9001, 2).for_environment("staging")));
        // What a rollout records reads back equal.
        let stored = crate::store::spec::encode_service(&before.for_environment("staging"));
        let back = crate::store::spec::decode_service(&stored).expect("spec");
        assert_eq!(comparable(&back), comparable(&before.for_environment("staging")));
    }
}
