//! PostgreSQL over TLS, set the conventional way in the URL (docs/contract.md §8).

use credit_worker::db::DatabaseSettings;

use crate::helpers::*;

fn settings(env: &TestEnv, params: &str) -> DatabaseSettings {
    let mut s = env.settings.database.clone();
    s.url = format!("{}?{params}", s.url);
    s
}

#[tokio::test]
async fn sslmode_require_connects_over_tls() {
    let env = TestEnv::new().await;
    let pool = credit_worker::db::connect_and_migrate(&settings(&env, "sslmode=require"))
        .await
        .expect("TLS connection");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the session is encrypted");
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_unverifiable_server_certificate_is_refused_with_the_reason() {
    let env = TestEnv::new().await;
    let err = credit_worker::db::connect_and_migrate(&settings(&env, "sslmode=verify-full"))
        .await
        .expect_err("the local server's certificate is not signed by a public root");
    let text = err.to_string();
    assert!(text.contains("certificate"), "{text}");
    assert!(!credit_worker::db::is_transient(&err), "{err:?}");
    env.cleanup().await;
}

/// The worker stops at start with the problem named, instead of retrying forever.
#[tokio::test]
async fn the_worker_refuses_to_start_on_an_unverifiable_certificate() {
    let env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    settings.database = self::settings(&env, "sslmode=verify-full");
    let err = match credit_worker::service::Worker::start(settings).await {
        Ok(_) => panic!("started against an unverifiable certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.starts_with("database.url: the server's TLS certificate does not verify"),
        "{err}"
    );
    assert!(err.contains("sslrootcert"), "{err}");
    env.cleanup().await;
}
