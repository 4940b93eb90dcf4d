//! Issue 13, store schema upgrades: a store made by the build before
//! numbered migrations (commit d43299a; tests/fixtures/upgrade, made by its
//! make-fixture.sh) is opened by this build, and everything in it is still
//! there and usable: status, logs, why, the waiting deployment's approval,
//! rollback to the recorded previous version, the tokens. Same for
//! PostgreSQL, from a pg_dump of a store that build made. And a store
//! migrated further than this build knows is refused, with both versions.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Server;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade")
}

/// The fixture's config exactly as the old build saw it (same revision).
/// Its ports (recorded in the stored specs) are below both the kernel's
/// ephemeral range and `common::free_port`'s, so nothing else takes them.
fn config_for(kind: &str) -> (tempfile::TempDir, u16) {
    let port: u16 = std::fs::read_to_string(fixtures().join(kind).join("port.txt")).expect("port.txt").trim().parse().expect("a port");
    let text = std::fs::read_to_string(fixtures().join("config/slipway.toml"))
        .expect("fixture config")
        .replace("__PORT2__", &(port + 1).to_string())
        .replace("__PORT__", &port.to_string());
    (common::config_dir(&text, &[]), port)
}

fn tokens(kind: &str) -> HashMap<String, String> {
    std::fs::read_to_string(fixtures().join(kind).join("tokens.txt"))
        .expect("tokens.txt")
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(n, t)| (n.to_string(), t.to_string())))
        .collect()
}

/// `slipway-demo` (the fixture's service) is found on PATH.
fn path_with_demo() -> String {
    let demo = PathBuf::from(common::demo_bin());
    format!("{}:{}", demo.parent().expect("bin dir").display(), std::env::var("PATH").unwrap_or_default())
}

