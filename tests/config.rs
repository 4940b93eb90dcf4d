//! Pure tests of config parsing and validation: every mistake is reported
//! with its place and a hint, several at once. Expected reports are
//! snapshot files under tests/snapshots/.

use slipway::config::{self, Command, ProblemKind, RetryOn};

fn problems(text: &str) -> String {
    let errors = config::parse("slipway.toml", text).expect_err("config should be invalid");
    let mut out = String::new();
    for r in errors.reports() {
        out.push_str(&format!("{}:{}:{} [{}] {}\n", r.file, r.line.unwrap_or(0), r.column.unwrap_or(0), r.kind.as_str(), r.message));
        if let Some(h) = r.hint {
            out.push_str(&format!("    hint: {h}\n"));
        }
    }
    out
}

#[test]
fn valid_config_parses_with_defaults() {
    let c = config::parse(
        "slipway.toml",
        r#"
[project]
name = "x"
parallelism = 3

[[environment]]
name = "staging"

[[job]]
name = "a"
command = ["./a.sh", "{version}"]
retry = { attempts = 3, on = [75], backoff = "2s" }

[[job]]
name = "b"
needs = ["a"]
shell = true
command = "echo hi | tr a-z A-Z"
timeout = "5m"
idempotent = true
"#,
    )
    .expect("valid");
    assert_eq!(c.project.parallelism, Some(3));
    let a = c.job("a").unwrap();
    assert_eq!(a.command, Command::Argv(vec!["./a.sh".into(), "{version}".into()]));
    assert_eq!(a.retry.attempts, 3);
    assert_eq!(a.retry.on, RetryOn::ExitCodes(vec![75]));
    assert!(a.retry.retryable(Some(75)));
    assert!(!a.retry.retryable(Some(1)));
    assert!(!a.retry.retryable(None));
    assert_eq!(a.timeout, config::DEFAULT_TIMEOUT);
    assert!(!a.timeout_declared);
    let b = c.job("b").unwrap();
    assert_eq!(b.command, Command::Shell("echo hi | tr a-z A-Z".into()));
    assert_eq!(b.timeout.as_secs(), 300);
    assert!(b.idempotent);
}

#[test]
fn every_unknown_key_is_reported_at_once() {
    insta::assert_snapshot!(problems(
        r#"
[project]
name = "x"
paralelism = 3

[[job]]
name = "a"
comand = ["true"]
command = ["true"]
timout = "1m"

[[job]]
name = "b"
command = ["true"]
retry = { attempts = 2, backof = "1s" }
colour = "blue"
"#
    ));
}

#[test]
fn wrong_type_is_reported_with_its_place() {
    insta::assert_snapshot!(problems(
        r#"
[[job]]
name = "a"
command = ["true"]
needs = "b"
"#
    ));
}

#[test]
fn syntax_error_has_line_and_column() {
    insta::assert_snapshot!(problems("[[job]]\nname = \"a\"\ncommand = [\"true\"\n"));
}

#[test]
fn references_cycles_and_races_are_all_reported() {
    insta::assert_snapshot!(problems(
        r#"
[[environment]]
name = "staging"

[[service]]
name = "api"

[[job]]
name = "checkout"
command = ["true"]

[[job]]
name = "build"
command = ["true"]
needs = ["chekout"]
service = "apy"
environments = ["stagin"]

[[job]]
name = "x"
command = ["true"]
needs = ["z"]

[[job]]
name = "y"
command = ["true"]
needs = ["x"]

[[job]]
name = "z"
command = ["true"]
needs = ["y"]

[[job]]
name = "self"
command = ["true"]
needs = ["self"]
"#
    ));
}

#[test]
fn unordered_writers_and_readers_are_races() {
    insta::assert_snapshot!(problems(
        r#"
[[job]]
name = "certs-a"
command = ["true"]
writes = ["tls-certs"]

[[job]]
name = "certs-b"
command = ["true"]
writes = ["tls-certs"]

[[job]]
name = "lb"
command = ["true"]
reads = ["tls-certs"]
needs = ["certs-a"]
"#
    ));
}

