//! Layered settings: built-in defaults → config file → `CREDIT_WORKER__SECTION__KEY` env →
//! `DATABASE_URL` / `AMQP_URL`. Everything is validated here so the rest of the crate works
//! with typed, checked values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cost::CostTable;
use crate::decide::{FeePolicy, Pricing};
use crate::ledger::{LedgerPolicy, RefillPolicy};

/// The readable source of the defaults, compiled in so the binary runs from any directory.
pub(crate) const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration error naming `key`.
fn bad(key: &str, why: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid(format!("{key}: {why}")))
}

/// The shortest statement timeout taken: a batch commits in a few to tens of milliseconds.
const MIN_STATEMENT_TIMEOUT_MS: u64 = 100;
/// Longest `amqp.namespace`: every name it prefixes must stay an AMQP short string.
const MAX_NAMESPACE_BYTES: usize = 200;
/// Longest outbox retention: far beyond any audit period, and still a valid interval in SQL.
const MAX_RETENTION_S: u64 = 3_153_600_000;
/// Largest `database.max_connections`.
const MAX_CONNECTIONS: u32 = 10_000;
/// Longest `pipeline.max_wait_ms`.
const MAX_WAIT_MS: u64 = 10_000;
/// A day: a batch held longer than that is a stall by any measure.
const MAX_STALL_S: u64 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Invalid(String),
    #[error("config: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: cannot write the settings as TOML: {0}")]
    Serialize(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub pipeline: PipelineSettings,
    pub refill: RefillSettings,
    pub low_balance: LowBalanceSettings,
    pub execution_fee: ExecutionFeeSettings,
    pub settlement: SettlementSettings,
    pub auto_top_up: AutoTopUpSettings,
    pub outbox: OutboxSettings,
    pub control: ControlSettings,
    pub cost: CostSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

pub use crate::db::DatabaseSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: String,
    pub namespace: String,
    pub prefetch: u16,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
    /// AMQP users (the broker-verified `user_id` property) whose node executions are billed;
    /// empty: any producer.
    #[serde(deserialize_with = "list_or_csv")]
    pub allowed_producers: Vec<String>,
    /// The CA that signs the broker's certificate (`amqps://`), besides the system's roots;
    /// `""` in a file or the environment: none.
    #[serde(deserialize_with = "empty_or_path", serialize_with = "none_as_empty")]
    pub tls_ca_file: Option<PathBuf>,
}

impl AmqpSettings {
    /// The PEM text of `tls_ca_file` (None when unset), checked to hold a certificate.
    pub(crate) fn tls_ca_pem(&self) -> Result<Option<String>, String> {
        self.tls_ca_file.as_deref().map(read_ca_file).transpose()
    }
}

/// The PEM text of a CA file, checked to hold at least one certificate that parses.
fn read_ca_file(path: &Path) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{shown} holds no PEM certificate"));
    }
    Ok(text)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub max_batch: usize,
    pub max_wait_ms: u64,
    /// Batches whose decision transactions may run at once (docs/contract.md §8).
    pub in_flight: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RefillSettings {
    pub enabled: bool,
    pub target: i64,
    pub schedule: CronSchedule,
    pub lazy: bool,
    pub chunk_size: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LowBalanceSettings {
    pub threshold: i64,
}

/// `[auto_top_up]` (docs/contract.md §5).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AutoTopUpSettings {
    /// Seconds an outstanding request suppresses the next one (a failed payment must not
    /// block a user for good).
    pub request_ttl_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionFeeSettings {
    pub every: i64,
    pub amount: i64,
}

/// `[settlement]`: post-flight settlement (docs/contract.md §3).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SettlementSettings {
    pub allow_debt: bool,
}

/// `[outbox]`: how long published events are kept (docs/contract.md §6).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    /// Seconds a published event is kept; 0 keeps every event.
    pub retention_s: u64,
}

