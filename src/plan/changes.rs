//! Which jobs a new config revision runs: those whose `files` globs match
//! a changed path, and everything that needs them. Pure.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// A job a change runs, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touched {
    pub job: String,
    pub why: String,
}

/// The jobs of `env` that the changed `paths` run, in config order. A job
/// without `files` runs only because something it needs runs.
pub fn touched(config: &Config, env: &str, paths: &[String]) -> Vec<Touched> {
    let in_env = |j: &crate::config::Job| j.environments.as_ref().is_none_or(|e| e.iter().any(|e| e == env));
    let mut why: BTreeMap<String, String> = BTreeMap::new();
    for job in config.jobs.iter().filter(|j| in_env(j) && !j.files.is_empty()) {
        let mut builder = globset::GlobSetBuilder::new();
        for f in &job.files {
            // Validated at load; a pattern that fails here matches nothing.
            if let Ok(g) = globset::GlobBuilder::new(f).literal_separator(true).build() {
                builder.add(g);
            }
        }
        let Ok(set) = builder.build() else { continue };
        let hits: Vec<&String> = paths.iter().filter(|p| set.is_match(p.as_str())).collect();
        if let Some(first) = hits.first() {
            let more = if hits.len() > 1 { format!(" and {} more", hits.len() - 1) } else { String::new() };
            why.insert(job.name.clone(), format!("{first}{more} changed (files = {:?})", job.files));
        }
    }
    // Everything downstream of a touched job runs after it.
    let mut frontier: Vec<String> = why.keys().cloned().collect();
    let mut seen: BTreeSet<String> = frontier.iter().cloned().collect();
    while let Some(done) = frontier.pop() {
        for job in config.jobs.iter().filter(|j| in_env(j) && j.needs.contains(&done)) {
            if seen.insert(job.name.clone()) {
                why.insert(job.name.clone(), format!("needs {done}"));
                frontier.push(job.name.clone());
            }
        }
    }
    config.jobs.iter().filter(|j| why.contains_key(&j.name)).map(|j| Touched { job: j.name.clone(), why: why[&j.name].clone() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[job]]
name = "nginx"
command = ["true"]
files = ["nginx/**"]

[[job]]
name = "schema"
command = ["true"]
files = ["db/*.sql", "db/seed/**"]

[[job]]
name = "reload"
command = ["true"]
needs = ["nginx"]

[[job]]
name = "smoke"
command = ["true"]
needs = ["reload", "schema"]

[[job]]
name = "backup"
command = ["true"]
"#;

    fn names(config: &Config, paths: &[&str]) -> Vec<String> {
        touched(config, "default", &paths.iter().map(|p| p.to_string()).collect::<Vec<_>>()).into_iter().map(|t| t.job).collect()
    }

    #[test]
    fn a_change_runs_the_matching_jobs_and_what_needs_them() {
        let c = crate::config::parse("t", CONFIG).unwrap();
        assert_eq!(names(&c, &["nginx/site.conf"]), ["nginx", "reload", "smoke"]);
        assert_eq!(names(&c, &["db/001.sql"]), ["schema", "smoke"]);
        assert_eq!(names(&c, &["db/sub/002.sql"]), Vec::<String>::new(), "* stays within a directory");
        assert_eq!(names(&c, &["README.md"]), Vec::<String>::new());
        assert_eq!(names(&c, &["db/seed/a/b.csv", "nginx/x"]), ["nginx", "schema", "reload", "smoke"]);
        let t = touched(&c, "default", &["nginx/a".into(), "nginx/b".into()]);
        assert_eq!(t[0].why, "nginx/a and 1 more changed (files = [\"nginx/**\"])");
        assert_eq!(t[1].why, "needs nginx");
    }

    #[test]
    fn an_exact_plan_runs_only_the_touched_jobs() {
        let c = crate::config::parse("t", CONFIG).unwrap();
        let jobs = names(&c, &["db/001.sql"]);
        let plan = super::super::build(&c, "default", &super::super::Selection::Exactly { jobs }, 4, &Default::default()).unwrap();
        let planned: Vec<&str> = plan.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(planned, ["schema", "smoke"], "reload and nginx are not run");
        assert_eq!(plan.jobs[1].needs, vec![0]);
    }
}
