//! The target seam holds (issue 14): the scheduler, the executor and the
//! service manager name no concrete target, and every target lives in its
//! own folder under `src/targets/`, registered in one line.
//!
//! A target's name is its folder's name; naming it means writing it as a
//! string (`"docker"`), a path (`docker::`) or its type (`DockerTarget`).
//! Comments are not code and are skipped.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The registered targets: the folders under src/targets/.
fn targets() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("src/targets"))
        .expect("src/targets")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).filter_map(|e| e.ok()) {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a line: what comes before a `//` comment.
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(i) if !line[..i].ends_with(':') => &line[..i],
        _ => line,
    }
}

fn camel(name: &str) -> String {
    let mut c = name.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

/// Every place in `dirs` (but `src/targets/`, and unit tests) that names
/// a registered target: as a string, a path or its type.
fn namings(dirs: &[&str]) -> Vec<String> {
    let names = targets();
    let mut files = Vec::new();
    for d in dirs {
        rust_files(&root().join(d), &mut files);
    }
    files.retain(|f| !f.starts_with(root().join("src/targets")));
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        // Unit tests sit at the end of a file, after `#[cfg(test)]`.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let line = code(line);
            for name in &names {
                let forms = [format!("\"{name}\""), format!("{name}::"), format!("{}Target", camel(name))];
                if let Some(form) = forms.iter().find(|form| line.contains(form.as_str())) {
                    found.push(format!("{}:{}: names target {name} ({form}): {}", f.strip_prefix(root()).unwrap_or(&f).display(), n + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn issue14_the_scheduler_executor_and_service_manager_name_no_target() {
    let names = targets();
    assert!(names.contains(&"local".to_string()) && names.len() >= 2, "targets found: {names:?}");
    let found = namings(&["src/scheduler", "src/executor", "src/service"]);
    assert!(found.is_empty(), "these must ask Targets by the spec's name, or a target's Capabilities, instead:\n{}", found.join("\n"));
}

/// Outside src/targets/: the two places that name a target on purpose.
/// Format 1 rows predate targets in specs (a `container` there meant
/// docker), and an audit entry's address "local" is not a target.
const ALLOWED: &[(&str, &str)] = &[("src/store/spec.rs", "const V1_CONTAINER_TARGET"), ("src/cli/mod.rs", "address: \"local\".into()")];

#[test]
fn issue14_nothing_outside_src_targets_names_a_target() {
    let found: Vec<String> =
        namings(&["src"]).into_iter().filter(|f| !ALLOWED.iter().any(|(file, code)| f.starts_with(&format!("{file}:")) && f.contains(code))).collect();
    assert!(found.is_empty(), "only a target's own folder names it; elsewhere ask Targets, a TargetKind or Capabilities:\n{}", found.join("\n"));
}

#[test]
fn issue14_every_target_folder_is_registered_in_one_line() {
    let module = std::fs::read_to_string(root().join("src/targets/mod.rs")).expect("src/targets/mod.rs");
    let line = module.lines().find(|l| l.starts_with("registry!(")).expect("a `registry!(…);` line in src/targets/mod.rs");
    let listed: Vec<String> =
        line.trim_start_matches("registry!(").trim_end_matches(");").split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, targets(), "the folders under src/targets/ and the registry line differ: {line}");
    for name in &listed {
        let kind = slipway::targets::kind(name).unwrap_or_else(|| panic!("{name} is listed but not registered under its folder's name"));
        assert_eq!(kind.name(), name);
    }
}

#[test]
// The unknown-key check, the JSON Schema and the docs take a target's keys
// from its kind: one list. A key of one target on another's service is
// refused, naming the target it belongs to.
fn issue14_a_targets_keys_come_from_its_kind() {
    for kind in slipway::targets::kinds() {
        for key in kind.service_keys() {
            let other = slipway::targets::kinds().iter().find(|k| !k.service_keys().iter().any(|x| x.name == key.name));
            let Some(other) = other else { continue };
            let toml = format!(
                "[[service]]\nname = \"web\"\ntarget = \"{}\"\ncommand = [\"./web\", \"{{port}}\"]\nlisten = \"127.0.0.1:8080\"\n{} = {}\n",
                other.name(),
                key.name,
                match key.kind {
                    "integer" => "8080",
                    "float" => "0.5",
                    _ => "\"x\"",
                }
            );
            let err = slipway::config::parse("slipway.toml", &toml).expect_err("a foreign key is refused");
            let wanted = format!("`{}` is a key of target \"{}\"", key.name, kind.name());
            assert!(err.problems.iter().any(|p| p.message.contains(&wanted)), "{}: {:?}", key.name, err.problems);
        }
    }
}

#[test]
// `slipway targets` lists every registered kind from the same source as
// the config's key check: names, capabilities and keys.
fn issue14_slipway_targets_lists_every_kind_with_its_keys() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slipway")).args(["--json", "targets"]).output().expect("run slipway targets");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let listed = listed.as_array().expect("a list");
    assert_eq!(listed.len(), slipway::targets::kinds().len());
    for (item, kind) in listed.iter().zip(slipway::targets::kinds()) {
        assert_eq!(item["name"], kind.name());
        assert_eq!(item["default"], kind.name() == slipway::targets::DEFAULT);
        assert_eq!(item["capabilities"]["uses_images"], kind.capabilities().uses_images);
        let keys: Vec<&str> = item["keys"].as_array().expect("keys").iter().filter_map(|k| k["name"].as_str()).collect();
        assert_eq!(keys, kind.service_keys().iter().map(|k| k.name).collect::<Vec<_>>());
    }
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_slipway")).arg("targets").output().expect("run slipway targets");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("local (the default):") && text.contains("key port (integer)"), "{text}");
}