impl OutboxSettings {
    /// How long published events are kept, or `None` to keep them all.
    pub(crate) fn retention(&self) -> Option<std::time::Duration> {
        (self.retention_s > 0).then(|| std::time::Duration::from_secs(self.retention_s))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    #[serde(deserialize_with = "list_or_csv")]
    pub allowed_users: Vec<String>,
    /// How long a command without `reply_to` is retried through a transient database fault
    /// before it goes back to the queue; keep it below the broker's `consumer_timeout`.
    pub unanswered_retry_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CostSettings {
    /// A cost table file replacing the built-in one; `""` in a file or the environment: none.
    #[serde(deserialize_with = "empty_or_path", serialize_with = "none_as_empty")]
    pub table: Option<PathBuf>,
    /// A pre-flight estimates file replacing the built-in one; `""`: none.
    #[serde(deserialize_with = "empty_or_path", serialize_with = "none_as_empty")]
    pub preflight_estimates: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Where the HTTP endpoints listen; `""` in a file or the environment: no HTTP server.
    #[serde(deserialize_with = "empty_or_addr", serialize_with = "none_as_empty")]
    pub listen: Option<SocketAddr>,
    /// Seconds the oldest batch in flight may wait for its decision before `/readyz` calls
    /// the consumer stalled; 0: never.
    pub stall_s: u64,
}

impl HttpSettings {
    /// How long a batch may wait before the consumer counts as stalled, if ever.
    pub(crate) fn stall_after(&self) -> Option<std::time::Duration> {
        (self.stall_s > 0).then(|| std::time::Duration::from_secs(self.stall_s))
    }
}

/// `refill.schedule`: the cron expression as written, parsed once when the settings load.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: String,
    parsed: crate::refill::Schedule,
}

impl CronSchedule {
    /// The expression as written (cron with seconds, UTC).
    pub fn as_str(&self) -> &str {
        &self.expr
    }

    /// The parsed schedule.
    pub fn parsed(&self) -> &crate::refill::Schedule {
        &self.parsed
    }
}

impl FromStr for CronSchedule {
    type Err = cron::error::Error;
    fn from_str(expr: &str) -> Result<Self, Self::Err> {
        Ok(CronSchedule {
            expr: expr.to_owned(),
            parsed: crate::refill::Schedule::parse(expr)?,
        })
    }
}

impl std::fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.expr)
    }
}

impl Serialize for CronSchedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.expr)
    }
}

impl<'de> Deserialize<'de> for CronSchedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expr = String::deserialize(d)?;
        expr.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// `""` means none: existing files and `CREDIT_WORKER__HTTP__LISTEN=` keep working.
fn empty_or_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(
            "must be an IP address and port (e.g. 127.0.0.1:9464, not a host name) or empty",
        )
    })
}

fn empty_or_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

/// None is written as `""`, not left out: a missing key would take the default instead.
fn none_as_empty<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => v.serialize(s),
        None => s.serialize_str(""),
    }
}

/// Environment lists arrive as one string ("guest,ops"); files give arrays.
fn list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match ListOrCsv::deserialize(d)? {
        ListOrCsv::List(v) => v,
        ListOrCsv::Csv(s) => {
            let names: Vec<String> = s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            // Commas and no name (`${A},${B}` with both unset) must not pass for the empty
            // list, which for `amqp.allowed_producers` means anyone.
            if names.is_empty() && !s.trim().is_empty() {
                return Err(serde::de::Error::custom(
                    "a comma-separated list with no name in it",
                ));
            }
            names
        }
    })
}

impl Settings {
    /// The ledger's policy: refill and low-balance threshold.
    pub fn ledger_policy(&self) -> LedgerPolicy {
        LedgerPolicy {
            refill: self.refill_policy(),
            lazy_refill: self.refill.enabled && self.refill.lazy,
            low_balance_threshold: self.low_balance.threshold,
            auto_top_up_ttl: chrono::Duration::seconds(
                i64::try_from(self.auto_top_up.request_ttl_s).unwrap_or(i64::MAX / 1000),
            ),
        }
    }

    /// `Some` when refills are enabled.
    pub(crate) fn refill_policy(&self) -> Option<RefillPolicy> {
        self.refill.enabled.then_some(RefillPolicy {
            target: self.refill.target,
        })
    }

    /// Everything a decision depends on besides the database.
    pub fn pricing(&self, costs: CostTable) -> Pricing {
        Pricing {
            costs,
            ledger: self.ledger_policy(),
            fee: FeePolicy {
                every: self.execution_fee.every,
                amount: self.execution_fee.amount,
            },
            allow_debt: self.settlement.allow_debt,
        }
    }

    /// Loads the layered configuration. `file` is `--config`; when absent,
    /// `CREDIT_WORKER_CONFIG` names the file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // Set but empty is unset, as for DATABASE_URL and AMQP_URL.
        let env_file = std::env::var_os("CREDIT_WORKER_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file.as_deref(), &vars)
    }