#[test]
fn ordered_writers_are_not_races() {
    config::parse(
        "slipway.toml",
        r#"
[[job]]
name = "a"
command = ["true"]
writes = ["r"]

[[job]]
name = "b"
command = ["true"]
writes = ["r"]
needs = ["mid"]

[[job]]
name = "mid"
command = ["true"]
needs = ["a"]

[[job]]
name = "reader"
command = ["true"]
reads = ["r"]
needs = ["b"]
"#,
    )
    .expect("transitively ordered writers and readers are fine");
}

#[test]
fn writers_in_disjoint_environments_do_not_race() {
    config::parse(
        "slipway.toml",
        r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"

[[job]]
name = "a"
command = ["true"]
writes = ["r"]
environments = ["staging"]

[[job]]
name = "b"
command = ["true"]
writes = ["r"]
environments = ["production"]
"#,
    )
    .expect("no race across environments");
}

#[test]
fn shell_rules_and_bad_values() {
    insta::assert_snapshot!(problems(
        r#"
[[job]]
name = "a"
command = "echo {version}"
shell = true

[[job]]
name = "b"
command = "echo hi"

[[job]]
name = "c"
command = ["true"]
timeout = "soon"
retry = { attempts = 0, on = "sometimes" }

[[job]]
name = "bad name!"
command = []

[[job]]
name = "a"
command = ["true"]
"#
    ));
}

#[test]
fn missing_file_is_a_clear_error() {
    let e = config::load(std::path::Path::new("/nonexistent/dir/slipway.toml")).expect_err("missing");
    let text = e.to_string();
    assert!(text.contains("cannot read /nonexistent/dir/slipway.toml"), "{text}");
}

#[test]
fn rendered_report_names_file_line_and_column() {
    let e = config::parse("conf/slipway.toml", "[[job]]\nname = \"a\"\ncommand = [\"true\"]\nneeds = [\"nope\"]\n").expect_err("invalid");
    let rendered = e.render(false);
    assert!(rendered.contains("conf/slipway.toml:4:10"), "{rendered}");
    assert!(rendered.contains("needs unknown job \"nope\""), "{rendered}");
    assert!(rendered.contains("1 problem found"), "{rendered}");
}

/// No input makes the parser panic: mutate a real config byte by byte
/// (deterministically) and parse each. The cargo-fuzz target in fuzz/
/// explores further.
#[test]
fn parser_never_panics_on_mutations() {
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo/slipway.toml")).unwrap();
    let bytes = base.as_bytes();
    let mut seed: u64 = 0x9E3779B97F4A7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"[]{}=\",.#\n abc0123-_'\\";
    for _ in 0..3000 {
        let mut m = bytes.to_vec();
        for _ in 0..(1 + next() % 4) {
            let pos = (next() as usize) % m.len().max(1);
            match next() % 3 {
                0 => m[pos] = alphabet[(next() as usize) % alphabet.len()],
                1 => {
                    m.remove(pos);
                }
                _ => m.insert(pos, alphabet[(next() as usize) % alphabet.len()]),
            }
        }
        let text = String::from_utf8_lossy(&m);
        let _ = config::parse("fuzz.toml", &text);
    }
}

#[test]
fn deep_needs_chain_does_not_overflow() {
    let mut text = String::new();
    for i in 0..5000 {
        text.push_str(&format!("[[job]]\nname = \"j{i}\"\ncommand = [\"true\"]\n"));
        if i > 0 {
            text.push_str(&format!("needs = [\"j{}\"]\n", i - 1));
        }
    }
    // and close a cycle at the end
    text.push_str("[[job]]\nname = \"loop\"\ncommand = [\"true\"]\nneeds = [\"j4999\"]\n");
    text = text.replacen("name = \"j0\"\ncommand = [\"true\"]\n", "name = \"j0\"\ncommand = [\"true\"]\nneeds = [\"loop\"]\n", 1);
    let e = config::parse("deep.toml", &text).expect_err("cycle");
    assert_eq!(e.problems.len(), 1);
    assert_eq!(e.problems[0].kind, ProblemKind::Cycle);
}

