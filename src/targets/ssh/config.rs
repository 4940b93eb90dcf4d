//! The ssh target's part of `slipway.toml`: `[[hosts]]` groups, and the
//! `hosts` / `batch` / `max_failed` keys of a job. A job's settings carry
//! its whole group (addresses, user, where the key and the pinned host
//! keys are read from), so a deployment runs against the hosts of its
//! pinned revision, whatever the config says later.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::secret::SecretRef;
use crate::config::{Problem, ProblemKind};
use crate::targets::{ConfigTables, Key, KeyTable, Settings, TableKeys};

pub const HOSTS: TableKeys = TableKeys {
    name: "hosts",
    array: true,
    keys: &[
        Key { name: "group", kind: "string", doc: "the group's name, used by `hosts = \"…\"` in jobs and services" },
        Key {
            name: "addresses",
            kind: "array",
            doc: "each member: \"host\" or \"host:port\" (port 22 by default), or { name = \"web-2\", address = \"10.0.0.12\" } to call it by a name of its own",
        },
        Key { name: "user", kind: "string", doc: "the user to log in as (default \"root\")" },
        Key { name: "key", kind: "string", doc: "the [secret.*] holding the private key (OpenSSH format)" },
        Key { name: "known_hosts", kind: "string", doc: "the [secret.*] holding the hosts' keys, known_hosts format; an unknown or changed key is refused" },
        Key { name: "connect_timeout", kind: "string", doc: "bound on connecting and logging in (default \"5s\")" },
        Key { name: "dir", kind: "string", doc: "where Slipway keeps its files on each host (default \".slipway\", in the user's home)" },
        Key {
            name: "check_every",
            kind: "string",
            doc: "how often each node asks every host's supervisor how it is (default \"30s\"); a supervisor that died is started again and takes its services back",
        },
    ],
    doc: "a group of SSH hosts",
};

pub const JOB_KEYS: &[Key] = &[
    Key { name: "hosts", kind: "string", doc: "run on every host of this [[hosts]] group" },
    Key { name: "batch", kind: "integer or string", doc: "hosts at a time: a number or a percentage (\"25%\"); default all" },
    Key { name: "max_failed", kind: "integer or string", doc: "failed hosts tolerated: a number or a percentage (\"10%\"); default 0" },
];

pub const SERVICE_KEYS: &[Key] = &[
    Key { name: "hosts", kind: "string", doc: "run the service on every host of this [[hosts]] group, each behind its own proxy" },
    Key { name: "batch", kind: "integer or string", doc: "hosts rolled out at a time: a number or a percentage (\"25%\"); default 1" },
];

/// A group as the config wrote it, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub hosts: Vec<Host>,
    pub user: String,
    pub key: SecretRef,
    pub known_hosts: SecretRef,
    pub connect_timeout_ms: u64,
    pub dir: String,
    /// How often nodes check the group's hosts (`Target::tend`).
    #[serde(default = "default_check_every_ms")]
    pub check_every_ms: u64,
}

fn default_check_every_ms() -> u64 {
    DEFAULT_CHECK_EVERY.as_millis() as u64
}

pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// How people and the record name it: the address without its port.
    pub name: String,
    /// "host:port".
    pub address: String,
}

impl Group {
    pub fn check_every(&self) -> Duration {
        Duration::from_millis(self.check_every_ms.max(1))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
}

/// A number of hosts, or a percentage of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// For a batch: at least one host.
    pub fn batch_of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => (n as usize).clamp(1, total.max(1)),
            Amount::Percent(p) => (total * p as usize).div_ceil(100).clamp(1, total.max(1)),
        }
    }

    /// For failures tolerated: rounded down (10% of 5 hosts is none).
    pub fn tolerated_of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => total * p as usize / 100,
        }
    }
}

/// What a job on hosts runs against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSettings {
    pub group: Group,
    /// `None`: every host at once (a job), one at a time (a service).
    pub batch: Option<Amount>,
    pub max_failed: Amount,
    /// A service's own jobs (its migration): once, on one host.
    #[serde(default)]
    pub one_host: bool,
}

#[derive(Deserialize)]
struct RawGroup {
    group: Option<Spanned<String>>,
    addresses: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    user: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    dir: Option<Spanned<String>>,
    check_every: Option<Spanned<String>>,
}

/// What the kind reads from `[[hosts]]`: the groups, and the names of
/// those declared with mistakes (already reported: a job naming one is not
/// told the group does not exist).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Groups {
    pub groups: BTreeMap<String, Group>,
    #[serde(default)]
    pub broken: std::collections::BTreeSet<String>,
}