    /// Like [`Settings::load`] with an explicit environment, so tests don't touch the process's.
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            // Checked here so that a syntax error names the file (figment's would not).
            if let Err(e) = text.parse::<toml::Table>() {
                let why = e.to_string();
                return Err(ConfigError::Invalid(format!(
                    "{}: not valid TOML: {}",
                    path.display(),
                    why.trim_end()
                )));
            }
            fig = fig.merge(Toml::string(&text));
        }
        let prefixed: Vec<(String, String)> = env
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("CREDIT_WORKER__")
                    .map(|rest| (rest.replace("__", ".").to_lowercase(), v.clone()))
            })
            .collect();
        let defaults: toml::Table = toml::from_str(DEFAULT_TOML).unwrap_or_default();
        for (key, value) in &prefixed {
            // An empty list lets any producer in, and an unset `${VAR}` in a template gives
            // exactly this: it must not lift a restriction the file sets.
            if key == "amqp.allowed_producers" && value.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{key}: empty in the environment (an unset variable?); write [] to let \
                     any producer in"
                )));
            }
            // Typed like the key's default: text keys take the value as written ("7" stays a
            // namespace, "1001" a user name), the others by TOML rules ("5" is an integer,
            // "true" a boolean; a bare word that is not valid TOML is taken as a string).
            let parsed = if is_list_key(&defaults, key) && value.trim_start().starts_with('[') {
                // Written as an array, not the comma-separated list: read as one, so that
                // `["guest"]` is not taken for a user of that name.
                parse_env_list(key, value)?
            } else if is_text_key(&defaults, key) {
                figment::value::Value::from(value.clone())
            } else {
                parse_env_value(value)
            };
            fig = fig.merge((key.as_str(), parsed));
        }
        for (var, key) in [("DATABASE_URL", "database.url"), ("AMQP_URL", "amqp.url")] {
            if let Some((_, v)) = env.iter().find(|(k, _)| k == var) {
                if !v.is_empty() {
                    fig = fig.merge((key, v.clone()));
                }
            }
        }
        let settings: Settings = fig
            .extract()
            .map_err(|e| ConfigError::Invalid(describe(&e)))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check_database()?;
        self.check_amqp()?;
        self.check_policies()
    }

    fn check_database(&self) -> Result<(), ConfigError> {
        // The outbox relay's listener holds one connection for good, and a sweep's two ranges
        // in flight take up to two more while it runs: with 3 the decisions wait for a range
        // to commit, with fewer the listener alone could starve them.
        // The pool sets up a slot for every connection it may open: a huge size takes the
        // process's memory at start. PostgreSQL itself serves a few hundred at most.
        if !(3..=MAX_CONNECTIONS).contains(&self.database.max_connections) {
            return bad("database.max_connections", "must be between 3 and 10000");
        }
        // PostgreSQL's limit: above it every connection of the pool is refused after the start
        // (the migrations run without the timeout), which no retry can clear.
        if self.database.statement_timeout_ms > i32::MAX as u64 {
            return bad(
                "database.statement_timeout_ms",
                "must be at most 2147483647 (0 = none)",
            );
        }
        // A few milliseconds cut every batch short (the migrations, run without it, pass), and
        // billing would be retried for ever while /readyz still said consuming.
        if (1..MIN_STATEMENT_TIMEOUT_MS).contains(&self.database.statement_timeout_ms) {
            return bad(
                "database.statement_timeout_ms",
                "must be 0 (none) or at least 100",
            );
        }
        if self.database.url.is_empty() {
            return bad("database.url", "must not be empty");
        }
        if let Some(why) = crate::db::unusable_url(&self.database.url) {
            return bad("database.url", &why);
        }
        if let Some(why) = crate::db::unreadable_tls_file(&self.database.url) {
            return bad("database.url", &why);
        }
        Ok(())
    }

    fn check_amqp(&self) -> Result<(), ConfigError> {
        // Queue and exchange names are AMQP short strings (≤ 255 bytes) with a suffix of up
        // to 19 bytes (`node_execution.dead`).
        if self.amqp.namespace.len() > MAX_NAMESPACE_BYTES {
            return bad("amqp.namespace", "must be at most 200 bytes");
        }
        // The broker strips line breaks from the names it declares, and not from those it
        // binds or consumes from: such a namespace reconnects for ever.
        let ns = &self.amqp.namespace;
        if ns.chars().any(char::is_control) || ns.trim() != ns {
            return bad(
                "amqp.namespace",
                "must hold no control character and no space at either end",
            );
        }
        // The broker refuses to declare such names (ACCESS_REFUSED), which would otherwise be
        // retried forever instead of named at start.
        if self.amqp.namespace.starts_with("amq.") {
            return bad(
                "amqp.namespace",
                "must not start with `amq.` (reserved by AMQP)",
            );
        }
        // 0 would dead-letter a message the first time it comes back (a broker restart, a
        // lost connection), before it was ever decided.
        if self.amqp.delivery_limit == 0 {
            return bad("amqp.delivery_limit", "must be at least 1");
        }
        if self.amqp.prefetch == 0 {
            return bad("amqp.prefetch", "must be at least 1");
        }
        if self.amqp.url.is_empty() {
            return bad("amqp.url", "must not be empty");
        }
        // Checked here, so a typo stops the worker at start instead of being retried as a
        // broker fault for ever.
        // The parser's message quotes the URL, password and all: not repeated. Without its
        // `//`, the rest would be read as a path: the host `localhost`, the credentials lost.
        let has_authority = url::Url::parse(&self.amqp.url).is_ok_and(|u| u.has_authority());
        let uri = match self.amqp.url.parse::<lapin::uri::AMQPUri>() {
            Ok(uri) if has_authority => uri,
            _ if crate::redact::stray_at_text(&self.amqp.url) => {
                return bad("amqp.url", crate::redact::STRAY_AT)
            }
            _ => {
                return bad(
                    "amqp.url",
                    "not an AMQP URL (amqp://user:password@host:port/vhost, or amqps://)",
                )
            }
        };
        // Both travel as AMQP short strings, which the client cannot send (it panics) beyond
        // 255 bytes; no broker accepts such a name anyway.
        if url::Url::parse(&self.amqp.url).is_ok_and(|u| crate::redact::stray_at(&u)) {
            return bad("amqp.url", crate::redact::STRAY_AT);
        }
        if uri.vhost.len() > 255 {
            return bad("amqp.url", "the virtual host is longer than 255 bytes");
        }
        if uri.authority.userinfo.username.len() > 255 {
            return bad("amqp.url", "the user name is longer than 255 bytes");
        }
        if let Some(path) = &self.amqp.tls_ca_file {
            read_ca_file(path)
                .map_err(|why| ConfigError::Invalid(format!("amqp.tls_ca_file: {why}")))?;
        }
        Ok(())
    }

    fn check_policies(&self) -> Result<(), ConfigError> {
        // 0 would hand a failing command back to the queue, and take it again, in a tight loop.
        if self.control.unanswered_retry_s == 0 {
            return bad("control.unanswered_retry_s", "must be at least 1");
        }
        if !(1..=31_536_000).contains(&self.auto_top_up.request_ttl_s) {
            return bad(
                "auto_top_up.request_ttl_s",
                "must be between 1 and 31536000",
            );
        }
        if self.outbox.retention_s > MAX_RETENTION_S {
            return bad(
                "outbox.retention_s",
                "must be at most 3153600000 (100 years)",
            );
        }
        if self.http.stall_s > MAX_STALL_S {
            return bad("http.stall_s", "must be at most 86400 (0 = never)");
        }
        if self.pipeline.max_batch == 0 || self.pipeline.max_batch > 10_000 {
            return bad("pipeline.max_batch", "must be between 1 and 10000");
        }
        // A batch's first delivery waits this long at most; beyond seconds it only adds latency.
        if self.pipeline.max_wait_ms > MAX_WAIT_MS {
            return bad("pipeline.max_wait_ms", "must be at most 10000");
        }
        if !(1..=8).contains(&self.pipeline.in_flight) {
            return bad("pipeline.in_flight", "must be between 1 and 8");
        }
        if self.refill.target < 0 {
            return bad("refill.target", "must be >= 0");
        }
        if self.refill.chunk_size <= 0 {
            return bad("refill.chunk_size", "must be > 0");
        }
        if self.execution_fee.every < 0 {
            return bad("execution_fee.every", "must be >= 0 (0 disables the fee)");
        }
        if self.execution_fee.amount < 0 {
            return bad("execution_fee.amount", "must be >= 0");
        }
        Ok(())
    }

    /// These settings as a configuration file: loading it (with no environment overrides)
    /// gives the same settings, so a parent process can hand a child its exact configuration.
    pub(crate) fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Serialize(e.to_string()))
    }

    /// The name of an exchange or queue in this worker's namespace.
    pub fn name(&self, base: &str) -> String {
        format!("{}{}", self.amqp.namespace, base)
    }
}

