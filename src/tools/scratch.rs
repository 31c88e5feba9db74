//! A scratch namespace and database for the bench and the demo, and their removal.

use std::hash::{BuildHasher, Hasher};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::amqp::topology::Names;
use crate::config::{AmqpSettings, DatabaseSettings, Settings};

pub struct Scratch {
    /// Random; also part of every node_exec_id, so runs never collide.
    pub run_id: u32,
    pub namespace: String,
    pub db_name: String,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    admin_url: String,
}

impl Scratch {
    /// `kind` names the user: namespace `{kind}-<tag>.`, database `credit_{kind}_<tag>`.
    pub fn new(settings: &Settings, kind: &str) -> anyhow::Result<Self> {
        let tag = random_tag();
        let run_id = (tag & 0xffff_ffff) as u32;
        let namespace = format!("{kind}-{tag:012x}.");
        let db_name = format!("credit_{kind}_{tag:012x}");
        let mut database = settings.database.clone();
        database.url = with_database(&settings.database.url, &db_name)?;
        let mut amqp = settings.amqp.clone();
        amqp.namespace = namespace.clone();
        // The tool itself is the only producer in its namespace.
        amqp.allowed_producers.clear();
        Ok(Scratch {
            run_id,
            admin_url: with_database(&settings.database.url, "postgres")?,
            namespace,
            db_name,
            database,
            amqp,
        })
    }

    pub fn name(&self, base: &str) -> String {
        format!("{}{base}", self.namespace)
    }

    /// Drops the database and deletes the namespace's queues and exchanges, plus the extra
    /// ones named (base names, namespaced here). Best effort: a failure is reported, not
    /// fatal, since the results are already taken.
    ///
    /// A signal meanwhile (a second Ctrl-C, the first having ended the run) stops it at
    /// once, saying what is left behind.
    pub async fn remove(&self, extra_queues: &[&str], extra_exchanges: &[&str]) {
        tokio::select! {
            () = self.remove_now(extra_queues, extra_exchanges) => {}
            () = crate::signal::wait_for_signal() => eprintln!(
                "interrupted: database {} and the queues of namespace {} may be left behind",
                self.db_name, self.namespace
            ),
        }
    }

    async fn remove_now(&self, extra_queues: &[&str], extra_exchanges: &[&str]) {
        if let Err(e) = self.drop_database().await {
            eprintln!("warning: could not drop database {}: {e}", self.db_name);
        }
        if let Err(e) = self
            .delete_broker_objects(extra_queues, extra_exchanges)
            .await
        {
            eprintln!(
                "warning: could not delete the queues of namespace {}: {e}",
                self.namespace
            );
        }
    }

    async fn drop_database(&self) -> Result<(), sqlx::Error> {
        // Dropping with FORCE can take seconds; that is not a slow statement worth a warning.
        let opts = PgConnectOptions::from_str(&self.admin_url)?
            .log_slow_statements(tracing::log::LevelFilter::Off, Duration::from_secs(60));
        let mut conn = crate::db::bounded(Some(crate::db::CONNECT_TIMEOUT), opts.connect()).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.db_name
        ))
        .execute(&mut conn)
        .await?;
        conn.close().await
    }

    async fn delete_broker_objects(
        &self,
        extra_queues: &[&str],
        extra_exchanges: &[&str],
    ) -> Result<(), lapin::Error> {
        let names = Names::new(&self.namespace);
        let conn =
            crate::amqp::connect_publisher(&self.amqp, "credit-worker scratch cleanup").await?;
        let mut queues = vec![
            names.input_queue,
            names.dead_queue,
            names.control,
            names.progress,
        ];
        queues.extend(extra_queues.iter().map(|q| self.name(q)));
        let mut exchanges = vec![names.input_exchange, names.dlx, names.events, names.ledger];
        exchanges.extend(extra_exchanges.iter().map(|x| self.name(x)));
        // A failed delete closes its channel, so each one gets a fresh channel.
        for q in &queues {
            let ch = conn.create_channel().await?;
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "done".into()).await;
        }
        for x in &exchanges {
            let ch = conn.create_channel().await?;
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = ch.close(200, "done".into()).await;
        }
        crate::tools::close_connection(conn, "done").await
    }
}

/// 48 random bits from the std hasher's per-process random keys, mixed with the clock.
fn random_tag() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish() & 0xffff_ffff_ffff
}

/// `url` with its database name replaced (query parameters kept).
pub(crate) fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base
        .find("://")
        .map(|i| i + 3)
        // Never echo the URL: it may carry a password.
        .ok_or_else(|| anyhow::anyhow!("database.url: not a postgres:// URL"))?;
    let server = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    // A `dbname` parameter would win over the path and take the tool into that database;
    // its name is compared decoded (`db%6Eame`), as the driver reads it.
    let names_database = |p: &str| {
        url::form_urlencoded::parse(p.as_bytes())
            .next()
            .is_some_and(|(k, _)| k == "dbname")
    };
    let kept: Vec<&str> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty() && !names_database(p))
        .collect();
    Ok(if kept.is_empty() {
        format!("{server}/{db}")
    } else {
        format!("{server}/{db}?{}", kept.join("&"))
    })
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_name_is_replaced() {
        let cases = [
            ("postgres://localhost/credit", "postgres://localhost/x"),
            ("postgres://localhost", "postgres://localhost/x"),
            (
                "postgres://u:p@127.0.0.1:5432/credit?sslmode=disable",
                "postgres://u:p@127.0.0.1:5432/x?sslmode=disable",
            ),
            ("postgres:///credit?host=/run", "postgres:///x?host=/run"),
            // The path names the database only when no `dbname` parameter does.
            (
                "postgres://h/postgres?dbname=live&sslmode=require",
                "postgres://h/x?sslmode=require",
            ),
            (
                "postgres://h/credit?db%6Eame=live&%64bname=other",
                "postgres://h/x",
            ),
            ("postgres://h/?dbname=live", "postgres://h/x"),
        ];
        for (url, want) in cases {
            assert_eq!(with_database(url, "x").unwrap(), want);
        }
        assert!(with_database("localhost/credit", "x").is_err());
    }
}
