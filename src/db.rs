//! PostgreSQL: pool, database creation, migrations, and which errors are worth a retry.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// `[database]` of the configuration.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    pub statement_timeout_ms: u64,
}

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How many migrations this build applies.
pub fn migrations() -> usize {
    MIGRATOR.iter().count()
}

/// How long a connection of its own (to create the database, to migrate it, or for a
/// command) may take to open, and each short statement on it to answer: a server that
/// accepts the connection and then says nothing would otherwise hold a command, or a start,
/// without end. The pool's connections are bounded by its acquire timeout.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the database if missing. Two processes racing to create it is fine.
pub(crate) async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    let url = &effective_url(url);
    let within = Some(CONNECT_TIMEOUT);
    // The database itself first: the maintenance database that creating one needs may be
    // out of reach (a connection pooler, a managed server that serves only the app's), and
    // need not be reached when the database exists.
    match bounded(within, sqlx::PgConnection::connect(url)).await {
        Ok(conn) => {
            let _ = conn.close().await;
            return Ok(());
        }
        // invalid_catalog_name: no such database.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
        Err(e) => return Err(e),
    }
    match create_database(url).await {
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

/// `CREATE DATABASE` for `url`'s database, from the maintenance database (`postgres`, or
/// `template1` to create `postgres`), as `createdb` does. The connect is bounded; the
/// statement is not, as creating a database may take a while on a busy server.
async fn create_database(url: &str) -> Result<(), sqlx::Error> {
    let mut options = PgConnectOptions::from_str(url)?;
    let database = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned();
    let maintenance = if database == "postgres" {
        "template1"
    } else {
        "postgres"
    };
    options = options.database(maintenance);
    let mut conn = bounded(Some(CONNECT_TIMEOUT), options.connect()).await?;
    // Before creating anything: a server too old would be left with an empty database.
    if let Err(e) = refuse_if_too_old(&mut conn).await {
        let _ = conn.close().await;
        return Err(e);
    }
    let create = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
    let created = sqlx::query(&create).execute(&mut conn).await;
    let _ = conn.close().await;
    created.map(|_| ())
}

/// The server's TCP keepalive for the worker's sessions: probes after 30 s of silence, every
/// 10 s, 3 unanswered end the session; unacknowledged data ends it after 60 s.
const KEEPALIVE: [(&str, &str); 4] = [
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "60000"),
];

/// Whether a session can write: the check of a pooled connection that sat idle.
const WRITABLE: &str = "SELECT current_setting('transaction_read_only') = 'off'";

/// A pooled connection idle at least this long is checked ([`WRITABLE`]) before it is
/// handed out.
const CHECK_AFTER_IDLE: Duration = Duration::from_millis(100);

/// The parameters of a `database.url` that name the server's CA (sqlx's spellings too).
const ROOT_CERT: [&str; 3] = ["sslrootcert", "ssl-root-cert", "ssl-ca"];

/// The client's own certificate and key.
const CLIENT_FILES: [&str; 4] = ["sslcert", "ssl-cert", "sslkey", "ssl-key"];

/// Why `url` is no PostgreSQL URL the pool could use, if it is not.
pub(crate) fn unusable_url(url: &str) -> Option<String> {
    let parsed = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) if crate::redact::stray_at_text(url) => {
            return Some(format!("not a URL ({e}): {}", crate::redact::STRAY_AT))
        }
        Err(e) => return Some(format!("not a URL ({e})")),
    };
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        let scheme = parsed.scheme();
        return Some(format!(
            "the scheme must be postgres or postgresql, not {scheme}"
        ));
    }
    // `postgres:user:password@host/db` (or with one `/`) parses as a path, which the client
    // would take for the name of a database on localhost.
    if !parsed.has_authority() {
        return Some(format!("{}:// must begin it", parsed.scheme()));
    }
    if crate::redact::stray_at(&parsed) {
        return Some(crate::redact::STRAY_AT.into());
    }
    // The client cannot open an encrypted key: it ignores the parameter, logging its value as
    // an unknown one, on every parse (this one included).
    if parsed.query_pairs().any(|(k, _)| k == "sslpassword") {
        return Some(
            "sslpassword: an encrypted client key is not supported; decrypt it \
             (`openssl pkey -in key.pem -out plain.pem`) and name that file in sslkey"
                .into(),
        );
    }
    url.parse::<PgConnectOptions>()
        .err()
        .map(|e| format!("not a PostgreSQL URL ({e})"))
}