/// The default of a dotted `key`, if it has one.
fn default_of<'a>(defaults: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut node = parts.next().and_then(|p| defaults.get(p));
    for part in parts {
        node = node.and_then(|n| n.get(part));
    }
    node
}

/// True when `key` (dotted) is a string or a list of strings in `defaults`.
fn is_text_key(defaults: &toml::Table, key: &str) -> bool {
    matches!(
        default_of(defaults, key),
        Some(toml::Value::String(_) | toml::Value::Array(_))
    )
}

/// True when `key` (dotted) is a list in `defaults`.
fn is_list_key(defaults: &toml::Table, key: &str) -> bool {
    matches!(default_of(defaults, key), Some(toml::Value::Array(_)))
}

/// A list key's value written as a TOML (or JSON) array of strings.
fn parse_env_list(key: &str, raw: &str) -> Result<figment::value::Value, ConfigError> {
    #[derive(Deserialize)]
    struct Wrapped {
        v: Vec<String>,
    }
    match toml::from_str::<Wrapped>(&format!("v = {raw}")) {
        // An empty name is no name: `[""]` (a template whose variable was unset) must not
        // pass for `[]`, which for `amqp.allowed_producers` means anyone.
        Ok(w) if w.v.iter().any(|s| s.trim().is_empty()) => Err(ConfigError::Invalid(format!(
            "{key}: an empty name in the array (write [] for none)"
        ))),
        Ok(w) => Ok(figment::value::Value::from(
            w.v.iter().map(|s| s.trim().to_owned()).collect::<Vec<_>>(),
        )),
        Err(_) => Err(ConfigError::Invalid(format!(
            "{key}: an array must hold only strings, as [\"a\", \"b\"] (or write a \
             comma-separated list: a,b)"
        ))),
    }
}

