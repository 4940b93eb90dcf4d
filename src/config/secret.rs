//! `[secret.NAME]` and `[[registry]]`: values that must never be in the
//! config (or in git), and the registries whose credentials they are.
//!
//! A secret is named in the config and read on the node that needs it, at
//! the moment it needs it, from an environment variable of the Slipway
//! process or a file on its host. Only its *source* (the variable's name,
//! the file's path) is ever stored, in revisions and job specs; the value
//! lives in memory for as long as one pull, one container start or one job
//! needs it, and [`Secret`]'s `Debug` prints no value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{Problem, ProblemKind, check_name};

/// Environment variables that hold a secret's value, from every config
/// this process has parsed and every job spec it has run: no process
/// Slipway starts inherits them, only those that list the secret get it.
static ENV_SOURCES: std::sync::Mutex<std::collections::BTreeSet<String>> = std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Remember where these secrets come from (see [`env_sources`]).
pub fn note_sources<'a>(secrets: impl IntoIterator<Item = &'a SecretRef>) {
    if let Ok(mut set) = ENV_SOURCES.lock() {
        for s in secrets {
            if let SecretSource::Env(v) = &s.source {
                set.insert(v.clone());
            }
        }
    }
}

/// Every environment variable known to hold a secret.
pub fn env_sources() -> Vec<String> {
    ENV_SOURCES.lock().map(|s| s.iter().cloned().collect()).unwrap_or_default()
}

/// Where a named secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    pub name: String,
    #[serde(flatten)]
    pub source: SecretSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// An environment variable of the Slipway process.
    Env(String),
    /// A file on the Slipway host (a trailing newline is not part of it).
    File(PathBuf),
}

/// A secret's value. `Debug` shows its length, never the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl SecretRef {
    /// Read the value now. The error names the secret and its source, never
    /// a value.
    pub fn read(&self) -> Result<Secret, String> {
        match &self.source {
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                Ok(_) => Err(format!("secret {:?}: environment variable {var} is empty", self.name)),
                Err(_) => Err(format!("secret {:?}: environment variable {var} is not set for the Slipway process", self.name)),
            },
            SecretSource::File(path) => {
                // Bounded: a secret is small, and a wrong path (a device, a
                // huge file) must not eat the node's memory.
                let meta = std::fs::metadata(path).map_err(|e| format!("secret {:?}: cannot read {}: {e}", self.name, path.display()))?;
                if !meta.is_file() || meta.len() > 1 << 20 {
                    return Err(format!("secret {:?}: {} is not a regular file of at most 1 MiB", self.name, path.display()));
                }
                let v = std::fs::read_to_string(path).map_err(|e| format!("secret {:?}: cannot read {}: {e}", self.name, path.display()))?;
                let v = v.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&v).to_string();
                if v.is_empty() {
                    return Err(format!("secret {:?}: {} is empty", self.name, path.display()));
                }
                Ok(Secret(v))
            }
        }
    }
}

/// Credentials for one registry host: a user and password (basic auth,
/// or the registry's token service, which the Engine asks with them), or
/// an identity token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAuth {
    /// `host[:port]` as written in image names.
    pub host: String,
    pub username: Option<String>,
    pub password: Option<SecretRef>,
    pub token: Option<SecretRef>,
}

/// What a pull or a registry lookup sends, read from the secrets.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub host: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
}

impl RegistryAuth {
    pub fn credentials(&self) -> Result<Credentials, String> {
        Ok(Credentials {
            host: self.host.clone(),
            username: self.username.clone(),
            password: self.password.as_ref().map(SecretRef::read).transpose()?,
            token: self.token.as_ref().map(SecretRef::read).transpose()?,
        })
    }
}

/// The registry host of an image name (`host[:port]/path`), or Docker
/// Hub's when the first part names none.
pub fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first,
        _ => "docker.io",
    }
}

// ---- the serde shape -------------------------------------------------------