/// A TLS file `url` names that cannot be read, as "param: path: why". Checked at start: the
/// client reads them on every connect, and a missing one would otherwise be retried as an
/// outage for ever. A certificate given inline (PEM) is not a file; a key given inline is
/// refused, as the client reads `sslkey` only as a file's path.
pub(crate) fn unreadable_tls_file(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let inline_key = url.query_pairs().any(|(k, v)| {
        matches!(k.as_ref(), "sslkey" | "ssl-key") && v.trim_start().starts_with("-----BEGIN")
    });
    if inline_key {
        return Some("sslkey: a key given inline is not supported; name its file".into());
    }
    url.query_pairs()
        .filter(|(k, _)| ROOT_CERT.contains(&k.as_ref()) || CLIENT_FILES.contains(&k.as_ref()))
        .filter(|(_, v)| !v.trim_start().starts_with("-----BEGIN"))
        .find_map(|(k, path)| {
            std::fs::File::open(path.as_ref())
                .err()
                .map(|why| format!("{k}: {path}: {why}"))
        })
}

/// `url` as the worker connects with it: as with libpq, `sslmode=require` with a root
/// certificate checks the server against it (`verify-ca`); sqlx would encrypt without
/// checking anything. Used for every connection, the first (does the database exist?) too.
fn effective_url(url: &str) -> String {
    let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    verify_when_rooted(
        url,
        env("PGSSLROOTCERT").is_some(),
        env("PGSSLMODE").as_deref(),
    )
}

/// [`effective_url`] with the client's environment given: a root certificate named by
/// `PGSSLROOTCERT` (`env_root`), and `PGSSLMODE` where the URL sets no mode, count as the
/// URL's own, as the client reads them too.
fn verify_when_rooted(url: &str, env_root: bool, env_mode: Option<&str>) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    let names_ca = env_root || pairs.iter().any(|(k, _)| ROOT_CERT.contains(&k.as_str()));
    let is_mode = |k: &str| k == "sslmode" || k == "ssl-mode";
    let requires = match pairs.iter().find(|(k, _)| is_mode(k)) {
        Some((_, mode)) => mode.eq_ignore_ascii_case("require"),
        None => env_mode.is_some_and(|m| m.eq_ignore_ascii_case("require")),
    };
    if !names_ca || !requires {
        return url.to_owned();
    }
    let moded = pairs.iter().any(|(k, _)| is_mode(k));
    let mut query = parsed.query_pairs_mut();
    query.clear().extend_pairs(pairs.iter().map(|(k, v)| {
        if is_mode(k) {
            (k.as_str(), "verify-ca")
        } else {
            (k.as_str(), v.as_str())
        }
    }));
    if !moded {
        query.append_pair("sslmode", "verify-ca");
    }
    drop(query);
    parsed.into()
}

/// The options for `settings.url`; with `statement_timeout` only when `bounded`.
fn connect_options(
    settings: &DatabaseSettings,
    bounded: bool,
) -> Result<PgConnectOptions, sqlx::Error> {
    let mut opts = PgConnectOptions::from_str(&effective_url(&settings.url))?
        .application_name("credit-worker")
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
        // The server ends a session whose client vanished (a host gone, a partition) within
        // about a minute rather than the kernel's two hours, and with it the session's locks:
        // the outbox relay's leader lock above all, which a standby waits to take over.
        .options(KEEPALIVE);
    if bounded {
        // Each set, 0 (none) included: a database's or role's own setting would apply instead.
        // A transaction the worker gave up on a silent connection (`bounded`) may still be
        // open on the server, holding its users' locks, where the connection is alive but
        // lost to the worker (a hung pooler or proxy) and the keepalive never ends it. A
        // transaction of the worker's is never idle for long: at most while an earlier batch
        // commits, itself bounded by `stall_bound`.
        let idle = idle_in_transaction_ms(settings).unwrap_or(0);
        opts = opts.options([
            (
                "statement_timeout",
                format!("{}ms", settings.statement_timeout_ms),
            ),
            ("idle_in_transaction_session_timeout", format!("{idle}ms")),
            // The pool ends its idle connections itself, and the relay's listener is idle
            // between notifications by design; the leader sets its own lease (`end_when_idle`).
            ("idle_session_timeout", "0".to_owned()),
        ]);
    }
    Ok(opts)
}

/// How long the worker waits for the database to answer a transaction, a relay round or a
/// ping before it gives the connection up: `statement_timeout` is the server's, so a server
/// gone silent (its host lost after acknowledging a query, a NAT or load balancer that
/// dropped the flow, a hung pooler) would otherwise be waited for for ever, the batch's
/// deliveries held. Two statement timeouts and a second; none without a statement timeout.
pub(crate) fn stall_bound(settings: &DatabaseSettings) -> Option<Duration> {
    (settings.statement_timeout_ms > 0).then(|| {
        Duration::from_millis(settings.statement_timeout_ms.saturating_mul(2))
            + Duration::from_secs(1)
    })
}