fn parse_env_value(raw: &str) -> figment::value::Value {
    use figment::value::Value;
    // TOML's integers end at i64::MAX: a larger one would be taken for text ("found string").
    if let Ok(n) = raw.trim().parse::<u64>() {
        return Value::from(n);
    }
    let wrapped = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut t) => match t.remove("v") {
            Some(toml::Value::Integer(i)) => Value::from(i),
            Some(toml::Value::Boolean(b)) => Value::from(b),
            Some(toml::Value::Float(f)) => Value::from(f),
            Some(toml::Value::String(s)) => Value::from(s),
            _ => Value::from(raw.to_owned()),
        },
        Err(_) => Value::from(raw.to_owned()),
    }
}

/// figment's errors carry the key path; render them as "key: problem".
fn describe(e: &figment::Error) -> String {
    e.clone()
        .into_iter()
        .map(|err| {
            let path = err.path.join(".");
            let kind = err.kind.to_string();
            if path.is_empty() {
                kind
            } else {
                format!("{path}: {kind}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::load_from(None, &[]).unwrap();
        assert_eq!(s.database.url, "postgres://localhost/credit");
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.amqp.queue_type, QueueType::Quorum);
        assert_eq!(s.amqp.delivery_limit, 5);
        assert_eq!(s.amqp.namespace, "");
        assert!(s.refill.enabled && s.refill.lazy);
        assert_eq!(s.refill.target, 1000);
        assert_eq!(s.refill.schedule.as_str(), "0 0 0 1 * *");
        assert_eq!(s.low_balance.threshold, 500);
        assert_eq!((s.execution_fee.every, s.execution_fee.amount), (100, 1));
        assert_eq!(s.control.allowed_users, vec!["guest"]);
        assert_eq!(
            s.http.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert_eq!(s.cost.table, None);
        assert_eq!(s.log.format, LogFormat::Text);
        assert_eq!(s.outbox.retention_s, 259_200);
    }

    #[test]
    fn env_overrides_and_urls_win() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("CREDIT_WORKER__AMQP__PREFETCH", "77"),
                ("CREDIT_WORKER__AMQP__NAMESPACE", "t1."),
                ("CREDIT_WORKER__CONTROL__ALLOWED_USERS", "guest, ops"),
                ("CREDIT_WORKER__DATABASE__URL", "postgres://x/y"),
                ("DATABASE_URL", "postgres://127.0.0.1/z"),
            ]),
        )
        .unwrap();
        assert_eq!(s.amqp.prefetch, 77);
        assert_eq!(s.name("node_execution"), "t1.node_execution");
        assert_eq!(s.control.allowed_users, vec!["guest", "ops"]);
        assert_eq!(s.database.url, "postgres://127.0.0.1/z");
    }

    #[test]
    fn a_list_in_the_environment_may_be_written_as_an_array_of_strings() {
        let users = |raw: &str| {
            Settings::load_from(
                None,
                &env(&[("CREDIT_WORKER__CONTROL__ALLOWED_USERS", raw)]),
            )
            .map(|s| s.control.allowed_users)
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            users(r#"["guest", "ops"]"#),
            Ok(vec!["guest".into(), "ops".into()])
        );
        assert_eq!(users(" ['guest']"), Ok(vec!["guest".into()]));
        assert_eq!(users("[]"), Ok(vec![]));
        assert_eq!(users(r#"[" guest"]"#), Ok(vec!["guest".into()]));
        for blank in [r#"[""]"#, r#"[" "]"#, r#"["guest", ""]"#] {
            let e = users(blank).unwrap_err();
            assert!(e.contains("an empty name in the array"), "{blank}: {e}");
        }
        let e = users(" , ").unwrap_err();
        assert!(
            e.starts_with("config: control.allowed_users: a comma-separated list with no name"),
            "{e}"
        );
        assert_eq!(users(""), Ok(vec![]));
        assert_eq!(users("guest,ops"), Ok(vec!["guest".into(), "ops".into()]));
        for bad in ["[guest]", r#"["guest", 5]"#, r#"["guest""#] {
            let e = users(bad).unwrap_err();
            assert!(
                e.starts_with("config: control.allowed_users: an array must hold only strings"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_command_retry_of_zero_is_refused() {
        let e = Settings::load_from(
            None,
            &env(&[("CREDIT_WORKER__CONTROL__UNANSWERED_RETRY_S", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("control.unanswered_retry_s: must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn an_amqp_url_that_does_not_parse_is_refused_at_start() {
        for url in [
            "rabbitmq:5672",
            "amqp://u:secret@host:notaport/%2f",
            "amqp:u:secret@host:5672/%2f",
            "amqp:/u:secret@host:5672/%2f",
        ] {
            let e = Settings::load_from(None, &env(&[("AMQP_URL", url)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("amqp.url: not an AMQP URL ("), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn an_amqp_password_not_percent_encoded_is_refused_unprinted() {
        // The first parses (the password's end taken for the path), the others do not (its
        // start taken for a port): either way the hint.
        for url in [
            "amqp://w:2024/S3CRET@rabbit/%2f",
            "amqp://w:S3/CRET@rabbit:5672/%2f",
            "amqp://w:S3?CRET@rabbit/%2f",
        ] {
            let e = Settings::load_from(None, &env(&[("AMQP_URL", url)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("amqp.url: an `@` after the host"), "{e}");
            assert!(!e.contains("CRET"), "{e}");
        }
        // An `@` in a parameter's value is no password's: the URL's own fault is named.
        let url = "amqp://guest:guest@127.0.0.1:99999/%2f?connection_name=a@b";
        let e = Settings::load_from(None, &env(&[("AMQP_URL", url)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqp.url: not an AMQP URL ("), "{e}");
    }

    #[test]
    fn an_amqp_url_with_a_name_no_broker_takes_is_refused_at_start() {
        let long = "v".repeat(256);
        let cases = [
            (format!("amqp://u:p@host:5672/{long}"), "the virtual host"),
            (format!("amqp://{long}:p@host:5672/%2f"), "the user name"),
        ];
        for (url, what) in cases {
            let e = Settings::load_from(None, &env(&[("AMQP_URL", &url)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("amqp.url: {what} is longer than 255 bytes")),
                "{e}"
            );
        }
        let longest = format!("amqp://u:p@host:5672/{}", "v".repeat(255));
        assert!(Settings::load_from(None, &env(&[("AMQP_URL", &longest)])).is_ok());
    }

    #[test]
    fn a_tls_file_the_database_url_names_must_be_readable_at_start() {
        let url = "postgres://u@db/credit?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem";
        let e = Settings::load_from(None, &env(&[("DATABASE_URL", url)]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("database.url: sslrootcert: /nonexistent/ca.pem: "),
            "{e}"
        );
        let readable = "postgres://u@db/credit?sslmode=verify-full&sslrootcert=Cargo.toml";
        assert!(Settings::load_from(None, &env(&[("DATABASE_URL", readable)])).is_ok());
    }

    #[test]
    fn a_statement_timeout_postgresql_refuses_is_refused_at_start() {
        let load = |ms: &str| {
            Settings::load_from(
                None,
                &env(&[("CREDIT_WORKER__DATABASE__STATEMENT_TIMEOUT_MS", ms)]),
            )
        };
        let e = load("2147483648").unwrap_err().to_string();
        assert!(
            e.contains("database.statement_timeout_ms: must be at most 2147483647"),
            "{e}"
        );
        assert_eq!(
            load("2147483647").unwrap().database.statement_timeout_ms,
            2_147_483_647
        );
        let e = load("18446744073709551615").unwrap_err().to_string();
        assert!(
            e.contains("database.statement_timeout_ms: must be at most 2147483647"),
            "{e}"
        );
        for ms in ["1", "99"] {
            let e = load(ms).unwrap_err().to_string();
            assert!(
                e.contains("database.statement_timeout_ms: must be 0 (none) or at least 100"),
                "{ms}: {e}"
            );
        }
        assert_eq!(load("0").unwrap().database.statement_timeout_ms, 0);
        assert_eq!(load("100").unwrap().database.statement_timeout_ms, 100);
    }

    #[test]
    fn a_pool_too_small_to_run_or_too_large_to_hold_is_refused() {
        // Too small a pool to run: the relay's listener and a sweep's lock hold two. Too large
        // a one takes the memory of a slot per connection at start.
        for n in ["2", "10001", "4294967295"] {
            let e = Settings::load_from(
                None,
                &env(&[("CREDIT_WORKER__DATABASE__MAX_CONNECTIONS", n)]),
            )
            .unwrap_err()
            .to_string();
            assert_eq!(
                e, "config: database.max_connections: must be between 3 and 10000",
                "{n}"
            );
        }
        let s = Settings::load_from(
            None,
            &env(&[("CREDIT_WORKER__DATABASE__MAX_CONNECTIONS", "10000")]),
        )
        .unwrap();
        assert_eq!(s.database.max_connections, 10_000);
    }

    #[test]
    fn a_database_url_that_is_no_postgres_url_is_refused() {
        for (url, why) in [
            (
                "notaurl",
                "config: database.url: not a URL (relative URL without a base)",
            ),
            (
                "mysql://root@localhost/credit",
                "config: database.url: the scheme must be postgres or postgresql, not mysql",
            ),
            // Without its `//`: no database on localhost named "root:s3cret@db/credit".
            (
                "postgres:root:s3cret@db/credit",
                "config: database.url: postgres:// must begin it",
            ),
            (
                "postgres:/root:s3cret@db/credit",
                "config: database.url: postgres:// must begin it",
            ),
            (
                "postgres://root@127.0.0.1:99999/db?application_name=ops@host",
                "config: database.url: not a URL (invalid port number)",
            ),
            // A password holding `/`, not percent-encoded: its start read as a port.
            (
                "postgres://root:s3/cret@db/credit",
                "config: database.url: not a URL (invalid port number): an `@` after the host: \
                 a password holding `/`, `?` or `#` must be percent-encoded (%2F, %3F, %23)",
            ),
        ] {
            let e = Settings::load_from(None, &env(&[("DATABASE_URL", url)]))
                .unwrap_err()
                .to_string();
            assert_eq!(e, why);
        }
        for url in [
            "postgresql://u@h:5433/d?sslmode=disable",
            "postgres:///credit",
        ] {
            Settings::load_from(None, &env(&[("DATABASE_URL", url)])).unwrap();
        }
    }

    #[test]
    fn a_batch_wait_beyond_ten_seconds_is_refused() {
        let e = Settings::load_from(
            None,
            &env(&[("CREDIT_WORKER__PIPELINE__MAX_WAIT_MS", "10001")]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "config: pipeline.max_wait_ms: must be at most 10000");
    }

    #[test]
    fn env_values_of_text_keys_stay_text_even_when_they_look_like_numbers() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("CREDIT_WORKER__AMQP__NAMESPACE", "7"),
                ("CREDIT_WORKER__CONTROL__ALLOWED_USERS", "1001"),
                ("CREDIT_WORKER__AMQP__ALLOWED_PRODUCERS", "true"),
                ("CREDIT_WORKER__PIPELINE__MAX_BATCH", "50"),
                ("CREDIT_WORKER__REFILL__ENABLED", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(s.amqp.namespace, "7");
        assert_eq!(s.control.allowed_users, vec!["1001"]);
        assert_eq!(s.amqp.allowed_producers, vec!["true"]);
        // Empty is not `[]` for the one list where empty means anyone.
        for blank in ["", "  "] {
            let e = Settings::load_from(
                None,
                &env(&[("CREDIT_WORKER__AMQP__ALLOWED_PRODUCERS", blank)]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("amqp.allowed_producers: empty in the environment"),
                "{e}"
            );
        }
        let any = Settings::load_from(
            None,
            &env(&[("CREDIT_WORKER__AMQP__ALLOWED_PRODUCERS", "[]")]),
        )
        .unwrap();
        assert!(any.amqp.allowed_producers.is_empty());
        assert_eq!(s.pipeline.max_batch, 50);
        assert!(!s.refill.enabled);
        // A number key still refuses text, naming the key.
        let e = Settings::load_from(None, &env(&[("CREDIT_WORKER__AMQP__PREFETCH", "many")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqp.prefetch"), "{e}");
    }

    #[test]
    fn unknown_and_ill_typed_keys_are_named() {
        let e = Settings::load_from(None, &env(&[("CREDIT_WORKER__AMQP__PREFECH", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefech"), "{e}");
        let e = Settings::load_from(None, &env(&[("CREDIT_WORKER__AMQP__PREFETCH", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqp.prefetch"), "{e}");
        let long = "n".repeat(201);
        let e = Settings::load_from(None, &env(&[("CREDIT_WORKER__AMQP__NAMESPACE", &long)]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("amqp.namespace: must be at most 200 bytes"),
            "{e}"
        );
        for (var, value, expected) in [
            (
                "CREDIT_WORKER__AMQP__NAMESPACE",
                "amq.t1.",
                "amqp.namespace: must not start with `amq.` (reserved by AMQP)",
            ),
            (
                "CREDIT_WORKER__AMQP__NAMESPACE",
                "t1 \n",
                "amqp.namespace: must hold no control character and no space at either end",
            ),
            (
                "CREDIT_WORKER__AMQP__NAMESPACE",
                " t1.",
                "amqp.namespace: must hold no control character and no space at either end",
            ),
            (
                "CREDIT_WORKER__AMQP__DELIVERY_LIMIT",
                "0",
                "amqp.delivery_limit: must be at least 1",
            ),
        ] {
            let e = Settings::load_from(None, &env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{e}");
        }
        let e = Settings::load_from(None, &env(&[("CREDIT_WORKER__REFILL__SCHEDULE", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("refill.schedule"), "{e}");
        let e = Settings::load_from(None, &env(&[("CREDIT_WORKER__AMQP__QUEUE_TYPE", "stream")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqp.queue_type"), "{e}");
    }

    #[test]
    fn a_broker_ca_file_must_hold_a_certificate() {
        let load = |path: &str| {
            Settings::load_from(None, &env(&[("CREDIT_WORKER__AMQP__TLS_CA_FILE", path)]))
                .map_err(|e| e.to_string())
        };
        assert_eq!(load("").unwrap().amqp.tls_ca_file, None);
        let e = load("/nonexistent/ca.pem").unwrap_err();
        assert!(
            e.starts_with("config: amqp.tls_ca_file: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("credit-worker-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let e = load(empty.to_str().unwrap()).unwrap_err();
        assert!(e.ends_with("empty.pem holds no PEM certificate"), "{e}");
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load(broken.to_str().unwrap()).unwrap_err();
        assert!(e.contains("broken.pem is not PEM"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_strings_mean_none_and_values_are_typed() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("CREDIT_WORKER__HTTP__LISTEN", ""),
                ("CREDIT_WORKER__COST__TABLE", "/etc/credit/costs.toml"),
            ]),
        )
        .unwrap();
        assert_eq!(s.http.listen, None);
        assert_eq!(s.cost.table, Some(PathBuf::from("/etc/credit/costs.toml")));
        let s = Settings::load_from(None, &env(&[("CREDIT_WORKER__HTTP__LISTEN", "[::1]:9000")]))
            .unwrap();
        assert_eq!(s.http.listen, Some("[::1]:9000".parse().unwrap()));
        let e = Settings::load_from(None, &env(&[("CREDIT_WORKER__HTTP__LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("http.listen") && e.contains("IP address and port"),
            "{e}"
        );
        let s = Settings::load_from(
            None,
            &env(&[("CREDIT_WORKER__REFILL__SCHEDULE", "0 0 0 1 1 * 2099")]),
        )
        .unwrap();
        assert_eq!(s.refill.schedule.to_string(), "0 0 0 1 1 * 2099");
        assert!(s
            .refill
            .schedule
            .parsed()
            .next_after(chrono::Utc::now())
            .is_some());
    }

    #[test]
    fn file_layer_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("cw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[refill]\ntarget = 2500\n").unwrap();
        let s = Settings::load_from(Some(&path), &[]).unwrap();
        assert_eq!(s.refill.target, 2500);
        assert!(s.refill.lazy);
    }

    #[test]
    fn a_file_that_is_not_toml_is_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("cw-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[refill\ntarget = 2500\n").unwrap();
        let e = Settings::load_from(Some(&path), &[]).map(|_| ());
        let _ = std::fs::remove_dir_all(&dir);
        let e = e.unwrap_err().to_string();
        let named = format!("config: {}: not valid TOML: ", path.display());
        assert!(e.starts_with(&named), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn an_http_address_must_be_an_ip_and_port() {
        let e = Settings::load_from(
            None,
            &env(&[("CREDIT_WORKER__HTTP__LISTEN", "localhost:9464")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config: http.listen: must be an IP address and port"),
            "{e}"
        );
    }

    #[test]
    fn settings_round_trip_through_a_file() {
        let dir = std::env::temp_dir().join(format!("cw-config-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let s = Settings::load_from(
            None,
            &env(&[
                ("CREDIT_WORKER__AMQP__NAMESPACE", "rt."),
                ("CREDIT_WORKER__CONTROL__ALLOWED_USERS", "guest,ops"),
                ("CREDIT_WORKER__HTTP__LISTEN", ""),
                ("CREDIT_WORKER__REFILL__SCHEDULE", "0 0 0 1 1 * 2099"),
                ("CREDIT_WORKER__LOG__FORMAT", "json"),
            ]),
        )
        .unwrap();
        let text = s.to_toml().unwrap();
        std::fs::write(&path, &text).unwrap();
        let back = Settings::load_from(Some(&path), &[]).unwrap();
        assert_eq!(back.to_toml().unwrap(), text);
        assert_eq!(back.amqp.namespace, "rt.");
        assert_eq!(back.control.allowed_users, vec!["guest", "ops"]);
        assert_eq!(back.log.format, LogFormat::Json);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