impl Groups {
    pub fn of(tables: &Settings) -> Groups {
        tables.get().unwrap_or_default()
    }
}

/// `[[hosts]]`, every group; problems each at its place.
pub fn read_groups(cx: &mut ConfigTables<'_, '_>) -> Option<Settings> {
    let mut read = Groups::default();
    for table in cx.tables("hosts") {
        let Some(raw) = cx.read::<RawGroup>(&table) else {
            // A type mistake (reported): its users are not also told the
            // group does not exist.
            if let Some(name) = table.get_ref().get("group").and_then(|g| g.get_ref().as_str()) {
                read.broken.insert(name.to_string());
            }
            continue;
        };
        let name = raw.group.as_ref().map(|n| n.get_ref().clone());
        match group(raw, table.span(), cx) {
            Some(g) if read.groups.contains_key(&g.name) => {
                cx.problem(Problem::new(ProblemKind::Duplicate, Some(table.span()), format!("host group {:?} is declared twice", g.name)).label("again"));
            }
            Some(g) => {
                // Hosts are named in `logs --host` and `hosts drain`: one
                // name, one host, across every group.
                for h in &g.hosts {
                    if let Some(other) = read.groups.values().find(|o| o.hosts.iter().any(|x| x.name == h.name && x.address != h.address)) {
                        cx.problem(
                            Problem::new(ProblemKind::Duplicate, Some(table.span()), format!("host name {:?} names two hosts (also in group {:?})", h.name, other.name))
                                .label("this group")
                                .hint("give one of them another name: { name = \"…\", address = \"…\" }"),
                        );
                    }
                }
                read.groups.insert(g.name.clone(), g);
            }
            None => read.broken.extend(name),
        }
    }
    // No [[hosts]] at all: nothing (the node then has no machines to tend).
    if read.groups.is_empty() && read.broken.is_empty() {
        return None;
    }
    Some(Settings::of(&read))
}

fn group(raw: RawGroup, span: std::ops::Range<usize>, cx: &mut ConfigTables<'_, '_>) -> Option<Group> {
    let missing = |cx: &mut ConfigTables<'_, '_>, key: &str, hint: &str| {
        cx.problem(Problem::new(ProblemKind::MissingKey, Some(span.clone()), format!("a [[hosts]] group has no `{key}`")).label("this group").hint(hint));
    };
    let Some(name) = raw.group else {
        missing(cx, "group", "add group = \"web\": jobs name it with hosts = \"web\"");
        return None;
    };
    if !crate::config::valid_name(name.get_ref()) {
        cx.problem(
            Problem::new(ProblemKind::InvalidValue, Some(name.span()), format!("invalid group name {:?}", name.get_ref()))
                .label("not a name")
                .hint("letters, digits, '-', '_' and '.'"),
        );
    }
    let mut hosts: Vec<Host> = Vec::new();
    match &raw.addresses {
        None => missing(cx, "addresses", "add addresses = [\"10.0.0.11\", \"web-2.example.org:2222\"]"),
        Some(a) if a.get_ref().is_empty() => {
            cx.problem(Problem::new(ProblemKind::InvalidValue, Some(a.span()), format!("host group {:?} has no addresses", name.get_ref())).label("empty"));
        }
        Some(a) => {
            for entry in a.get_ref() {
                match member(entry.get_ref()) {
                    Ok(h) if hosts.iter().any(|x| x.name == h.name) => cx.problem(
                        Problem::new(ProblemKind::Duplicate, Some(entry.span()), format!("host {:?} is twice in group {:?}", h.name, name.get_ref())).label("again"),
                    ),
                    Ok(h) => hosts.push(h),
                    Err(why) => cx.problem(
                        Problem::new(ProblemKind::InvalidValue, Some(entry.span()), why)
                            .label("not an address")
                            .hint("e.g. \"10.0.0.11\", \"web-2.example.org:2222\", \"[fd00::2]:22\", { name = \"web-2\", address = \"10.0.0.12\" }"),
                    ),
                }
            }
        }
    }
    let key = match &raw.key {
        Some(k) => crate::config::secret::lookup(k, cx.secrets, cx.problems),
        None => {
            missing(cx, "key", "add key = \"deploy_key\", a [secret.deploy_key] holding the private key");
            None
        }
    };
    let known_hosts = match &raw.known_hosts {
        Some(k) => crate::config::secret::lookup(k, cx.secrets, cx.problems),
        None => {
            missing(cx, "known_hosts", "add known_hosts = \"ssh_known_hosts\", a [secret.ssh_known_hosts] holding the hosts' keys (ssh-keyscan output, checked)");
            None
        }
    };
    let connect_timeout = match &raw.connect_timeout {
        Some(t) => crate::config::duration(t, "connect_timeout", cx.problems)?,
        None => Duration::from_secs(5),
    };
    let check_every = match &raw.check_every {
        Some(t) => crate::config::duration(t, "check_every", cx.problems)?,
        None => DEFAULT_CHECK_EVERY,
    };
    let user = raw.user.as_ref().map(|u| u.get_ref().clone()).unwrap_or_else(|| "root".to_string());
    if let Some(u) = &raw.user
        && (u.get_ref().is_empty() || !u.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        cx.problem(Problem::new(ProblemKind::InvalidValue, Some(u.span()), format!("invalid user name {:?}", u.get_ref())).label("not a user name"));
    }
    let dir = raw.dir.as_ref().map(|d| d.get_ref().clone()).unwrap_or_else(|| ".slipway".to_string());
    if let Some(d) = &raw.dir
        && (d.get_ref().is_empty() || d.get_ref().contains(['\n', '\0', '\'']))
    {
        cx.problem(Problem::new(ProblemKind::InvalidValue, Some(d.span()), format!("invalid dir {:?}", d.get_ref())).label("not a usable path"));
    }
    if hosts.is_empty() {
        return None;
    }
    Some(Group {
        name: name.get_ref().clone(),
        hosts,
        user,
        key: key?,
        known_hosts: known_hosts?,
        connect_timeout_ms: connect_timeout.as_millis() as u64,
        dir,
        check_every_ms: check_every.as_millis() as u64,
    })
}