/// How long a session of the worker's may sit idle in a transaction: twice [`stall_bound`],
/// none past what PostgreSQL takes (2^31 − 1 ms), which a statement timeout of days reaches.
fn idle_in_transaction_ms(settings: &DatabaseSettings) -> Option<u128> {
    let idle = stall_bound(settings)?.as_millis().saturating_mul(2);
    (idle <= i32::MAX as u128).then_some(idle)
}

/// How long the outbox relay's leader may leave its session idle before the server ends it,
/// and the lead with it: [`stall_bound`], none past what PostgreSQL takes. The keepalive ends
/// the session of a leader whose host vanished; this ends that of a leader whose process
/// stopped making progress with its connection up (frozen, or its runtime stuck).
pub(crate) fn lead_lease(settings: &DatabaseSettings) -> Option<Duration> {
    stall_bound(settings).filter(|lease| lease.as_millis() <= i32::MAX as u128)
}

/// Has the server end this session once it has been idle, outside a transaction, for `lease`.
pub(crate) async fn end_when_idle(
    conn: &mut sqlx::PgConnection,
    lease: Duration,
) -> Result<(), sqlx::Error> {
    let set = format!("SET idle_session_timeout = {}", lease.as_millis());
    sqlx::query(&set).execute(conn).await?;
    Ok(())
}

/// This host's clock minus the database server's (`clock_timestamp()`), taken at the middle
/// of the round trip: positive when this host's is ahead.
pub(crate) async fn clock_offset(pool: &PgPool) -> Result<chrono::TimeDelta, sqlx::Error> {
    // Connected first: only the query's round trip is timed, not a connection's setup.
    let mut conn = pool.acquire().await?;
    let before = chrono::Utc::now();
    let server: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *conn)
        .await?;
    let after = chrono::Utc::now();
    Ok(before + (after - before) / 2 - server)
}

/// `work` given up after `bound` (see [`stall_bound`]) with a transient error: what it was
/// doing on its connection is abandoned with the connection.
pub(crate) async fn bounded<T, E: From<sqlx::Error>>(
    bound: Option<Duration>,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match bound {
        None => work.await,
        Some(limit) => tokio::time::timeout(limit, work)
            .await
            .unwrap_or_else(|_| Err(E::from(stalled(limit)))),
    }
}

/// The error of a connection that did not answer within `limit`.
fn stalled(limit: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from the database within {limit:?}; the connection is given up"),
    ))
}

/// A pool on `settings.url`. Connections are made lazily, so this succeeds while the database
/// is down; callers see the outage as (transient) query errors.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    Ok(pool_on(
        settings,
        connect_options(settings, true)?,
        settings.max_connections,
    ))
}

/// A pool of one connection, like [`pool`]'s, for a session that must stay out of the shared
/// pool: the outbox relay's LISTEN. A listener's connection lost and made again while its wait
/// is given up (every 500 ms) can go back to its pool still listening; in the shared pool a
/// decision transaction would then meet the notifications and fail.
pub(crate) fn pool_of_one(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    Ok(pool_on(settings, connect_options(settings, true)?, 1))
}

/// A pool of one connection for `/readyz`, kept open (made again in the background when lost),
/// so that a probe neither waits behind the batches nor has to open a connection within its
/// own bound.
pub(crate) fn probe_pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let opts = connect_options(settings, true)?;
    Ok(pool_options(settings, 1)
        .min_connections(1)
        .connect_lazy_with(opts))
}

/// [`pool`] with `opts` for its `size` connections.
fn pool_on(settings: &DatabaseSettings, opts: PgConnectOptions, size: u32) -> PgPool {
    pool_options(settings, size).connect_lazy_with(opts)
}

/// The options of every pool of the worker's, for `size` connections.
fn pool_options(settings: &DatabaseSettings, size: u32) -> PgPoolOptions {
    let bound = stall_bound(settings);
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        // A ping before every use was one more round trip per batch and per relay round:
        // only a connection that sat idle (where a server restart or a network fault would
        // go unnoticed) is checked; one that fails is dropped and another one taken. So is
        // one made while the database was read-only (`default_transaction_read_only` keeps
        // a session's value from its start; a server demoted in a failover): every write on
        // it would fail until it is replaced. A write that failed so leaves it idle for the
        // retry's backoff, so the check finds it.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < CHECK_AFTER_IDLE {
                    return Ok(true);
                }
                let writable: bool = sqlx::query_scalar(WRITABLE).fetch_one(&mut *conn).await?;
                Ok(writable)
            })
        })
        // A connection whose work was given up (see `bounded`) comes back with its answer
        // still owed: the pool's own ping on release would wait for it without end, holding
        // a slot of the pool. Bounded here, a silent one is closed instead.
        .after_release(move |conn, _| {
            Box::pin(async move {
                bounded(bound, conn.ping()).await?;
                Ok(true)
            })
        })
}

/// A pool timeout explained, at most every minute.
static POOL_TIMEOUT_EXPLAINED: crate::throttle::Throttle =
    crate::throttle::Throttle::new(Duration::from_secs(60));

