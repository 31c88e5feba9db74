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
    let err = start_refused(settings, "against an unverifiable certificate").await;
    assert!(
        err.starts_with("database.url: the server's TLS certificate does not verify"),
        "{err}"
    );
    assert!(err.contains("sslrootcert"), "{err}");
    env.cleanup().await;
}

/// Where the test CA and the server certificate it signs live: beside the server's data, owned
/// by the server's user, and kept (a server restarted after a killed test still finds them).
const TLS_DIR: &str = "/var/lib/postgresql/credit-worker-test-tls";

/// Puts the local server on a certificate signed by a CA made here, and back on drop.
struct ServerCertificate {
    admin_url: String,
}

impl ServerCertificate {
    /// None when the server is not on this machine or the tools are missing.
    async fn install(admin_url: &str) -> Option<ServerCertificate> {
        let dir = std::path::Path::new(TLS_DIR);
        std::fs::create_dir_all(dir).ok()?;
        let sh = |script: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let made = sh(
            "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
               -subj /CN=credit-worker-test-ca 2>/dev/null && \
             openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
               -subj /CN=localhost 2>/dev/null && \
             printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext && \
             openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
               -out server.pem -days 2 -extfile san.ext 2>/dev/null && \
             openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.pem \
               -days 2 -subj /CN=some-other-ca 2>/dev/null && \
             chown postgres server.key server.pem && chmod 600 server.key",
        );
        if !made {
            return None;
        }
        let admin = sqlx::PgPool::connect(admin_url).await.ok()?;
        for sql in [
            format!("ALTER SYSTEM SET ssl_cert_file = '{TLS_DIR}/server.pem'"),
            format!("ALTER SYSTEM SET ssl_key_file = '{TLS_DIR}/server.key'"),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            sqlx::query(&sql).execute(&admin).await.ok()?;
        }
        admin.close().await;
        Some(ServerCertificate {
            admin_url: admin_url.to_owned(),
        })
    }
}

impl Drop for ServerCertificate {
    fn drop(&mut self) {
        let url = self.admin_url.clone();
        // Drop cannot await; the server must get its own certificate back even on a panic.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let admin = sqlx::PgPool::connect(&url).await?;
                for sql in [
                    "ALTER SYSTEM RESET ssl_cert_file",
                    "ALTER SYSTEM RESET ssl_key_file",
                    "SELECT pg_reload_conf()",
                ] {
                    sqlx::query(sql).execute(&admin).await?;
                }
                admin.close().await;
                Ok::<_, sqlx::Error>(())
            })
            .map_err(std::io::Error::other)
        })
        .join();
    }
}

/// verify-full against a certificate signed by a CA given in `sslrootcert` connects; the
/// same with a CA that did not sign it is refused.
#[tokio::test]
async fn verify_full_with_the_signing_ca_connects_and_with_another_is_refused() {
    // Its worker's start-up sweep counts in `credit_refill_runs_total`.
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::new().await;
    let admin_url = match env.settings.database.url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/postgres"),
        None => panic!("database url without a name"),
    };
    let local = admin_url.contains("@127.0.0.1") || admin_url.contains("@localhost");
    let Some(_cert) = (if local {
        ServerCertificate::install(&admin_url).await
    } else {
        None
    }) else {
        skip("the server is not on this machine, or openssl is missing");
        env.cleanup().await;
        return;
    };
    let good = settings(
        &env,
        &format!("sslmode=verify-full&sslrootcert={TLS_DIR}/ca.pem"),
    );
    // The reload is asynchronous: new sessions get the new certificate shortly.
    wait_for(
        std::time::Duration::from_secs(20),
        "the new certificate",
        || {
            let good = good.clone();
            async move { credit_worker::db::connect_and_migrate(&good).await.is_ok() }
        },
    )
    .await;
    // The worker itself on verify-full, with its broker over amqps with a private CA.
    if let Some(broker) = crate::amqps::listener(&env) {
        let mut both = crate::amqps::over_tls(&env, Some(&broker.ca));
        both.database = good.clone();
        let worker = credit_worker::service::Worker::start(both.clone())
            .await
            .expect("the worker starts on verify-full and amqps");
        let entry = body(&platform_gpt4("tls-user", "tls-both-1"));
        credit_worker::tools::publish::publish_entries(&both, &[entry])
            .await
            .expect("publish over amqps");
        env.wait_decisions(1, std::time::Duration::from_secs(30))
            .await;
        worker.stop().await.expect("stop");
        let charged = env
            .scalar_i64(
                "SELECT count(*) FROM credit.transactions WHERE transaction_key = 'USAGE-tls-both-1'",
            )
            .await;
        assert_eq!(charged, 1);
    }
    let other = settings(
        &env,
        &format!("sslmode=verify-full&sslrootcert={TLS_DIR}/other.pem"),
    );
    let err = credit_worker::db::connect_and_migrate(&other)
        .await
        .expect_err("a CA that did not sign the server's certificate");
    assert!(err.to_string().contains("certificate"), "{err}");
    // As with libpq, `require` with a root certificate checks the server against it.
    let require = settings(
        &env,
        &format!("sslmode=require&sslrootcert={TLS_DIR}/other.pem"),
    );
    let err = credit_worker::db::connect_and_migrate(&require)
        .await
        .expect_err("sslmode=require with a CA that did not sign the server's certificate");
    assert!(err.to_string().contains("certificate"), "{err}");
    let require = settings(
        &env,
        &format!("sslmode=require&sslrootcert={TLS_DIR}/ca.pem"),
    );
    let pool = credit_worker::db::connect_and_migrate(&require).await;
    assert!(pool.is_ok(), "{:?}", pool.err());
    env.cleanup().await;
}

/// Migrations run on a connection of their own, without the worker's statement timeout: an
/// index built on a large table may take longer than any statement of the worker's.
#[tokio::test]
async fn migrations_are_not_cut_short_by_the_statement_timeout() {
    use sqlx::Connection;
    let env = TestEnv::with(|s| s.database.statement_timeout_ms = 1).await;
    // Read on a connection of the test's own: the pool's 1 ms may cut a query short.
    let mut conn = sqlx::PgConnection::connect(&env.settings.database.url)
        .await
        .expect("a connection");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .expect("the migrations applied");
    assert_eq!(applied, credit_worker::db::migrations() as i64);
    // The worker's own connections keep their timeout.
    let pool = env.pool.clone();
    wait_for(
        std::time::Duration::from_secs(10),
        "the pool's statement_timeout",
        || {
            let pool = pool.clone();
            async move {
                let shown: Result<String, _> = sqlx::query_scalar("SHOW statement_timeout")
                    .fetch_one(&pool)
                    .await;
                shown.is_ok_and(|t| t == "1ms")
            }
        },
    )
    .await;
    let _ = conn.close().await;
    env.cleanup().await;
}