#[derive(Deserialize)]
pub(super) struct RawSecret {
    env: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawRegistry {
    host: Spanned<String>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
}

pub(super) fn build_secrets(raw: BTreeMap<Spanned<String>, Spanned<RawSecret>>, problems: &mut Vec<Problem>) -> BTreeMap<String, SecretRef> {
    let mut out = BTreeMap::new();
    for (name, s) in raw {
        check_name(&name, "secret", problems);
        let span = s.span();
        let s = s.into_inner();
        let source = match (s.env, s.file) {
            (Some(e), None) => {
                let v = e.get_ref();
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || v.starts_with(|c: char| c.is_ascii_digit()) {
                    problems.push(
                        Problem::new(ProblemKind::InvalidValue, Some(e.span()), format!("{v:?} is not an environment variable name"))
                            .label("not a variable name")
                            .hint("e.g. env = \"REGISTRY_PASSWORD\""),
                    );
                }
                SecretSource::Env(e.into_inner())
            }
            (None, Some(f)) => {
                if !f.get_ref().starts_with('/') {
                    problems.push(
                        Problem::new(ProblemKind::InvalidValue, Some(f.span()), "a secret's `file` must be an absolute path on the Slipway host")
                            .label("relative path")
                            .hint("secrets are never part of the config directory (it is stored and shipped as the revision)"),
                    );
                }
                SecretSource::File(PathBuf::from(f.into_inner()))
            }
            (Some(_), Some(f)) => {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(f.span()), format!("secret {:?} has both `env` and `file`", name.get_ref()))
                        .label("second source")
                        .hint("a secret comes from one place"),
                );
                continue;
            }
            (None, None) => {
                problems.push(
                    Problem::new(ProblemKind::MissingKey, Some(span), format!("secret {:?} says nowhere to read it from", name.get_ref()))
                        .label("this secret")
                        .hint("add env = \"VARIABLE\" or file = \"/etc/slipway/NAME\"; the value itself never goes in the config"),
                );
                continue;
            }
        };
        out.insert(name.get_ref().clone(), SecretRef { name: name.into_inner(), source });
    }
    note_sources(out.values());
    out
}

/// A use of a secret by name: the secret, or a problem at the use.
pub(crate) fn lookup(name: &Spanned<String>, secrets: &BTreeMap<String, SecretRef>, problems: &mut Vec<Problem>) -> Option<SecretRef> {
    match secrets.get(name.get_ref()) {
        Some(s) => Some(s.clone()),
        None => {
            let hint = match super::diagnostic::did_you_mean(name.get_ref(), secrets.keys().map(String::as_str)) {
                Some(s) => format!("did you mean {s:?}?"),
                None => format!("declare it: [secret.{}] with env = \"VARIABLE\" or file = \"/path\"", name.get_ref()),
            };
            problems.push(
                Problem::new(ProblemKind::UnknownReference, Some(name.span()), format!("unknown secret {:?}", name.get_ref()))
                    .label("no such secret")
                    .hint(hint),
            );
            None
        }
    }
}

/// `secrets = { VAR = "secret" }` of a service or job: environment
/// variable → secret, each checked.
pub(super) fn env_secrets(
    raw: Option<&Spanned<BTreeMap<String, Spanned<String>>>>,
    env: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, SecretRef>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, SecretRef> {
    let mut out = BTreeMap::new();
    for (var, secret) in raw.iter().flat_map(|m| m.get_ref().iter()) {
        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || var.starts_with(|c: char| c.is_ascii_digit()) {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(secret.span()), format!("{var:?} is not an environment variable name"))
                    .label("for this secret")
                    .hint("e.g. secrets = { DATABASE_URL = \"db_url\" }"),
            );
        }
        if var.starts_with("SLIPWAY_") {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(secret.span()), format!("{var}: names starting with SLIPWAY_ are Slipway's own"))
                    .label("reserved")
                    .hint("pick another name"),
            );
        }
        if env.contains_key(var) {
            problems
                .push(Problem::new(ProblemKind::Duplicate, Some(secret.span()), format!("{var} is set both in `env` and in `secrets`")).label("second value"));
        }
        if let Some(r) = lookup(secret, secrets, problems) {
            out.insert(var.clone(), r);
        }
    }
    out
}

/// Most values a service's masking keeps across rotations.
const KEEP_VALUES: usize = 64;

/// Masks secret values in text: every line of output Slipway keeps, and
/// every reason it records, passes through the redactor of the secrets
/// the job (or service) was given, so a value a process prints itself is
/// stored as `[secret NAME]`.
#[derive(Clone, Default)]
pub struct Redactor {
    /// (value, name), longest value first: a value that contains another
    /// is masked whole.
    values: Vec<(String, String)>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor(<{} values>)", self.values.len())
    }
}