/// Logs why `pool` gave no connection within its 5 s, when `e` says so (at most every
/// minute). The pool's own error names none: it retries a server's refusal (no free
/// connection slots, the server starting up) until its timeout. A new connection, tried
/// beside the pool, tells the server's refusal from every pooled connection being busy.
pub(crate) fn explain_pool_timeout(pool: &PgPool, e: &sqlx::Error) {
    if !matches!(e, sqlx::Error::PoolTimedOut) || !POOL_TIMEOUT_EXPLAINED.ready() {
        return;
    }
    let options = pool.connect_options();
    tokio::spawn(async move {
        use sqlx::Connection as _;
        let tried =
            tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect_with(&options));
        match tried.await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                tracing::warn!("no pooled database connection was free within 5 s, and a new one opens: every pooled connection is busy (slow statements, or locks held elsewhere)");
            }
            Ok(Err(refusal)) => tracing::warn!(error = %refusal, "no pooled database connection was free within 5 s, and the server refuses a new one"),
            Err(_) => tracing::warn!("no pooled database connection was free within 5 s, and a new one does not answer within {CONNECT_TIMEOUT:?}"),
        }
    });
}

/// Creates the database if needed, connects and applies migrations.
pub async fn connect_and_migrate(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    prepare(settings).await?;
    pool(settings)
}

/// Why an operator's command will not use the database `database.url` names.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotReady {
    #[error("database {0:?} does not exist; only `credit-worker migrate` and `run` create it")]
    Missing(String),
    #[error(
        "database {database:?} lacks {pending} of this build's {known} migrations \
         (the first: {first}): run `credit-worker migrate`"
    )]
    Behind {
        database: String,
        pending: usize,
        known: usize,
        first: String,
    },
    #[error(
        "database {database:?} holds migration {version}, which this build does not know: \
         a newer build migrated it"
    )]
    Ahead { database: String, version: i64 },
    #[error(
        "database {database:?}: migration {version} failed part-way; undo what it did, \
         delete its record (`DELETE FROM _sqlx_migrations WHERE version = {version}`), then \
         run `credit-worker migrate`"
    )]
    Failed { database: String, version: i64 },
    #[error(
        "database {database:?}: migration {version} is not this build's (its checksum \
         differs): edited since it ran, or from another build"
    )]
    Changed { database: String, version: i64 },
    #[error(
        "database {database:?}: this role cannot read which migrations it holds ({reason}); \
         check the role's search_path and privileges"
    )]
    Unreadable { database: String, reason: String },
    #[error(
        "database.url: the server refused the login ({0}); check the user and password in \
         the URL and the server's pg_hba.conf"
    )]
    LoginRefused(String),
    #[error(
        "database.url: the server's TLS certificate does not verify ({0}); with \
         sslmode=verify-ca or verify-full, sslrootcert must name the CA that signed it"
    )]
    Certificate(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

impl NotReady {
    /// `e`, met connecting to or migrating `database`, as an operator's mistake where it is
    /// one (no retry fixes it), else as it is ([`NotReady::Sql`]).
    pub(crate) fn of(e: sqlx::Error, database: &str) -> NotReady {
        use sqlx::migrate::MigrateError;
        let database = database.to_owned();
        // Only the database meant: `migrate` first connects to the server's own.
        let names_it = e
            .as_database_error()
            .is_some_and(|d| d.message().contains(&format!("\"{database}\"")));
        if sqlstate(&e).as_deref() == Some("3D000") && names_it {
            return NotReady::Missing(database);
        }
        if is_login_refused(&e) {
            return NotReady::LoginRefused(e.to_string());
        }
        if is_certificate_error(&e) {
            return NotReady::Certificate(e.to_string());
        }
        match &e {
            sqlx::Error::Migrate(m) => match **m {
                MigrateError::VersionMissing(version) => NotReady::Ahead { database, version },
                MigrateError::VersionMismatch(version) => NotReady::Changed { database, version },
                MigrateError::Dirty(version) => NotReady::Failed { database, version },
                _ => NotReady::Sql(e),
            },
            _ => NotReady::Sql(e),
        }
    }
}

/// The database `settings` names (the user's name where the URL names none).
pub(crate) fn database_name(settings: &DatabaseSettings) -> String {
    connect_options(settings, false).map_or_else(|_| String::new(), |o| name_of(&o))
}

/// The database `opts` connects to (the user's name where the URL names none).
fn name_of(opts: &PgConnectOptions) -> String {
    opts.get_database()
        .unwrap_or(opts.get_username())
        .to_owned()
}

/// A migration the database holds.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Applied {
    version: i64,
    success: bool,
    checksum: Vec<u8>,
}

const APPLIED: &str = "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version";

