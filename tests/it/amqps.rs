//! RabbitMQ over TLS (docs/contract.md §3): `amqps://` URLs, verified against the system's roots
//! and `amqp.tls_ca_file`. The suite gives the local broker an amqps listener with a CA made for
//! it (`scripts/broker-tls-listener.sh`, also run by `.ci/run`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use credit_worker::config::Settings;
use credit_worker::service::Worker;

use crate::fixtures::*;
use crate::helpers::*;

const LISTENER_DIR: &str = "/var/lib/rabbitmq/credit-worker-test-tls";
const LISTENER_PORT: u16 = 5671;

/// The local broker's amqps listener and the CAs to check it with.
pub(crate) struct Listener {
    pub(crate) ca: PathBuf,
    other_ca: PathBuf,
}

/// Starts the listener once per test run. None when the broker is not on this machine (then
/// `rabbitmqctl` cannot reach it); on this machine a failure to start it fails the test.
pub(crate) fn listener(env: &TestEnv) -> Option<&'static Listener> {
    static LISTENER: OnceLock<Option<Listener>> = OnceLock::new();
    let url = &env.settings.amqp.url;
    if !(url.contains("@127.0.0.1") || url.contains("@localhost")) {
        skip("the broker is not on this machine");
        return None;
    }
    LISTENER
        .get_or_init(|| {
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/broker-tls-listener.sh"
            );
            let out = std::process::Command::new("bash")
                .arg(script)
                .arg(LISTENER_DIR)
                .env("CREDIT_WORKER_TEST_AMQPS_PORT", LISTENER_PORT.to_string())
                .output()
                .expect("run broker-tls-listener.sh");
            assert!(
                out.status.success(),
                "the amqps listener did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(Listener {
                ca: PathBuf::from(LISTENER_DIR).join("ca.pem"),
                other_ca: PathBuf::from(LISTENER_DIR).join("other-ca.pem"),
            })
        })
        .as_ref()
}

/// The test's settings on the amqps listener (`localhost`, the name in its certificate), with
/// `ca` as `amqp.tls_ca_file`.
pub(crate) fn over_tls(env: &TestEnv, ca: Option<&PathBuf>) -> Settings {
    let mut s = env.settings.clone();
    s.amqp.url = format!("amqps://guest:guest@localhost:{LISTENER_PORT}/%2f");
    s.amqp.tls_ca_file = ca.cloned();
    s
}

#[tokio::test]
async fn a_worker_bills_over_amqps_with_a_private_ca() {
    let env = TestEnv::with(no_refill).await;
    let Some(tls) = listener(&env) else {
        return env.cleanup().await;
    };
    seed(&env, ["alice"], 100).await;
    let mut tap = env.event_tap().await;
    let settings = over_tls(&env, Some(&tls.ca));
    let worker = Worker::start(settings.clone())
        .await
        .expect("start over amqps");
    // The publish command connects the same way.
    let sent = credit_worker::tools::publish::publish_entries(
        &settings,
        &[body(&platform_gpt4("alice", "tls-1"))],
    )
    .await
    .expect("publish over amqps");
    assert_eq!(sent, 1);
    env.wait_decisions(1, Duration::from_secs(30)).await;
    // The seed's GRANT, then the charge, both published by the relay over amqps.
    let events = tap.take(2, Duration::from_secs(30)).await;
    let usage = events
        .iter()
        .find(|e| e.2["transaction_key"] == "USAGE-tls-1")
        .unwrap_or_else(|| panic!("no event for the charge: {events:?}"));
    assert_eq!(usage.0, "balance.changed");
    assert_eq!(usage.2["amount"], -10);
    assert_eq!(usage.2["balance"], 90);
    stop_audit_cleanup(env, worker).await;
}

/// A certificate the worker cannot verify stops it at start with the reason, whether the
/// worker trusts only the system's roots or a CA that did not sign it.
#[tokio::test]
async fn an_unverifiable_broker_certificate_stops_the_worker_at_start() {
    let env = TestEnv::with(quiet_scheduler).await;
    let Some(tls) = listener(&env) else {
        return env.cleanup().await;
    };
    for ca in [None, Some(&tls.other_ca)] {
        let why = format!("against an unverifiable certificate (CA {ca:?})");
        let err = start_refused(over_tls(&env, ca), &why).await;
        assert!(
            err.starts_with("amqp.url: the broker's TLS certificate does not verify"),
            "{err}"
        );
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(err.contains("amqp.tls_ca_file"), "{err}");
        assert!(!err.contains("guest:guest"), "{err}");
    }
    // The operator commands connect the same way and give the same reason.
    let err = credit_worker::tools::publish::publish_entries(
        &over_tls(&env, Some(&tls.other_ca)),
        &[body(&platform_gpt4("alice", "tls-2"))],
    )
    .await
    .expect_err("an unverifiable certificate");
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    env.cleanup().await;
}

/// The host in the URL must be a name in the certificate: the same listener reached as
/// 127.0.0.1 (the certificate names only localhost) is refused.
#[tokio::test]
async fn a_host_the_certificate_does_not_name_is_refused() {
    let env = TestEnv::with(quiet_scheduler).await;
    let Some(tls) = listener(&env) else {
        return env.cleanup().await;
    };
    let mut settings = over_tls(&env, Some(&tls.ca));
    settings.amqp.url = settings.amqp.url.replace("@localhost:", "@127.0.0.1:");
    let err = start_refused(settings, "against a certificate for another host").await;
    assert!(
        err.starts_with("amqp.url: the broker's TLS certificate does not verify"),
        "{err}"
    );
    assert!(err.contains("not valid for name \"127.0.0.1\""), "{err}");
    env.cleanup().await;
}