// Issue 5: secrets and registry credentials: every mistake at its place.
#[test]
fn secret_and_registry_mistakes() {
    let text = r#"
[secret.db]
env = "DB PASSWORD"

[secret.both]
env = "A"
file = "/etc/a"

[secret.relative]
file = "secrets/pw"

[secret.nowhere]

[[registry]]
host = "registry.example.org"
username = "ci"

[[registry]]
host = "https://registry.example.org/v2"
token = "tokn"

[[service]]
name = "web"
command = ["./web", "--port", "{port}"]
listen = "127.0.0.1:8080"
env = { DB = "x" }
secrets = { DB = "db", API = "api" }
secret_files = { "/run/secrets/db" = "db" }
"#;
    insta::assert_snapshot!(problems(text));
}

#[test]
fn a_docker_service_gets_the_credentials_of_its_images_registry() {
    let c = config::parse(
        "slipway.toml",
        r#"
[secret.registry]
file = "/etc/slipway/registry-password"

[secret.api]
env = "API_KEY"

[[registry]]
host = "registry.example.org:5000"
username = "ci"
password = "registry"

[[service]]
name = "web"
target = "docker"
image = "registry.example.org:5000/team/web"
port = 8080
listen = "127.0.0.1:8080"
secrets = { API_KEY = "api" }
secret_files = { "/run/secrets/api" = "api" }
migrate = { command = ["/web", "migrate"] }

[[service]]
name = "other"
target = "docker"
image = "elsewhere.example.org/web"
port = 8080
listen = "127.0.0.1:8081"
"#,
    )
    .expect("valid");
    let web = c.services[0].spec.as_ref().expect("managed");
    let image = web.image.as_ref().expect("docker");
    assert_eq!(web.target, "docker");
    let auth = image.auth.as_ref().expect("credentials for its registry");
    assert_eq!((auth.host.as_str(), auth.username.as_deref()), ("registry.example.org:5000", Some("ci")));
    assert!(matches!(&auth.password.as_ref().expect("password").source, config::secret::SecretSource::File(p) if p.ends_with("registry-password")));
    assert_eq!(web.secret_files.keys().collect::<Vec<_>>(), ["/run/secrets/api"]);
    assert_eq!(web.secrets.keys().collect::<Vec<_>>(), ["API_KEY"]);
    // The migration sees the service's secrets; the other service's
    // registry has no credentials.
    assert_eq!(c.job("web.migrate").expect("migrate job").secrets.keys().collect::<Vec<_>>(), ["API_KEY"]);
    assert!(c.services[1].spec.as_ref().and_then(|s| s.image.as_ref()).expect("docker").auth.is_none());
}

// Issue 5: the config directory is shipped as the revision: a secret's
// file inside it is refused, naming the file.
#[test]
fn a_secret_file_inside_the_config_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inside = dir.path().join("keys").join("api");
    std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
    std::fs::write(&inside, "x").unwrap();
    std::fs::write(dir.path().join("slipway.toml"), format!("[secret.api]\nfile = {:?}\n", inside.display().to_string())).unwrap();
    let e = config::load(dir.path()).expect_err("refused");
    let said = e.reports().into_iter().map(|r| format!("{}:{} {}", r.line.unwrap_or(0), r.column.unwrap_or(0), r.message)).collect::<Vec<_>>().join("\n");
    assert!(said.contains("inside the config directory") && said.contains("keys/api") && said.starts_with("2:8"), "{said}");
}