/// Whether the ledger's schema is there: tells a database never migrated from one whose
/// migrations' table this role cannot see.
const LEDGER_SCHEMA: &str = "SELECT to_regnamespace('credit') IS NOT NULL";

/// A pool on an existing database whose schema is this build's, for the operator's commands.
/// Unlike the worker's start, these neither create a database nor migrate one: a mistyped
/// `database.url` would otherwise print a balance of 0 from a new, empty ledger, or take a
/// top-up into a ledger no worker reads; and a schema change is the `migrate` command's.
pub(crate) async fn connect_existing(settings: &DatabaseSettings) -> Result<PgPool, NotReady> {
    existing(settings, connect_options(settings, true)?).await
}

/// [`connect_existing`] for `audit`, whose checks read the whole ledger: a statement past a
/// second is their nature, not news, so none is logged (the worker's and the other commands'
/// are, as warnings with their SQL).
pub(crate) async fn connect_existing_for_audit(
    settings: &DatabaseSettings,
) -> Result<PgPool, NotReady> {
    let opts = connect_options(settings, true)?
        .log_slow_statements(tracing::log::LevelFilter::Off, Duration::from_secs(1));
    existing(settings, opts).await
}

async fn existing(
    settings: &DatabaseSettings,
    pooled: PgConnectOptions,
) -> Result<PgPool, NotReady> {
    let opts = connect_options(settings, false)?;
    let database = name_of(&opts);
    let within = Some(CONNECT_TIMEOUT);
    let mut conn = match bounded(within, opts.connect()).await {
        Ok(conn) => conn,
        Err(e) => return Err(NotReady::of(e, &database)),
    };
    let applied = bounded(within, applied_migrations(&mut conn, &database)).await;
    let _ = conn.close().await;
    schema_state(database, &applied?)?;
    Ok(pool_on(settings, pooled, settings.max_connections))
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

async fn applied_migrations(
    conn: &mut sqlx::PgConnection,
    database: &str,
) -> Result<Vec<Applied>, NotReady> {
    let unreadable = |reason: String| NotReady::Unreadable {
        database: database.to_owned(),
        reason,
    };
    match sqlx::query_as(APPLIED).fetch_all(&mut *conn).await {
        Ok(rows) => Ok(rows),
        // undefined_table: never migrated, unless the ledger is there out of the table's sight.
        Err(e) if sqlstate(&e).as_deref() == Some("42P01") => {
            let ledger: bool = sqlx::query_scalar(LEDGER_SCHEMA)
                .fetch_one(&mut *conn)
                .await?;
            match ledger {
                true => Err(unreadable("no _sqlx_migrations in its search_path".into())),
                false => Ok(Vec::new()),
            }
        }
        // insufficient_privilege
        Err(e) if sqlstate(&e).as_deref() == Some("42501") => Err(unreadable(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Whether `applied` is exactly this build's migrations, each completed and unchanged.
fn schema_state(database: String, applied: &[Applied]) -> Result<(), NotReady> {
    if let Some(a) = applied.iter().find(|a| !a.success) {
        let version = a.version;
        return Err(NotReady::Failed { database, version });
    }
    for a in applied {
        let version = a.version;
        match MIGRATOR.iter().find(|m| m.version == version) {
            None => return Err(NotReady::Ahead { database, version }),
            Some(m) if *m.checksum != *a.checksum => {
                return Err(NotReady::Changed { database, version })
            }
            Some(_) => {}
        }
    }
    let pending: Vec<_> = MIGRATOR
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .collect();
    match pending.first() {
        None => Ok(()),
        Some(first) => Err(NotReady::Behind {
            database,
            pending: pending.len(),
            known: migrations(),
            first: format!("{} {}", first.version, first.description),
        }),
    }
}

/// The advisory lock one process at a time applies migrations under.
const MIGRATING: i64 = 0x6372_6564_6974_6d67;

/// How long a migration waits for a lock before it fails (and the start retries it): the
/// ledger's writers queue behind its request, so a long read holding the table (a `pg_dump`,
/// an `audit`) would hold billing for as long as this, at every try.
const MIGRATION_LOCK_TIMEOUT: &str = "SET lock_timeout = '250ms'";

/// The oldest PostgreSQL the schema and the worker's sessions need: 14 (lz4 compression in
/// migration 0010, `idle_session_timeout` on the relay's lead).
const OLDEST_SERVER: i32 = 140_000;

/// A server older than [`OLDEST_SERVER`], refused before anything is created or migrated.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ServerTooOld(String);

/// [`ServerTooOld`] (as a configuration error) for a server too old for the ledger.
async fn refuse_if_too_old(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let version: i32 = bounded(
        Some(CONNECT_TIMEOUT),
        sqlx::query_scalar("SELECT current_setting('server_version_num')::int4").fetch_one(conn),
    )
    .await?;
    match too_old(version) {
        Some(refusal) => Err(sqlx::Error::Configuration(ServerTooOld(refusal).into())),
        None => Ok(()),
    }
}

/// Why a server of `server_version_num` cannot hold the ledger, if it cannot.
fn too_old(version: i32) -> Option<String> {
    // From 10 on the number is major × 10000 + minor; before, major.minor × 100 + patch.
    let major = match version {
        100_000.. => format!("{}", version / 10_000),
        _ => format!("{}.{}", version / 10_000, version % 10_000 / 100),
    };
    (version < OLDEST_SERVER)
        .then(|| format!("PostgreSQL {major} is older than 14, which the ledger's schema needs"))
}

/// How often a process waiting for another's migrations asks for the lock again.
const MIGRATING_POLL: Duration = Duration::from_millis(250);

/// Creates the database if needed and applies migrations, on a connection of their own
/// without `statement_timeout`: building an index on a large table may take longer than any
/// statement of the worker's, and a timeout would fail every start the same way.
///
/// Replicas starting together wait for the lock by asking again rather than blocking on it.
/// A session blocked on a lock holds a snapshot, which a concurrent index build (0014) waits
/// for: the two would wait on each other.
pub(crate) async fn prepare(settings: &DatabaseSettings) -> Result<(), sqlx::Error> {
    ensure_database(&settings.url).await?;
    let within = Some(CONNECT_TIMEOUT);
    let opts = connect_options(settings, false)?;
    let database = name_of(&opts);
    let mut conn = bounded(within, opts.connect()).await?;
    if let Err(e) = refuse_if_too_old(&mut conn).await {
        let _ = conn.close().await;
        return Err(e);
    }
    // Up to date: nothing to lock or create. sqlx's migrator would create its table in schema
    // `public` if missing, which a role that may only read and write the ledger (PostgreSQL
    // 15 lets no role create in `public` by default) may not, even when it is there.
    if up_to_date(&mut conn, &database).await {
        let _ = conn.close().await;
        return Ok(());
    }
    let mut waited = false;
    let lock = "SELECT pg_try_advisory_lock($1)";
    while !bounded(
        within,
        sqlx::query_scalar::<_, bool>(lock)
            .bind(MIGRATING)
            .fetch_one(&mut conn),
    )
    .await?
    {
        if !std::mem::replace(&mut waited, true) {
            tracing::info!("waiting for another process to finish migrating the database");
        }
        tokio::time::sleep(MIGRATING_POLL).await;
    }
    // A migration's table lock queues every writer behind it: one that cannot have it at once
    // (a long read holds the table) gives up after a while and is retried, rather than hold
    // the ledger's writers for as long as that read lasts.
    bounded(
        within,
        sqlx::query(MIGRATION_LOCK_TIMEOUT).execute(&mut conn),
    )
    .await?;
    let migrated = MIGRATOR.run(&mut conn).await;
    // Closing the session releases the lock as well.
    let _ = conn.close().await;
    Ok(migrated?)
}

/// Whether every migration of this build is applied, completed and unchanged (any doubt:
/// false, and the migrator decides).
async fn up_to_date(conn: &mut sqlx::PgConnection, database: &str) -> bool {
    let applied = bounded(Some(CONNECT_TIMEOUT), applied_migrations(conn, database)).await;
    applied.is_ok_and(|applied| schema_state(database.to_owned(), &applied).is_ok())
}

/// True when a statement failed for a reason that clears by itself: the connection (I/O
/// other than a certificate, a pool timeout, SQLSTATE class 08), a serialization failure or
/// deadlock (40001, 40P01), a lock timeout (55P03), the server shutting down (class 57) or
/// short of resources (class 53: disk full, out of memory, no connection slots), a server
/// read-only for now (25006: a standby not yet promoted after a failover). A migration that
/// fails otherwise (its SQL, an object in the way) would fail the same way again, so the
/// start stops instead of retrying it.
pub(crate) fn clears_by_itself(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(io) => io.kind() != std::io::ErrorKind::InvalidData,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| code_clears_by_itself(&c)),
        _ => false,
    }
}

/// [`clears_by_itself`] for a SQLSTATE.
fn code_clears_by_itself(code: &str) -> bool {
    ["08", "53", "57"]
        .iter()
        .any(|class| code.starts_with(class))
        || ["25006", "40001", "40P01", "55P03"].contains(&code)
}

/// True unless the error says the statement itself or its data is wrong. Only data and
/// program errors are permanent (SQLSTATE classes 22 data exception, 23 integrity violation,
/// 42 syntax/undefined object, 2B/P0 raised by our triggers, and decode failures); lost or
/// refused connections, a database not accepting connections, deadlocks, timeouts and
/// shutdowns all clear by themselves, so the work is retried rather than given up.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => !db.code().is_some_and(|c| {
            ["22", "23", "42", "2B", "P0"]
                .iter()
                .any(|class| c.starts_with(class))
        }),
        sqlx::Error::Configuration(_)
        | sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::Migrate(_)
        | sqlx::Error::Tls(_) => false,
        // A certificate that does not verify (rustls reports it as invalid data) will not
        // verify on the next attempt either.
        sqlx::Error::Io(io) => io.kind() != std::io::ErrorKind::InvalidData,
        _ => true,
    }
}