/// One entry of `addresses`: an address (named by itself) or `{ name,
/// address }`.
fn member(v: &toml::Value) -> Result<Host, String> {
    match v {
        toml::Value::String(s) => host(s).map_err(|why| format!("invalid address {s:?}: {why}")),
        toml::Value::Table(t) => {
            if let Some(k) = t.keys().find(|k| !["name", "address"].contains(&k.as_str())) {
                return Err(format!("unknown key `{k}` in a host (name, address)"));
            }
            let (Some(toml::Value::String(n)), Some(toml::Value::String(a))) = (t.get("name"), t.get("address")) else {
                return Err("a named host needs name and address, both strings".into());
            };
            if !crate::config::valid_name(n) {
                return Err(format!("invalid host name {n:?}: letters, digits, '-', '_' and '.'"));
            }
            let h = host(a).map_err(|why| format!("invalid address {a:?}: {why}"))?;
            Ok(Host { name: n.clone(), ..h })
        }
        other => Err(format!("a host is an address string or {{ name, address }}, not {}", other.type_str())),
    }
}

/// "host", "host:port", "[v6]" or "[v6]:port" → its name and "host:port".
fn host(s: &str) -> Result<Host, &'static str> {
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("an IPv6 address needs its closing ]")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("unexpected text after ]"),
        };
        (h, port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err("an IPv6 address goes in brackets: [fd00::2]:22"),
            None => (s, None),
        }
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c)) {
        return Err("not a host name or address");
    }
    let port: u16 = match port {
        None => 22,
        Some(p) => p.parse().ok().filter(|p| *p > 0).ok_or("the port is not a number from 1 to 65535")?,
    };
    let address = if name.contains(':') { format!("[{name}]:{port}") } else { format!("{name}:{port}") };
    Ok(Host { name: name.to_string(), address })
}

#[derive(Deserialize)]
struct RawJob {
    hosts: Option<Spanned<String>>,
    batch: Option<Spanned<toml::Value>>,
    max_failed: Option<Spanned<toml::Value>>,
}

/// A service's `hosts` and `batch`: the settings of its rollout, and of
/// its migration, which runs once, on one host.
pub fn read_service(table: &mut KeyTable<'_, '_>) -> Option<Settings> {
    let settings: JobSettings = read_job(table)?.get().ok()?;
    Some(Settings::of(&JobSettings { one_host: true, ..settings }))
}

