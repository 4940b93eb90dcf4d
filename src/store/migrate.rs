//! The store's schema: numbered migrations, applied in order when a store
//! is opened and recorded in the store itself (sqlx's migrator and its
//! `_sqlx_migrations` table: version, checksum, when).
//!
//! One set of files for both dialects: `migrations/NNNN_name.sql`, with
//! `{serial}` and `{blob}` filled per dialect before they run (so each
//! store records the checksum of the SQL it actually ran). A file named
//! `NNNN_name.pg.sql` is PostgreSQL's alone (a function SQLite has no
//! language for); SQLite records its version having run nothing.
//!
//! Rules, because a deployment engine is upgraded in place while it holds
//! the deploy history and the record of what runs where:
//! - Append only. A migration that shipped is never edited: every store
//!   that ran it recorded its checksum, and a changed one is refused.
//! - Additive where a rolling upgrade needs it: nodes of the previous build
//!   may still run on a PostgreSQL store while a new one migrates it.
//! - A node never runs against a schema newer than it knows: it refuses to
//!   start, saying which version it found and which it knows
//!   ([`StoreError::SchemaTooNew`]).
//! - On PostgreSQL, nodes starting together migrate one at a time, under the
//!   same advisory lock the schema has always been created under (so a node
//!   of the build before migrations waits too).

use std::borrow::Cow;

use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row, SqlSafeStr};

use super::sql::{Answered as _, Dialect};
use super::{Result, StoreError};

/// Every migration, oldest first: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, Sql)] = &[
    (1, "baseline", Sql::Both(include_str!("migrations/0001_baseline.sql"))),
    (2, "parts", Sql::Both(include_str!("migrations/0002_parts.sql"))),
    (3, "target_ref", Sql::Both(include_str!("migrations/0003_target_ref.sql"))),
    (4, "leases", Sql::Both(include_str!("migrations/0004_leases.sql"))),
    (5, "audit_environment", Sql::Both(include_str!("migrations/0005_audit_environment.sql"))),
    (6, "write_batch", Sql::PostgresOnly(include_str!("migrations/0006_write_batch.pg.sql"))),
];

/// A migration's SQL, and which dialects run it.
enum Sql {
    Both(&'static str),
    PostgresOnly(&'static str),
}

/// The newest schema version this build knows.
pub const LATEST: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The advisory lock key PostgreSQL stores have always been set up under.
const PG_LOCK: i64 = 7467233;

/// A migration's SQL as it runs on `dialect`.
fn fill(sql: &Sql, dialect: Dialect) -> String {
    let sql = match (sql, dialect) {
        (Sql::Both(sql), _) | (Sql::PostgresOnly(sql), Dialect::Postgres) => sql,
        // A statement, so the version is recorded like any other.
        (Sql::PostgresOnly(_), Dialect::Sqlite) => "SELECT 1",
    };
    let (serial, blob) = match dialect {
        Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"),
        Dialect::Postgres => ("BIGSERIAL PRIMARY KEY", "BYTEA"),
    };
    sql.replace("{serial}", serial).replace("{blob}", blob)
}

fn migrator(dialect: Dialect) -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, name, sql)| {
            // Only ever our own files, never input.
            let sql = sqlx::AssertSqlSafe(fill(sql, dialect)).into_sql_str();
            Migration::new(*version, Cow::Borrowed(*name), MigrationType::Simple, sql, false)
        })
        .collect();
    let mut m = Migrator::with_migrations(migrations);
    // Our own advisory lock is held around it (see `run`).
    m.set_locking(false);
    m
}

/// Bring the store's schema up to [`LATEST`], or refuse a newer one.
pub(super) async fn run(pool: &AnyPool, dialect: Dialect) -> Result<()> {
    if dialect == Dialect::Sqlite {
        // One writer per file, and its pool has one connection.
        return apply(pool, dialect).await;
    }
    // Session-level, on a connection of its own: the migrator runs one
    // transaction per migration on another. lock_timeout bounds the wait
    // for a node that holds it.
    let mut lock = pool.acquire().await.map_err(StoreError::query("migrate lock"))?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(PG_LOCK).execute(&mut *lock).answered().await.map_err(StoreError::query("migrate lock"))?;
    let result = apply(pool, dialect).await;
    // On failure the lock goes with the connection anyway.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(PG_LOCK).execute(&mut *lock).answered().await;
    result
}

async fn apply(pool: &AnyPool, dialect: Dialect) -> Result<()> {
    if let Some(found) = applied(pool, dialect).await?
        && found > LATEST
    {
        return Err(StoreError::SchemaTooNew { found, known: LATEST });
    }
    // Each statement of a migration is bounded by the server's
    // statement_timeout (30 s, set on every connection); the whole by a
    // deadline of its own, for a connection that goes silent.
    let run = async { migrator(dialect).run(pool).await.map_err(Some) };
    let ran = match tokio::time::timeout(MIGRATE_DEADLINE, run).await {
        Ok(ran) => ran,
        Err(_) => Err(None),
    };
    ran.map_err(|e| match e {
        None => StoreError::Unavailable(format!("migrate: the store did not finish the schema migrations within {} s", MIGRATE_DEADLINE.as_secs())),
        Some(e) => migrate_error(e),
    })
}

/// How long the schema migrations of one start may take in all.
const MIGRATE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

fn migrate_error(e: MigrateError) -> StoreError {
    match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => StoreError::query("migrate")(e),
        MigrateError::VersionMismatch(v) => StoreError::Corrupt(format!(
            "schema migration {v} recorded in the store differs from this build's migration {v}: the store was migrated by a build with another migration {v}"
        )),
        MigrateError::Dirty(v) => StoreError::Corrupt(format!("schema migration {v} was started and never finished: the store needs repair by hand")),
        other => StoreError::Corrupt(format!("schema migration: {other}")),
    }
}

/// The newest migration the store recorded, `None` for a store made before
/// migrations existed (or a new one).
pub(super) async fn applied(pool: &AnyPool, dialect: Dialect) -> Result<Option<i64>> {
    let exists = match dialect {
        Dialect::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        Dialect::Postgres => "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = '_sqlx_migrations' AND table_schema = current_schema()",
    };
    let n: i64 = sqlx::query(exists).fetch_one(pool).answered().await.and_then(|r| r.try_get(0)).map_err(StoreError::query("read schema version"))?;
    if n == 0 {
        return Ok(None);
    }
    sqlx::query("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .answered()
        .await
        .and_then(|r| r.try_get::<Option<i64>, _>(0))
        .map_err(StoreError::query("read schema version"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_filled_for_both_dialects() {
        for (i, (version, name, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1, "migration {name} is out of order");
            for d in [Dialect::Sqlite, Dialect::Postgres] {
                let filled = fill(sql, d);
                // A placeholder is `{word}` (a comment may hold other braces).
                let placeholder = filled.split('{').skip(1).find_map(|rest| {
                    let word = rest.split('}').next().filter(|w| rest.contains('}') && !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
                    word.map(str::to_string)
                });
                assert_eq!(placeholder, None, "migration {version} keeps a placeholder for {d:?}");
            }
        }
        assert_eq!(LATEST, MIGRATIONS.len() as i64);
    }
}
