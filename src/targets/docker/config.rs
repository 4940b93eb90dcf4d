//! The docker target's part of `[[service]]`: its keys, read from the
//! service's table, and the settings they become.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::{Problem, ProblemKind};
use crate::targets::{Key, KeyTable};

/// What a service's containers get beyond the common keys. Stored with
/// the service's spec (as `settings`): the names here are a stored format,
/// the same as the `container` of format `service/1` rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The port the service listens on inside the container.
    pub port: u16,
    pub memory_bytes: Option<u64>,
    /// Thousandths of a CPU.
    pub millicpus: Option<u32>,
}

pub const KEYS: &[Key] = &[
    Key { name: "port", kind: "integer", doc: "the port the service listens on inside its container (published on 127.0.0.1)" },
    Key { name: "memory", kind: "string", doc: "memory limit: \"256m\", \"1g\", \"512k\" or bytes (at least 6m)" },
    Key { name: "cpus", kind: "float", doc: "CPU limit, in CPUs (0.5 = half a CPU)" },
];

/// The keys as written (other keys of the table are ignored here).
#[derive(Deserialize)]
struct Raw {
    name: Spanned<String>,
    port: Option<Spanned<i64>>,
    memory: Option<Spanned<String>>,
    cpus: Option<Spanned<f64>>,
}

pub fn read(table: &mut KeyTable<'_, '_>) -> Option<Settings> {
    let raw: Raw = table.read()?;
    let name = raw.name.get_ref();
    let port = match &raw.port {
        Some(p) if (1..=65535).contains(p.get_ref()) => Some(*p.get_ref() as u16),
        Some(p) => {
            table.problem(Problem::new(ProblemKind::InvalidValue, Some(p.span()), format!("`port` {} is not a port", p.get_ref())).label("1–65535"));
            None
        }
        None => {
            table.problem(
                Problem::new(ProblemKind::MissingKey, Some(raw.name.span()), format!("docker service {name:?} has no `port`"))
                    .label("this service")
                    .hint("add port = 8080: the port the service listens on inside its container"),
            );
            None
        }
    };
    let millicpus = raw.cpus.as_ref().and_then(|c| {
        let v = *c.get_ref();
        if v > 0.0 && v <= 1024.0 {
            Some((v * 1000.0).round() as u32)
        } else {
            table.problem(Problem::new(ProblemKind::InvalidValue, Some(c.span()), format!("`cpus` {v} is not between 0 and 1024")).label("out of range"));
            None
        }
    });
    let memory_bytes = raw.memory.as_ref().and_then(|m| crate::config::service::memory(m, table.problems));
    Some(Settings { port: port?, memory_bytes, millicpus })
}