fn cli(server: &Server, config: &Path, token: &str, args: &[&str]) -> (i32, String) {
    let out = server.cli_command(config, args).env("SLIPWAY_TOKEN", token).env("PATH", path_with_demo()).output().expect("run slipway");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Poll `f` for up to a minute; on timeout, fail with the server's log.
fn wait_for<T>(server: &Server, what: &str, f: impl FnMut() -> Option<T>) -> T {
    common::wait_for_diag(Duration::from_secs(60), what, || format!("the server's log:\n{}", server.log_text()), f)
}

fn http_get(port: u16) -> Option<String> {
    let out = Command::new("curl").args(["-sf", "--max-time", "2", &format!("http://127.0.0.1:{port}/")]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What the old build left must read and act the same under this one.
fn everything_is_still_there_and_usable(kind: &str, store: Option<&str>) {
    let (config, port) = config_for(kind);
    let t = tokens(kind);
    let server = Server::start_with_env(config.path(), store, &[], &[("PATH", &path_with_demo())]);
    let diag = || server.log_text();

    // The service the old build ran comes back at its recorded version,
    // from its recorded spec (written untagged by the old build).
    let answer = wait_for(&server, "web 2 restored on its listen address", || http_get(port).filter(|a| a.ends_with(" 2")));
    assert!(answer.contains("demo"), "{answer}");

    let (code, status) = cli(&server, config.path(), &t["root"], &["status"]);
    assert_eq!(code, 0, "status: {status}\n{}", diag());
    assert!(status.contains("web") && status.contains("waiting for approval"), "status misses the old record:\n{status}");
    let staging = status.lines().find(|l| l.starts_with("staging") && l.contains("web")).unwrap_or_else(|| panic!("no staging web line:\n{status}"));
    let cols: Vec<&str> = staging.split_whitespace().collect();
    assert_eq!((cols[2], cols[3]), ("2", "1"), "version and previous version: {staging}");

    let (code, logs) = cli(&server, config.path(), &t["root"], &["logs", "3", "hello"]);
    assert_eq!(code, 0, "{logs}");
    assert!(logs.contains("hello from the old build"), "the old run's output is gone:\n{logs}");

    let (code, why) = cli(&server, config.path(), &t["root"], &["why", "web", "--env", "staging"]);
    assert_eq!(code, 0, "{why}");
    assert!(why.contains("runs 2") && why.contains("#2"), "why: {why}");

    // Tokens: the old ones still work as they did, the revoked one not.
    let (code, out) = cli(&server, config.path(), &t["ci"], &["status"]);
    assert_eq!(code, 0, "the ci token no longer reads: {out}");
    let (code, out) = cli(&server, config.path(), &t["ci"], &["deploy", "web", "1", "--env", "production", "--detach"]);
    assert_eq!(code, 7, "ci is a deployer of staging only: {out}");
    let (code, out) = cli(&server, config.path(), &t["gone"], &["status"]);
    assert_eq!(code, 7, "a token revoked by the old build works again: {out}");

    // The hold the old build stored: approved now, it deploys (as itself,
    // or as its copy on the config's newer revision: the server's log in
    // the config directory is part of the revision).
    let (code, out) = cli(&server, config.path(), &t["approver"], &["approve", "4"]);
    assert_eq!(code, 0, "approve the old build's waiting deployment: {out}\n{}", diag());
    wait_for(&server, "web 1 deployed to production after the approval", || {
        let (_, s) = cli(&server, config.path(), &t["root"], &["status"]);
        let line = s.lines().find(|l| l.starts_with("production") && l.contains("web"))?.to_string();
        (line.split_whitespace().nth(2) == Some("1")).then_some(())
    });
    assert_eq!(http_get(port + 1).as_deref().map(|a| a.ends_with(" 1")), Some(true), "production's web answers as 1");

    // Rollback to the recorded previous version (1), through this build.
    let (code, out) = cli(&server, config.path(), &t["root"], &["rollback", "web", "--env", "staging"]);
    assert_eq!(code, 0, "rollback: {out}\n{}", diag());
    let answer = wait_for(&server, "web 1 after the rollback", || http_get(port).filter(|a| a.ends_with(" 1")));
    assert!(answer.contains("demo"), "{answer}");
    let (_, status) = cli(&server, config.path(), &t["root"], &["status"]);
    let staging = status.lines().find(|l| l.starts_with("staging") && l.contains("web")).expect("staging web line");
    let cols: Vec<&str> = staging.split_whitespace().collect();
    assert_eq!((cols[2], cols[3]), ("1", "2"), "after the rollback: {staging}");
}

/// The SQLite file the old build wrote, opened in place by this one.
#[test]
fn issue13_a_sqlite_store_from_the_build_before_migrations_upgrades_in_place() {
    let (config, _) = config_for("sqlite");
    std::fs::create_dir_all(config.path().join(".slipway")).expect("mkdir");
    let db = config.path().join(".slipway/slipway.db");
    std::fs::copy(fixtures().join("sqlite/store.db"), &db).expect("copy the fixture");
    // The server gets its own copy of the config dir (same text, so the
    // same revision) with the store in its default place.
    let store = format!("sqlite://{}", db.display());
    everything_is_still_there_and_usable("sqlite", Some(&store));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    assert_eq!(rt.block_on(recorded_version(&store)), Some(slipway::store::migrate::LATEST));
}

/// A pg_dump of a store the old build made, restored into a new database
/// and opened by this build.
#[test]
fn issue13_a_postgres_store_from_the_build_before_migrations_upgrades_in_place() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(url) = rt.block_on(common::postgres_url()) else { return };
    let psql = psql();
    let out =
        Command::new(&psql).args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-f"]).arg(fixtures().join("postgres/store.sql")).output().expect("run psql");
    assert!(out.status.success(), "restoring the dump failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rt.block_on(recorded_version(&url)), None, "the dump predates migrations");
    everything_is_still_there_and_usable("postgres", Some(&url));
    assert_eq!(rt.block_on(recorded_version(&url)), Some(slipway::store::migrate::LATEST));
}

/// A store migrated by a newer Slipway: this one refuses to start and says
/// which version it found and which it knows (exit 8), on both stores.
#[test]
fn issue13_a_store_newer_than_this_build_is_refused_with_both_versions() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut urls = vec![common::sqlite_url(dir.path())];
    urls.extend(rt.block_on(common::postgres_url()));
    let config = common::config_dir("[project]\nname = \"t\"\n[[job]]\nname = \"a\"\ncommand = [\"true\"]\n", &[]);
    let newer = slipway::store::migrate::LATEST + 1;
    for url in urls {
        rt.block_on(async {
            drop(slipway::store::open(&url).await.expect("a new store"));
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
            sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, 'from the future', TRUE, $2, 0)")
                .bind(newer)
                .bind(vec![0u8; 48])
                .execute(&mut conn)
                .await
                .expect("record a newer migration");
        });
        let out = Command::new(common::slipway_bin())
            .arg("--config")
            .arg(config.path())
            .args(["serve", "--listen", &format!("127.0.0.1:{}", common::free_port()), "--store", &url])
            .env_remove("SLIPWAY_STORE")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(8), "{url}: {err}");
        let known = slipway::store::migrate::LATEST;
        assert!(err.contains(&format!("version {newer}")) && err.contains(&format!("up to {known}")), "{url}: {err}");
        // Nothing was changed: the newer record is still the newest.
        assert_eq!(rt.block_on(recorded_version(&url)), Some(newer));
    }
}

/// Nodes starting at once on one new PostgreSQL database migrate it once,
/// one after the other (the advisory lock), and all open it.
#[test]
fn issue13_nodes_starting_together_migrate_a_postgres_store_once() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let Some(url) = rt.block_on(common::postgres_url()) else { return };
    rt.block_on(async {
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { slipway::store::open(&url).await.map(drop) })
            })
            .collect();
        for o in opens {
            o.await.expect("task").expect("every node opens the store");
        }
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
        let n: i64 = sqlx::Row::get(&sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations").fetch_one(&mut conn).await.expect("count"), 0);
        assert_eq!(n, slipway::store::migrate::LATEST, "each migration recorded once");
    });
}

async fn recorded_version(url: &str) -> Option<i64> {
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url).await.expect("connect");
    let exists = if url.starts_with("sqlite") {
        "SELECT COUNT(*) FROM sqlite_master WHERE name = '_sqlx_migrations'"
    } else {
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = '_sqlx_migrations' AND table_schema = current_schema()"
    };
    let n: i64 = sqlx::Row::get(&sqlx::query(exists).fetch_one(&mut conn).await.expect("query"), 0);
    if n == 0 {
        return None;
    }
    sqlx::Row::get(&sqlx::query("SELECT MAX(version) FROM _sqlx_migrations").fetch_one(&mut conn).await.expect("query"), 0)
}

fn psql() -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin/psql")).filter(|p| p.exists()).max())
        .unwrap_or_else(|| PathBuf::from("psql"))
}