/// True when the database refused a statement for its schema or its grants (SQLSTATE class
/// 42: a table or column missing, a privilege revoked), or a connection could not be set up
/// (a server certificate that expired or was rotated, a client key that no longer reads). No
/// message's content causes either (every value is a bound parameter), so a message that
/// meets one stays on the queue, retried, until the database or its certificates are fixed,
/// instead of being dead-lettered with every message after it. At start the same errors stop
/// the worker ([`is_transient`]): there they are the operator's to fix at once.
pub(crate) fn is_setup_fault(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("42")),
        sqlx::Error::Tls(_) | sqlx::Error::Io(_) | sqlx::Error::Configuration(_) => true,
        _ => false,
    }
}

/// True when the server refused the login (SQLSTATE class 28: an unknown role, a wrong
/// password, no `pg_hba.conf` entry for this host, user and database). At start that is the
/// URL's to fix; while running it may be a password being rotated, and is retried
/// ([`is_transient`]).
pub(crate) fn is_login_refused(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("28")))
}

/// True when the server's TLS certificate did not verify (`sslmode=verify-ca|verify-full`).
pub(crate) fn is_certificate_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::InvalidData && io.to_string().contains("certificate")
        }
        sqlx::Error::Tls(t) => t.to_string().contains("certificate"),
        _ => false,
    }
}