#[test]
fn secret_file_paths_and_reserved_names() {
    let text = r#"
[secret.s]
env = "S"

[[registry]]
host = "Registry.Example.org"
token = "s"

[[service]]
name = "web"
target = "docker"
image = "registry.example.org/web"
port = 8080
listen = "127.0.0.1:8080"
secrets = { SLIPWAY_TOKEN = "s" }
secret_files = { "/run//x" = "s", "/run/a" = "s", "/run/a/b" = "s", "/." = "s" }

[[service]]
name = "group"
secrets = { T = "s" }
"#;
    insta::assert_snapshot!(problems(text));
}

/// The config reference in README.md is a config Slipway accepts.
#[test]
fn the_readme_config_reference_is_valid() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let section = &readme[readme.find("## The config").expect("a config section")..];
    let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let block = &section[start..start + section[start..].find("```").expect("its end")];
    if let Err(e) = config::parse("README.md", block) {
        panic!(
            "README's config does not validate:\n{}",
            e.reports().into_iter().map(|r| format!("{}:{} {}", r.line.unwrap_or(0), r.column.unwrap_or(0), r.message)).collect::<Vec<_>>().join("\n")
        );
    }
}

// Issue 6: deploy windows in a time zone; a bad zone or window is reported
// at its place, together with the other mistakes.
#[test]
fn issue6_environment_time_zones_and_windows() {
    let c = config::parse("slipway.toml", "[[environment]]\nname = \"production\"\ntimezone = \"America/New_York\"\nwindows = [\"mon-fri 09:00-17:00\"]\n")
        .expect("valid");
    let prod = c.environment("production").expect("production");
    assert_eq!(prod.timezone.name, "America/New_York");
    assert_eq!(prod.windows_text(), "mon-fri 09:00-17:00 America/New_York");
    // 2026-11-23 (Monday) 14:00 UTC is 09:00 in New York (UTC-5).
    assert!(prod.window_open(1_795_392_000 + 14 * 3600) && !prod.window_open(1_795_392_000 + 14 * 3600 - 60));
    insta::assert_snapshot!(problems(
        "[[environment]]\nname = \"production\"\ntimezone = \"Mars/Olympus_Mons\"\nwindows = [\"24:00-02:00\", \"mon-fri 09:00-17:00\"]\n",
    ));
}

// Issue 6: `[registry_hook] hosts` are registry names, nothing else.
#[test]
fn issue6_registry_hook_hosts_are_host_names() {
    let text = "[secret.hook]\nenv = \"HOOK\"\n[registry_hook]\ntoken = \"hook\"\nhosts = [\"Registry.Internal:5000\", \"a/b\", \"$(x)\", \"myregistry\"]\n";
    let out = problems(text);
    assert!(out.contains("\"a/b\" is not a registry host") && out.contains("\"$(x)\" is not a registry host"), "{out}");
    assert!(out.contains("\"myregistry\" is not a registry host"), "a bare name is Docker Hub's: {out}");
    assert!(!out.contains("Registry.Internal"), "{out}");
    let ok = config::parse(
        "slipway.toml",
        "[secret.hook]\nenv = \"HOOK\"\n[registry_hook]\ntoken = \"hook\"\nhosts = [\"Registry.Internal:5000\", \"registry.internal:5000\", \"localhost\"]\n",
    )
    .expect("valid");
    assert_eq!(ok.registry_hook.expect("hook").hosts, ["registry.internal:5000", "localhost"]);
}