impl Redactor {
    /// The values of these secrets, read now; one that cannot be read is
    /// not given to anything either, so there is nothing to mask.
    pub fn of<'a>(secrets: impl IntoIterator<Item = &'a SecretRef>) -> Redactor {
        let read: Vec<(String, Secret)> = secrets.into_iter().filter_map(|s| s.read().ok().map(|v| (s.name.clone(), v))).collect();
        Redactor::of_values(read.iter().map(|(n, v)| (n.as_str(), v)))
    }

    /// From values already read (name, value): the very values a process
    /// was given, not a second read that a rotation could make differ.
    pub fn of_values<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a Secret)>) -> Redactor {
        let mut values: Vec<(String, String)> = secrets.into_iter().map(|(n, v)| (v.0.clone(), n.to_string())).filter(|(v, _)| !v.is_empty()).collect();
        // A secret file's value may span lines; output comes line by line.
        let lines: Vec<(String, String)> =
            values.iter().flat_map(|(v, n)| v.lines().filter(|l| l.trim().len() >= 4).map(|l| (l.to_string(), n.clone())).collect::<Vec<_>>()).collect();
        values.extend(lines);
        Redactor::ordered(values)
    }

    /// Longest value first (one that contains another is masked whole),
    /// each value once.
    fn ordered(mut values: Vec<(String, String)>) -> Redactor {
        values.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        values.dedup_by(|a, b| a.0 == b.0);
        Redactor { values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// This one's values and `older`'s: after a secret's rotation, what
    /// still runs with the old value (an instance draining) is masked too.
    /// At most [`KEEP_VALUES`] in all (this one's first), so that many
    /// rotations do not make masking ever slower.
    pub fn and(self, older: &Redactor) -> Redactor {
        let room = KEEP_VALUES.saturating_sub(self.values.len());
        let kept: Vec<(String, String)> = older.values.iter().filter(|o| !self.values.iter().any(|v| v.0 == o.0)).take(room).cloned().collect();
        Redactor::ordered(self.values.into_iter().chain(kept).collect())
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (value, name) in &self.values {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), &format!("[secret {name}]"));
            }
        }
        out
    }

    /// Masks lines that may come cut in pieces (one stream and part per
    /// key): see [`Pieces::piece`].
    pub fn pieces<K: Eq + std::hash::Hash>(&self) -> Pieces<'_, K> {
        // A value that spans lines (a whole secret file) never matches
        // within one: only single-line values decide what is held.
        let longest = self.values.iter().filter(|(v, _)| !v.contains('\n')).map(|(v, _)| v.len()).max().unwrap_or(0);
        Pieces { redactor: self, longest, held: std::collections::HashMap::new() }
    }
}

/// A line longer than the targets' limit reaches the redactor in pieces,
/// and a secret across a cut would pass as two halves that match nothing.
/// So the end of a cut piece that could begin a secret is held back and
/// put before the next piece of the same key.
pub struct Pieces<'a, K> {
    redactor: &'a Redactor,
    /// The longest single-line value: how much of a cut piece may begin one.
    longest: usize,
    held: std::collections::HashMap<K, String>,
}

impl<K: Eq + std::hash::Hash> Pieces<'_, K> {
    /// What may be shown now of this piece, masked (`None`: all of it is
    /// held back). `cut`: the line goes on in the next piece of `key`.
    pub fn piece(&mut self, key: K, text: String, cut: bool) -> Option<String> {
        let mut text = match self.held.remove(&key) {
            Some(mut held) => {
                held.push_str(&text);
                held
            }
            None => text,
        };
        if self.redactor.is_empty() {
            return Some(text);
        }
        let longest = self.longest;
        if !cut || longest < 2 {
            return Some(self.redactor.redact(&text));
        }
        // Any secret still to be completed begins in the last longest-1
        // bytes; one that begins before the cut and ends after it (as
        // `redact` finds them: left to right, without overlap) is held
        // whole, until nothing crosses the cut (it only moves back). Values
        // that overlap one another could move it back over a whole line of
        // them, so what is held stays under HOLD_AT_MOST.
        let floor = text.len().saturating_sub(HOLD_AT_MOST);
        let mut at = text.floor_char_boundary((text.len() + 1).saturating_sub(longest));
        let mut found: Vec<(usize, usize)> =
            self.redactor.values.iter().flat_map(|(v, _)| text.match_indices(v.as_str()).map(|(i, m)| (i, i + m.len()))).collect();
        // By end, last first: once one ends at or before the cut, so do
        // all after it, and the cut only moves back, so none of those can
        // cross it any more; one that began at or after the cut never will.
        found.sort_unstable_by_key(|m| std::cmp::Reverse(m.1));
        for (start, end) in found {
            if end <= at {
                break;
            }
            if start < at && start >= floor {
                at = start;
            }
        }
        let rest = text.split_off(at);
        if !rest.is_empty() {
            self.held.insert(key, rest);
        }
        (!text.is_empty()).then(|| self.redactor.redact(&text))
    }

    /// What is still held when the output ends, masked.
    pub fn finish(&mut self) -> Vec<(K, String)> {
        self.held.drain().map(|(k, t)| (k, self.redactor.redact(&t))).collect()
    }
}