/// True when the database answers a trivial query (readiness).
pub(crate) async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_ended_idle_in_a_transaction_only_within_what_postgresql_takes() {
        let idle = |statement_timeout_ms: u64| {
            let settings = DatabaseSettings {
                url: "postgres://u@h/d".into(),
                max_connections: 3,
                statement_timeout_ms,
            };
            let opts = connect_options(&settings, true).unwrap();
            let options = opts.get_options().unwrap_or_default().to_owned();
            (idle_in_transaction_ms(&settings), options)
        };
        let (ms, options) = idle(30_000);
        assert_eq!(ms, Some(122_000));
        assert!(
            options.contains("idle_in_transaction_session_timeout=122000ms"),
            "{options}"
        );
        assert_eq!(idle(536_870_411).0, Some(2_147_483_644));
        // None is said as 0, so that a database's or role's own setting does not apply.
        for past in [536_870_412, i32::MAX as u64] {
            let (ms, options) = idle(past);
            assert_eq!(ms, None);
            assert!(
                options.contains("idle_in_transaction_session_timeout=0ms"),
                "{options}"
            );
        }
        let (ms, options) = idle(0);
        assert_eq!(ms, None);
        for none in [
            "statement_timeout=0ms",
            "idle_in_transaction_session_timeout=0ms",
            "idle_session_timeout=0",
        ] {
            assert!(options.contains(none), "{none} in {options}");
        }
    }

    #[test]
    fn a_failover_or_a_server_short_of_resources_is_waited_out_at_start() {
        for passing in [
            "08006", "53100", "53200", "53300", "57P01", "25006", "40P01", "55P03",
        ] {
            assert!(code_clears_by_itself(passing), "{passing}");
        }
        for lasting in ["25001", "42P07", "42501", "23505", "XX000", "P0001"] {
            assert!(!code_clears_by_itself(lasting), "{lasting}");
        }
    }

    fn all_applied() -> Vec<Applied> {
        let applied = |m: &sqlx::migrate::Migration| Applied {
            version: m.version,
            success: true,
            checksum: m.checksum.to_vec(),
        };
        MIGRATOR.iter().map(applied).collect()
    }

    #[test]
    fn a_schema_is_ready_only_with_exactly_this_builds_migrations_completed() {
        let db = || "credit".to_owned();
        assert!(schema_state(db(), &all_applied()).is_ok());

        let mut behind = all_applied();
        let last = behind.pop().map(|a| a.version);
        let Err(NotReady::Behind {
            pending,
            known,
            first,
            ..
        }) = schema_state(db(), &behind)
        else {
            panic!("a schema without the last migration is behind");
        };
        assert_eq!((pending, known), (1, migrations()));
        assert!(
            first.starts_with(&format!("{} ", last.unwrap_or_default())),
            "{first}"
        );

        let Err(NotReady::Behind { pending, first, .. }) = schema_state(db(), &[]) else {
            panic!("a database never migrated is behind");
        };
        assert_eq!(pending, migrations());
        assert!(first.starts_with("1 "), "{first}");

        let mut ahead = all_applied();
        let mut newer = ahead[0].clone();
        newer.version = 99_999_999;
        ahead.push(newer);
        assert!(matches!(
            schema_state(db(), &ahead),
            Err(NotReady::Ahead {
                version: 99_999_999,
                ..
            })
        ));

        let mut failed = all_applied();
        failed[3].success = false;
        assert!(matches!(
            schema_state(db(), &failed),
            Err(NotReady::Failed { version: 4, .. })
        ));

        let mut edited = all_applied();
        edited[5].checksum[0] ^= 1;
        assert!(matches!(
            schema_state(db(), &edited),
            Err(NotReady::Changed { version: 6, .. })
        ));
    }

    #[test]
    fn require_with_a_root_certificate_verifies_it_as_libpq_does() {
        assert_eq!(
            effective_url("postgres://u@h/db?sslmode=require&sslrootcert=%2Fca.pem&x=1"),
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert=%2Fca.pem&x=1"
        );
        for unchanged in [
            "postgres://u@h/db?sslmode=require",
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem",
            "postgres://u@h/db?sslrootcert=/ca.pem",
        ] {
            assert_eq!(effective_url(unchanged), unchanged);
        }
    }

    #[test]
    fn a_connection_that_cannot_be_set_up_waits_for_the_fix() {
        let expired = || {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "invalid peer certificate: Expired",
            ))
        };
        // Fatal at start, where the operator is watching; awaited at run time.
        assert!(!is_transient(&expired()));
        assert!(is_setup_fault(&expired()));
        assert!(is_setup_fault(&sqlx::Error::Tls("bad key".into())));
        assert!(!is_setup_fault(&sqlx::Error::RowNotFound));
        assert!(!is_setup_fault(&sqlx::Error::Decode("bad".into())));
    }

    #[test]
    fn a_server_older_than_14_is_refused_by_name() {
        assert_eq!(
            too_old(130_004).as_deref(),
            Some("PostgreSQL 13 is older than 14, which the ledger's schema needs")
        );
        assert_eq!(
            too_old(90_624).as_deref(),
            Some("PostgreSQL 9.6 is older than 14, which the ledger's schema needs")
        );
        assert_eq!(too_old(140_000), None);
        assert_eq!(too_old(150_020), None);
    }

    #[test]
    fn tls_files_are_checked_unless_given_inline() {
        let url = "postgres://u@h/db?ssl-ca=/nonexistent/ca.pem&sslcert=-----BEGIN%20CERT";
        let bad = unreadable_tls_file(url).unwrap_or_default();
        assert!(bad.starts_with("ssl-ca: /nonexistent/ca.pem: "), "{bad:?}");
        // The client reads a key only from a file: one given inline is refused, unprinted.
        let url = "postgres://u@h/db?sslkey=-----BEGIN%20PRIVATE%20KEY-----%0Asecret";
        assert_eq!(
            unreadable_tls_file(url).as_deref(),
            Some("sslkey: a key given inline is not supported; name its file")
        );
    }

    #[test]
    fn a_key_password_is_refused_before_the_client_could_log_it() {
        let url = "postgres://u@h/db?sslkey=/k.pem&sslpassword=KeyPassw0rd";
        let why = unusable_url(url).unwrap_or_default();
        assert!(why.starts_with("sslpassword: an encrypted client key is not supported"));
        assert!(!why.contains("KeyPassw0rd"));
    }

    #[test]
    fn a_root_certificate_from_the_environment_verifies_as_one_in_the_url() {
        let url = "postgres://u@h/db?sslmode=require";
        assert_eq!(
            verify_when_rooted(url, true, None),
            "postgres://u@h/db?sslmode=verify-ca"
        );
        assert_eq!(verify_when_rooted(url, false, None), url);
        // PGSSLMODE=require counts where the URL sets no mode; the URL's own mode wins.
        assert_eq!(
            verify_when_rooted("postgres://u@h/db", true, Some("require")),
            "postgres://u@h/db?sslmode=verify-ca"
        );
        assert_eq!(
            verify_when_rooted("postgres://u@h/db?sslmode=disable", true, Some("require")),
            "postgres://u@h/db?sslmode=disable"
        );
        assert_eq!(
            verify_when_rooted("postgres://u@h/db", true, Some("prefer")),
            "postgres://u@h/db"
        );
    }

    #[test]
    fn a_password_not_percent_encoded_is_refused_unprinted() {
        for url in [
            "postgres://root:2024/S3CRET@127.0.0.1/db",
            "postgres://root:2024?S3CRET@127.0.0.1/db",
        ] {
            assert_eq!(
                unusable_url(url).as_deref(),
                Some(crate::redact::STRAY_AT),
                "{url}"
            );
        }
        assert_eq!(
            unusable_url("postgres://root:2024%2FS3CRET@127.0.0.1/db"),
            None
        );
    }
}
