//! PostgreSQL: pool, database creation, migrations, and which errors are worth a retry.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres};

use crate::config::DatabaseSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates the database if missing. Two processes racing to create it is fine.
pub async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    if Postgres::database_exists(url).await? {
        return Ok(());
    }
    match Postgres::create_database(url).await {
        Ok(()) => Ok(()),
        // 42P04 duplicate_database / 23505: another process created it first.
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A pool on `settings.url`. Connections are made lazily, so this succeeds while the database
/// is down; callers see the outage as (transient) query errors.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let mut opts = PgConnectOptions::from_str(&settings.url)?
        .application_name("credit-worker")
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    if settings.statement_timeout_ms > 0 {
        opts = opts.options([(
            "statement_timeout",
            format!("{}ms", settings.statement_timeout_ms),
        )]);
    }
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// Creates the database if needed, connects and applies migrations.
pub async fn connect_and_migrate(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    ensure_database(&settings.url).await?;
    let pool = pool(settings)?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// True for faults that clear by themselves: lost or refused connections, pool exhaustion,
/// deadlocks, serialization failures, server shutdown or overload. Anything else (a violated
/// constraint, bad SQL) is a bug or bad data and retrying would not help.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources
                || c.starts_with("57") // operator intervention (shutdown, terminated, cancel)
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock detected
                || c == "55P03" // lock not available
        }),
        _ => false,
    }
}

/// Connects with `sqlx`'s own defaults only for a liveness probe.
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}