pub fn read_job(table: &mut KeyTable<'_, '_>) -> Option<Settings> {
    let raw: RawJob = table.read()?;
    let Groups { groups, broken } = Groups::of(table.kind);
    // Each key checked on its own, so every mistake is reported at once.
    let batch = raw.batch.as_ref().map(|b| amount(b, "batch", 1, table));
    let max_failed = raw.max_failed.as_ref().map(|m| amount(m, "max_failed", 0, table));
    let Some(name) = raw.hosts else {
        table.problem(
            Problem::new(ProblemKind::MissingKey, Some(table.table.span()), format!("{} runs on SSH hosts but says not which", table.owner))
                .label("this job")
                .hint("add hosts = \"web\", a [[hosts]] group"),
        );
        return None;
    };
    let Some(group) = groups.get(name.get_ref()).cloned() else {
        if broken.contains(name.get_ref()) {
            return None; // its mistakes are reported where it is declared
        }
        let hint = match crate::config::did_you_mean(name.get_ref(), groups.keys().map(String::as_str)) {
            Some(s) => format!("did you mean {s:?}?"),
            None if groups.is_empty() => "declare it: [[hosts]] with group, addresses, key and known_hosts".to_string(),
            None => format!("groups: {}", groups.keys().cloned().collect::<Vec<_>>().join(", ")),
        };
        table.problem(
            Problem::new(ProblemKind::UnknownReference, Some(name.span()), format!("unknown host group {:?}", name.get_ref())).label("no such group").hint(hint),
        );
        return None;
    };
    let batch = match batch {
        Some(b) => Some(b?),
        None => None,
    };
    let max_failed = max_failed.unwrap_or(Some(Amount::Count(0)))?;
    Some(Settings::of(&JobSettings { group, batch, max_failed, one_host: false }))
}

/// A count (at least `min`) or "N%" (1–100).
fn amount(v: &Spanned<toml::Value>, key: &str, min: i64, table: &mut KeyTable<'_, '_>) -> Option<Amount> {
    let bad = |table: &mut KeyTable<'_, '_>| {
        table.problem(
            Problem::new(ProblemKind::InvalidValue, Some(v.span()), format!("`{key}` is a whole number of hosts (at least {min}) or a percentage like \"25%\""))
                .label("not a count or percentage"),
        );
        None
    };
    match v.get_ref() {
        toml::Value::Integer(n) if *n >= min && *n <= 100_000 => Some(Amount::Count(*n as u32)),
        toml::Value::String(s) => match s.strip_suffix('%').and_then(|p| p.trim().parse::<u32>().ok()) {
            Some(p) if (1..=100).contains(&p) || (min == 0 && p == 0) => Some(Amount::Percent(p)),
            _ => bad(table),
        },
        _ => bad(table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_their_names() {
        assert_eq!(host("10.0.0.11").unwrap(), Host { name: "10.0.0.11".into(), address: "10.0.0.11:22".into() });
        assert_eq!(host("web-2.example.org:2222").unwrap(), Host { name: "web-2.example.org".into(), address: "web-2.example.org:2222".into() });
        assert_eq!(host("[fd00::2]:2200").unwrap(), Host { name: "fd00::2".into(), address: "[fd00::2]:2200".into() });
        for bad in ["", "a b", "h:0", "h:99999", "fd00::2", "[fd00::2", "h;rm"] {
            assert!(host(bad).is_err(), "{bad:?} accepted");
        }
        let named = |t: &str| member(&toml::from_str::<toml::Table>(&format!("m = {t}")).unwrap()["m"]);
        assert_eq!(named(r#"{ name = "web-2", address = "10.0.0.12:2222" }"#).unwrap(), Host { name: "web-2".into(), address: "10.0.0.12:2222".into() });
        assert_eq!(named(r#""10.0.0.12""#).unwrap(), Host { name: "10.0.0.12".into(), address: "10.0.0.12:22".into() });
        for (bad, says) in [
            (r#"{ name = "web 2", address = "10.0.0.12" }"#, "invalid host name"),
            (r#"{ name = "web-2" }"#, "needs name and address"),
            (r#"{ name = "web-2", address = "10.0.0.12", port = 22 }"#, "unknown key `port`"),
            (r#"{ name = "web-2", address = "h;rm" }"#, "invalid address"),
            ("22", "not integer"),
        ] {
            let e = named(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn batches_and_tolerances_of_a_group() {
        assert_eq!(Amount::Percent(25).batch_of(20), 5);
        assert_eq!(Amount::Percent(25).batch_of(3), 1);
        assert_eq!(Amount::Count(50).batch_of(20), 20);
        assert_eq!(Amount::Percent(10).tolerated_of(20), 2);
        assert_eq!(Amount::Percent(10).tolerated_of(5), 0);
        assert_eq!(Amount::Count(1).tolerated_of(20), 1);
    }
}