/// The most a line's masking holds back across cuts: four pieces.
const HOLD_AT_MOST: usize = 4 * crate::targets::MAX_LINE_BYTES;

pub(super) fn build_registries(raw: Vec<Spanned<RawRegistry>>, secrets: &BTreeMap<String, SecretRef>, problems: &mut Vec<Problem>) -> Vec<RegistryAuth> {
    let mut out: Vec<RegistryAuth> = Vec::new();
    for r in raw {
        let span = r.span();
        let r = r.into_inner();
        let host = r.host.get_ref();
        if host.is_empty()
            || host.contains('/')
            || host.chars().any(|c| c.is_ascii_uppercase())
            || !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(r.host.span()), format!("`host` {host:?} is not a registry host"))
                    .label("not host[:port]")
                    .hint("write the registry part of the image name, in lowercase, e.g. host = \"registry.example.org:5000\" (Docker Hub: \"docker.io\")"),
            );
        }
        if out.iter().any(|o| &o.host == host) {
            problems.push(Problem::new(ProblemKind::InvalidValue, Some(r.host.span()), format!("registry {host:?} is declared twice")).label("again"));
        }
        let password = r.password.as_ref().and_then(|p| lookup(p, secrets, problems));
        let token = r.token.as_ref().and_then(|t| lookup(t, secrets, problems));
        match (&r.username, &r.password, &r.token) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => {}
            (_, _, Some(t)) if r.username.is_some() || r.password.is_some() => {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(t.span()), "a registry takes `username` + `password`, or `token`, not both")
                        .label("second kind of credential"),
                );
            }
            (Some(u), None, None) => {
                problems.push(
                    Problem::new(ProblemKind::MissingKey, Some(u.span()), "`username` without `password`")
                        .label("no password")
                        .hint("add password = \"SECRET-NAME\", naming a [secret.*]"),
                );
            }
            (None, Some(p), None) => {
                problems.push(Problem::new(ProblemKind::MissingKey, Some(p.span()), "`password` without `username`").label("no username"));
            }
            _ => {
                problems.push(
                    Problem::new(ProblemKind::MissingKey, Some(span), format!("registry {host:?} has no credentials"))
                        .label("this registry")
                        .hint("add username = \"…\" and password = \"SECRET-NAME\", or token = \"SECRET-NAME\""),
                );
            }
        }
        out.push(RegistryAuth { host: host.clone(), username: r.username.map(Spanned::into_inner), password, token });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_value_never_shows_in_debug() {
        let s = Secret("hunter2".into());
        let c = Credentials { host: "r".into(), username: Some("u".into()), password: Some(s), token: None };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn a_redactor_masks_each_value_and_the_longer_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "hunter2").unwrap();
        std::fs::write(&b, "hunter2-and-more\nsecond line of it\n").unwrap();
        let refs = [SecretRef { name: "short".into(), source: SecretSource::File(a) }, SecretRef { name: "long".into(), source: SecretSource::File(b) }];
        let r = Redactor::of(refs.iter());
        assert_eq!(r.redact("x hunter2-and-more y hunter2 z"), "x [secret long] y [secret short] z");
        assert_eq!(r.redact("it says: second line of it"), "it says: [secret long]");
        assert_eq!(r.redact("nothing here"), "nothing here");
        assert!(!format!("{r:?}").contains("hunter2"));
    }

    #[test]
    fn registry_hosts_follow_the_image_name_rules() {
        assert_eq!(registry_host("127.0.0.1:5000/demo"), "127.0.0.1:5000");
        assert_eq!(registry_host("registry.example.org/team/web"), "registry.example.org");
        assert_eq!(registry_host("localhost/web"), "localhost");
        assert_eq!(registry_host("team/web"), "docker.io");
        assert_eq!(registry_host("web"), "docker.io");
    }

    #[test]
    fn a_file_secret_loses_its_trailing_newline_and_a_missing_one_names_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        let r = SecretRef { name: "pw".into(), source: SecretSource::File(p.clone()) };
        assert_eq!(r.read().unwrap().expose(), "s3cret");
        let missing = SecretRef { name: "pw".into(), source: SecretSource::Env("SLIPWAY_TEST_SURELY_UNSET_VAR".into()) };
        let e = missing.read().unwrap_err();
        assert!(e.contains("SLIPWAY_TEST_SURELY_UNSET_VAR") && e.contains("\"pw\""), "{e}");
    }

    /// Issue 19 (left by the twelfth session): output is cut into pieces
    /// before it is masked, so a secret across a cut was stored as two
    /// unmasked halves.
    #[test]
    fn issue19_a_secret_cut_across_pieces_of_a_long_line_is_masked() {
        let value = Secret("hunter2-across-the-cut".into());
        let r = Redactor::of_values([("pw", &value)]);
        for cut_at in 1..value.0.len() {
            let mut p = r.pieces::<u8>();
            let first = format!("{}{}", "x".repeat(100), &value.0[..cut_at]);
            let second = format!("{} and {} again", &value.0[cut_at..], value.0);
            let mut shown: String = p.piece(1, first, true).unwrap_or_default();
            shown += &p.piece(1, second, false).unwrap_or_default();
            shown.extend(p.finish().into_iter().map(|(_, t)| t));
            assert_eq!(shown, format!("{}[secret pw] and [secret pw] again", "x".repeat(100)), "cut after {cut_at} bytes");
        }
        // Nothing is held across keys, and what a line still holds when
        // the output ends is given back, masked.
        let mut p = r.pieces::<u8>();
        let line = format!("abc {} hunter2-acr", "y".repeat(40));
        let shown = p.piece(1, line.clone(), true).expect("the start is shown at once");
        assert!(line.starts_with(&shown) && shown.len() < line.len() - "hunter2-acr".len(), "{shown}");
        assert_eq!(p.piece(2, "other".into(), false).as_deref(), Some("other"));
        assert_eq!(p.finish(), vec![(1, line[shown.len()..].to_string())]);
        // What is held stays bounded however long the line.
        let mut p = r.pieces::<u8>();
        for _ in 0..100 {
            let _ = p.piece(1, "hunter2-across-the-cuthunter2-across".repeat(50), true);
            assert!(p.held.values().all(|h| h.len() < 2 * value.0.len()), "{:?}", p.held.values().map(String::len).collect::<Vec<_>>());
        }
        // Values that overlap one another ("ab", "ba") are masked across a
        // cut too, and what is held stays bounded even so.
        let (ab, ba) = (Secret("ab".into()), Secret("ba".into()));
        let r2 = Redactor::of_values([("x", &ab), ("y", &ba)]);
        let mut p = r2.pieces::<u8>();
        let mut shown = String::new();
        for _ in 0..40 {
            shown += &p.piece(1, "ab".repeat(4096), true).unwrap_or_default();
            assert!(p.held.values().all(|h| h.len() <= HOLD_AT_MOST), "{:?}", p.held.values().map(String::len).collect::<Vec<_>>());
        }
        shown.extend(p.finish().into_iter().map(|(_, t)| t));
        assert!(!shown.contains("ab") && !shown.contains("ba"), "{}", &shown[..200]);
        // A value that spans lines does not make every cut line held.
        let file = Secret("line one of a file\nline two of it".into());
        let r3 = Redactor::of_values([("f", &file)]);
        assert_eq!(r3.pieces::<u8>().piece(1, "x".repeat(100), true).map(|t| t.len()), Some(100 - ("line one of a file".len() - 1)));
        // Without secrets, pieces pass as they are.
        let none = Redactor::of_values([]);
        assert_eq!(none.pieces::<u8>().piece(1, "hunter2-acr".into(), true).as_deref(), Some("hunter2-acr"));
    }

    /// Issue 19 (left by the twelfth session): a service's masking was
    /// replaced at each instance start, so after a rotation what an older
    /// instance printed with the old value was no longer masked.
    #[test]
    fn issue19_masking_after_a_rotation_keeps_the_old_value() {
        let (old, new) = (Secret("old-value-1".into()), Secret("new-value-2".into()));
        let r = Redactor::of_values([("api", &new)]).and(&Redactor::of_values([("api", &old)]));
        assert_eq!(r.redact("old-value-1 new-value-2"), "[secret api] [secret api]");
        let again = Redactor::of_values([("api", &new)]).and(&r);
        assert_eq!(again.values.len(), 2, "a value seen twice is kept once");
    }
}