// Issue 15: host groups, and jobs and services on them: every mistake at
// its place, at once.
#[test]
fn issue15_host_groups_and_their_mistakes() {
    let text = r#"
[secret.k]
env = "K"
[secret.kh]
env = "KH"

[[hosts]]
group = "web"
addresses = ["10.0.0.11", "h;rm"]
key = "k"
known_hosts = "kh"

[[hosts]]
group = "db"
addresses = ["10.0.0.21"]
key = "k"
known_hosts = "nope"
check_every = "0s"

[[service]]
name = "api"
target = "ssh"
hosts = "web"
max_failed = 1
listen = "0.0.0.0:8080"
command = ["./api", "{port}"]

[[service]]
name = "db"
target = "ssh"
hosts = "db"
listen = "0.0.0.0:5433"
command = ["./db", "{port}"]

[[job]]
name = "j"
command = ["true"]
hosts = "webb"
batch = "200%"
"#;
    let out = problems(text);
    for want in [
        "slipway.toml:9:27 [invalid-value] invalid address \"h;rm\": not a host name or address",
        "slipway.toml:17:15 [unknown-reference] unknown secret \"nope\"",
        "slipway.toml:18:15 [invalid-value] `check_every` must be longer than zero",
        "slipway.toml:24:1 [unknown-key] unknown key `max_failed` in [[service]]",
        "slipway.toml:38:9 [unknown-reference] unknown host group \"webb\"",
        "hint: did you mean \"web\"?",
        "`batch` is a whole number of hosts (at least 1) or a percentage like \"25%\"",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    // A group declared with mistakes is not also "unknown" where it is used.
    assert!(!out.contains("unknown host group \"db\"") && !out.contains("unknown host group \"web\""), "{out}");
    // Nor is one with a type mistake.
    let typed = "[secret.k]\nenv = \"K\"\n[[hosts]]\ngroup = \"cache\"\naddresses = [\"10.0.0.31\"]\nkey = \"k\"\nknown_hosts = \"k\"\nconnect_timeout = 5\n\n[[job]]\nname = \"j\"\ncommand = [\"true\"]\nhosts = \"cache\"\n";
    let out = problems(typed);
    assert!(out.contains("slipway.toml:8:19 [wrong-type]") && !out.contains("unknown host group"), "{out}");
}

// Issue 16: services on ECS, and their mistakes: every one at its place,
// at once. (A build without the `aws` feature refuses ECS services:
// `issue16_a_build_without_aws_refuses_ecs_services`.)
#[cfg(feature = "aws")]
#[test]
fn issue16_ecs_services_and_their_mistakes() {
    let good = r#"
[aws]
region = "eu-west-1"
endpoint = "http://127.0.0.1:5000/"

[[service]]
name = "api"
target = "ecs"
cluster = "prod"
image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/api"
migrate = { command = ["bin/migrate"] }
bootstrap = { command = ["bin/setup"] }
health = { deadline = "10m" }
"#;
    let config = config::parse("slipway.toml", good).expect("valid");
    let jobs: Vec<&str> = config.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(jobs, ["api.bootstrap", "api.migrate", "api.rollout"], "ECS pulls by itself: no fetch job");
    let rollout = config.jobs.iter().find(|j| j.name == "api.rollout").unwrap();
    assert_eq!(rollout.timeout, std::time::Duration::from_secs(12 * 60), "ECS's deadline, then the revert");
    let bootstrap = config.jobs.iter().find(|j| j.name == "api.bootstrap").unwrap();
    assert!(bootstrap.once_per_environment && !config.jobs.iter().find(|j| j.name == "api.migrate").unwrap().once_per_environment);
    assert_eq!(config.jobs.iter().find(|j| j.name == "api.migrate").unwrap().needs, ["api.bootstrap"]);
    // ECS finds a cut-off task again: its steps are resumed, not lost.
    assert!(config.jobs.iter().find(|j| j.name == "api.migrate").unwrap().idempotent);
    let settings = &config.services[0].spec.as_ref().unwrap().settings;
    let v: serde_json::Value = serde_json::to_value(settings).unwrap();
    assert_eq!(v["ecs_service"], "api", "the service's name by default");
    assert_eq!(v["container"], "api");
    assert_eq!(v["aws"]["endpoint"], "http://127.0.0.1:5000", "{v}");

    let bad = r#"
[aws]
region = "EU west"
endpoint = "ftp://x"

[[service]]
name = "api"
target = "ecs"
image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/api"
listen = "127.0.0.1:8080"
container = "app;rm"
verify = { command = ["./smoke"] }
instances = 3
health = { http = "/healthz", deadline = "20m" }

[[job]]
name = "j"
target = "ecs"
command = ["true"]
"#;
    let out = problems(bad);
    for want in [
        "slipway.toml:3:10 [invalid-value] \"EU west\" is not an AWS region",
        "slipway.toml:4:12 [invalid-value] `endpoint` \"ftp://x\" is not an http(s) URL",
        "slipway.toml:10:10 [invalid-value] a service on target \"ecs\" is reached through its own load balancer, not Slipway's proxy",
        "slipway.toml:11:13 [invalid-value] `container` \"app;rm\" is not an ECS name",
        "slipway.toml:12:10 [invalid-value] `verify` is not supported on target \"ecs\" yet",
        "slipway.toml:13:13 [invalid-value] `instances` means nothing for a service on target \"ecs\"",
        "hint: the ECS service's desired count says how many tasks run",
        "slipway.toml:14:19 [invalid-value] `health.http` means nothing for a service on target \"ecs\"",
        "job \"j\" runs on target \"ecs\", which runs only a service's own steps",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    // No deadline given: ECS's own pace (old tasks drain first).
    let plain = "[[service]]\nname = \"api\"\ntarget = \"ecs\"\ncluster = \"prod\"\nimage = \"123456789012.dkr.ecr.eu-west-1.amazonaws.com/api\"\n";
    let config = config::parse("slipway.toml", plain).expect("valid");
    assert_eq!(config.services[0].spec.as_ref().unwrap().health.deadline, std::time::Duration::from_secs(30 * 60));
    let no_cluster = "[[service]]\nname = \"api\"\ntarget = \"ecs\"\nimage = \"123456789012.dkr.ecr.eu-west-1.amazonaws.com/api\"\n";
    assert!(problems(no_cluster).contains("service \"api\" runs on ECS but says not in which cluster"), "{}", problems(no_cluster));
}

// Issue 16: `[sqs] queue_url` is an SQS queue URL; a build without the
// `aws` feature refuses the table, saying so.
#[test]
fn issue16_sqs_queue_url_is_checked_and_needs_aws() {
    let ok = "[sqs]\nqueue_url = \"https://sqs.eu-west-1.amazonaws.com/123456789012/deploys\"\n";
    if cfg!(feature = "aws") {
        let c = config::parse("slipway.toml", ok).expect("valid");
        let q = c.sqs.expect("[sqs]").queue;
        assert_eq!((q.name.as_str(), q.region.as_deref()), ("deploys", Some("eu-west-1")));
        let out = problems("[sqs]\nqueue_url = \"https://sqs.eu-west-1.amazonaws.com/deploys; rm -rf /\"\nvisibility = 3\n");
        assert!(out.contains("slipway.toml:2:13 [invalid-value]") && out.contains("is not an SQS queue URL"), "{out}");
        assert!(out.contains("unknown key `visibility` in [sqs]"), "{out}");
    } else {
        let out = problems(ok);
        assert!(out.contains("[sqs] needs AWS support, and this Slipway was built without it"), "{out}");
    }
}

#[cfg(not(feature = "aws"))]
#[test]
fn issue16_a_build_without_aws_refuses_ecs_services() {
    let text = "[[service]]\nname = \"api\"\ntarget = \"ecs\"\ncluster = \"prod\"\nimage = \"123456789012.dkr.ecr.eu-west-1.amazonaws.com/api\"\n";
    assert!(problems(text).contains("runs on ECS, and this Slipway was built without AWS support"), "{}", problems(text));
}

// Issue 18: three type mistakes, an unknown key and a semantic mistake
// (an unknown `needs`), all reported in one run, in words (no
// `expected i64`).
#[test]
fn issue18_every_mistake_is_reported_in_one_run_in_words() {
    let report = problems(
        r#"
[[service]]
name = "web"
instances = "3"
listen = "127.0.0.1:8080"
command = ["./web", "--port", "{port}"]
health = { http = "/healthz", healthy_after = true, deadline = "10s" }
stop_grace = 5

[[job]]
name = "build"
command = ["make"]
needs = ["nope"]
retry = { attempts = 2, backof = "1s" }
"#,
    );
    assert!(!report.contains("i64") && !report.contains("expected"), "{report}");
    insta::assert_snapshot!(report);
}

// Issue 18: `slipway schema` is a JSON Schema every example config in the
// repository passes (the README's TOML blocks that are whole documents,
// examples/, the test fixtures) and that refuses a value of the wrong
// type, checked with Python's `jsonschema` (in the OpenAPI tools'
// virtualenv that scripts/test.sh installs).
#[test]
fn issue18_the_config_schema_accepts_every_example_and_refuses_wrong_types() {
    let dir = std::env::var_os("SLIPWAY_OPENAPI_TOOLS").map(std::path::PathBuf::from);
    let python = dir.map(|d| d.join("python3")).filter(|p| p.is_file());
    let Some(python) = python else {
        assert!(
            std::env::var("SLIPWAY_REQUIRE_OPENAPI_TOOLS").as_deref() != Ok("1"),
            "SLIPWAY_REQUIRE_OPENAPI_TOOLS=1 but no python3 in SLIPWAY_OPENAPI_TOOLS"
        );
        eprintln!("note: config schema test skipped: SLIPWAY_OPENAPI_TOOLS (scripts/test.sh) is not set");
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs: Vec<(String, String)> = Vec::new();
    for f in ["examples/demo/slipway.toml", "tests/fixtures/plan-demo.toml", "tests/fixtures/upgrade/config/slipway.toml"] {
        docs.push((f.to_string(), std::fs::read_to_string(root.join(f)).expect(f)));
    }
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    for (i, block) in readme.split("```toml\n").skip(1).enumerate() {
        let block = block.split("```").next().unwrap_or_default();
        // Blocks with placeholders ("…") are sketches, not documents.
        if toml::from_str::<toml::Table>(block).is_ok() {
            docs.push((format!("README.md toml block {}", i + 1), block.to_string()));
        }
    }
    assert!(docs.len() >= 5, "examples found: {:?}", docs.iter().map(|d| &d.0).collect::<Vec<_>>());
    // A wrong type the schema must refuse.
    docs.push(("(wrong on purpose)".into(), "[[service]]\nname = \"web\"\ninstances = \"3\"\n".into()));
    let schema = std::process::Command::new(env!("CARGO_BIN_EXE_slipway")).arg("schema").output().expect("slipway schema");
    assert!(schema.status.success());
    let input = serde_json::json!({"schema": serde_json::from_slice::<serde_json::Value>(&schema.stdout).expect("JSON"), "docs": docs});
    let script = r#"
import json, sys, tomllib, jsonschema
data = json.load(sys.stdin)
jsonschema.Draft202012Validator.check_schema(data["schema"])
v = jsonschema.Draft202012Validator(data["schema"])
out = {}
for name, text in data["docs"]:
    out[name] = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in v.iter_errors(tomllib.loads(text))]
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(input.to_string().as_bytes()).expect("write");
    let out = child.wait_with_output().expect("python3 ran");
    assert!(out.status.success(), "python3: {}", String::from_utf8_lossy(&out.stderr));
    let errors: std::collections::BTreeMap<String, Vec<String>> = serde_json::from_slice(&out.stdout).expect("JSON");
    for (name, errs) in &errors {
        if name == "(wrong on purpose)" {
            assert!(errs.iter().any(|e| e.contains("service/0/instances") && e.contains("integer")), "{errs:?}");
        } else {
            assert!(errs.is_empty(), "{name} does not pass the schema: {errs:#?}");
        }
    }
}
