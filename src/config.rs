//! Configuration: the TOML file, environment overrides, defaults and validation (CONTRACT §8, §9).
//!
//! One [`Config`] is loaded once at start-up by [`Config::load`] and handed down; nothing reads
//! the environment or the file anywhere else.
//!
//! Loading goes in four steps, in one place:
//!
//! 1. the file (`--config FILE`, else `/etc/turnd/turnd.toml` if it exists, else nothing) is
//!    parsed into a [`toml::Table`];
//! 2. environment overrides `TURND_<SECTION>__<KEY>` replace single keys of that table. Values
//!    are TOML, except for keys whose type is a string (URLs, durations, names, enums), which
//!    take the raw value as-is, so `TURND_DATABASE__URL=postgres://…` needs no quotes;
//! 3. each section is deserialized on its own, so that an error names its dotted key
//!    (`worker.idle_timeout: invalid duration …`);
//! 4. [`Config::validate`] checks ranges and cross-key rules, again naming the key.
//!
//! Secrets (`database.url`, `amqp.url`, `http.admin_token`, `http.read_token`, the values of
//! `worker.env`) live in redacting types ([`SecretUrl`], [`Secret`]): `Debug`, `Display` and
//! `Serialize` print `***` for the password, and only `.expose()` gives the real value.
//!
//! *Architecture invariant*: this module only reads the environment for `TURND_<SECTION>__<KEY>`
//! names. `TURND_WORKER_ENV_<NAME>` variables are worker pass-through (CONTRACT §5), never
//! config; [`is_worker_env_passthrough`] recognises them for the worker module.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::{Table, Value};

/// The config file read when no `--config` is given, if it exists.
pub const DEFAULT_PATH: &str = "/etc/turnd/turnd.toml";

/// Prefix of every environment override (`TURND_<SECTION>__<KEY>`).
const ENV_PREFIX: &str = "TURND_";

/// Prefix of the daemon variables passed to workers without it (CONTRACT §5).
const WORKER_ENV_PREFIX: &str = "TURND_WORKER_ENV_";

/// File name of the bundled demo worker, installed next to the `turnd` binary.
const DEMO_WORKER: &str = "turnd-demo-worker";

/// A config file larger than this is refused before it is read whole or parsed (a real one
/// is a few KiB): one wrong path must not cost the daemon unbounded memory.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// TOML's parse messages quote the offending line; longer ones are cut to this many bytes.
const MAX_MESSAGE_BYTES: usize = 2048;

/// Result of this module.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// Why the configuration could not be loaded. Its `Display` is meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message, with line and column.
        message: String,
    },
    /// A key has a wrong type or an invalid value, or is unknown.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `amqp.prefix` (or a section name for an unknown section).
        key: String,
        /// What is wrong and where it was set.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key this error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Parse { .. } => None,
        }
    }

    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// A URL that may carry a password. `Debug`, `Display` and `Serialize` show the password (and
/// any `password=` query parameter) as `***`; [`SecretUrl::expose`] gives the real URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(url::Url);

impl SecretUrl {
    /// The real URL, password included. Pass it to the client library and nowhere else.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// The URL scheme, e.g. `postgres`.
    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }

    /// The URL with its password and `password=` query parameters replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        if url.password().is_some() {
            // Only fails for URLs that cannot have a password, and this one has one.
            let _ = url.set_password(Some("***"));
        }
        if url.query_pairs().any(|(k, _)| is_secret_param(&k)) {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if is_secret_param(&k) { "***".to_owned() } else { v.into_owned() };
                    (k.into_owned(), v)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string()
    }
}

fn is_secret_param(name: &str) -> bool {
    name.to_ascii_lowercase().contains("password")
}

impl FromStr for SecretUrl {
    type Err = url::ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        url::Url::parse(s).map(SecretUrl)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SecretUrl;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a URL string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretUrl, E> {
                // The value is not echoed: it may hold a password.
                v.parse().map_err(|e| E::custom(format!("invalid URL: {e}")))
            }
        }
        d.deserialize_str(V)
    }
}

/// `amqp.url`: one broker URL or several (the nodes of one RabbitMQ cluster), tried in order.
/// In TOML a string or an array of strings; in the environment (`TURND_AMQP__URL`) one URL, URLs
/// separated by commas, or a TOML array. A comma inside a URL is written `%2C`.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrls(Vec<SecretUrl>);

impl AmqpUrls {
    /// The URLs in the order a daemon tries them; never empty once loaded.
    pub fn iter(&self) -> impl Iterator<Item = &SecretUrl> {
        self.0.iter()
    }

    /// How many URLs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none (only an invalid config has none).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `i`-th URL.
    pub fn get(&self, i: usize) -> Option<&SecretUrl> {
        self.0.get(i)
    }

    /// The first URL: the one-shot commands (`turnd send`) and tests use it.
    pub fn first(&self) -> Option<&SecretUrl> {
        self.0.first()
    }

    fn parse_text(text: &str) -> Result<AmqpUrls, String> {
        let text = text.trim();
        let parts: Vec<String> = if text.starts_with('[') {
            // The environment form of a TOML array.
            let mut table: Table =
                format!("value = {text}").parse().map_err(|e: toml::de::Error| {
                    format!("not a TOML list of URLs: {}", e.message())
                })?;
            match table.remove("value") {
                Some(Value::Array(items)) => items
                    .into_iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s),
                        other => {
                            Err(format!("a list of URL strings, found a {}", other.type_str()))
                        }
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err("not a TOML list of URLs".into()),
            }
        } else {
            text.split(',').map(|s| s.trim().to_owned()).collect()
        };
        AmqpUrls::from_strings(parts)
    }

    fn from_strings(parts: Vec<String>) -> Result<AmqpUrls, String> {
        if parts.is_empty() {
            return Err("the list of URLs is empty".into());
        }
        let mut urls = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            // The value is not echoed: it may hold a password.
            let url = part.parse().map_err(|e| {
                if parts.len() == 1 {
                    format!("invalid URL: {e}")
                } else {
                    format!("URL {} of {} is invalid: {e}", i + 1, parts.len())
                }
            })?;
            urls.push(url);
        }
        Ok(AmqpUrls(urls))
    }
}

impl From<SecretUrl> for AmqpUrls {
    fn from(url: SecretUrl) -> Self {
        AmqpUrls(vec![url])
    }
}

impl fmt::Debug for AmqpUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl Serialize for AmqpUrls {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // One URL prints as the string it was usually written as.
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for AmqpUrls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AmqpUrls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a URL string or a list of URL strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AmqpUrls, E> {
                AmqpUrls::parse_text(v).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<AmqpUrls, A::Error> {
                let mut parts = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    parts.push(s);
                }
                AmqpUrls::from_strings(parts).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A secret string (a token). `Debug`, `Display` and `Serialize` show `***`;
/// [`Secret::expose`] gives the real value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The real value.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` equals the secret (for bearer tokens), in constant time: both are
    /// hashed first and the digests compared without an early exit, so the time depends on
    /// neither the position of the first wrong byte nor the secret's length.
    pub fn matches(&self, candidate: &str) -> bool {
        use sha2::{Digest, Sha256};
        let a: [u8; 32] = Sha256::digest(self.0.as_bytes()).into();
        let b: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        constant_time_eq(&a, &b)
    }

    /// HMAC-SHA256 of `message` keyed with the secret (RFC 2104): a value that proves
    /// knowledge of the secret without containing it (the console's session cookie).
    pub fn mac(&self, message: &[u8]) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        const BLOCK: usize = 64;
        let mut key = [0u8; BLOCK];
        if self.0.len() > BLOCK {
            key[..32].copy_from_slice(&Sha256::digest(self.0.as_bytes()));
        } else {
            key[..self.0.len()].copy_from_slice(self.0.as_bytes());
        }
        let pad = |byte: u8| key.map(|k| k ^ byte);
        let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
        Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
    }
}

/// Whether two digests are equal, looking at every byte whatever the first difference.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

// ---------------------------------------------------------------------------------------------
// serde helpers
// ---------------------------------------------------------------------------------------------

/// `Duration` as a humantime string: "250ms", "5s", "10m", "7d".
mod duration_str {
    use std::fmt;
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration string such as "250ms", "5s", "10m" or "7d""#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v)
                    .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}")))
            }
        }
        d.deserialize_str(V)
    }
}

/// `Option<SocketAddr>` as a string, where `""` is `None` (disabled).
mod listen_addr {
    use std::fmt;
    use std::net::SocketAddr;

    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        a: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Option<SocketAddr>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"an address "ip:port" such as "127.0.0.1:9187", or "" to disable"#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<SocketAddr>, E> {
                let v = v.trim();
                if v.is_empty() {
                    return Ok(None);
                }
                v.parse().map(Some).map_err(|e| {
                    E::custom(format!(
                        "invalid listen address {v:?}: {e}; write \"ip:port\" such as \
                         \"127.0.0.1:9187\" or \"[::]:9187\", or \"\" to disable"
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

/// The whole configuration (CONTRACT §9), one field per TOML section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[daemon]`: this process.
    pub daemon: DaemonConfig,
    /// `[database]`: PostgreSQL.
    pub database: DatabaseConfig,
    /// `[amqp]`: RabbitMQ.
    pub amqp: AmqpConfig,
    /// `[session]`: conversation state.
    pub session: SessionConfig,
    /// `[intake]`: how turns are accepted, refused and parked.
    pub intake: IntakeConfig,
    /// `[worker]`: the worker processes.
    pub worker: WorkerConfig,
    /// `[turn]`: turn deadlines.
    pub turn: TurnConfig,
    /// `[reply]`: the reply outbox.
    pub reply: ReplyConfig,
    /// `[sweep]`: the periodic sweep for lapsed turns and orphaned deployments.
    pub sweep: SweepConfig,
    /// `[shutdown]`: graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// `[http]`: metrics, health, console and API.
    pub http: HttpConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
    /// `[otel]`: OpenTelemetry trace export.
    pub otel: OtelConfig,
    /// The file this was read from, if any (not a key): a sandboxed worker may not read it.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[daemon]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Name of this daemon in status and logs; default `<hostname>-<pid>`. Must be unique
    /// among live daemons.
    pub id: String,
    /// Directory below which worker workspaces live.
    pub state_dir: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            id: format!("{}-{}", hostname(), std::process::id()),
            state_dir: PathBuf::from("/var/lib/turnd"),
        }
    }
}

/// `[database]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL (`postgres://` or `postgresql://`). A secret: keep it in the environment
    /// file as `TURND_DATABASE__URL`.
    pub url: SecretUrl,
    /// Size of the connection pool (the cross-pod lock sessions are not taken from it).
    pub max_connections: u32,
    /// Whether `turnd run` applies pending migrations at start-up.
    pub auto_migrate: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: default_url("postgres://127.0.0.1:5432/turnd"),
            max_connections: 10,
            auto_migrate: true,
        }
    }
}

/// `[amqp]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// RabbitMQ URL (`amqp://` or `amqps://`), or a list of them: the nodes of one cluster,
    /// tried in order (README "Running past one machine"). A secret: keep it in the environment
    /// file as `TURND_AMQP__URL` (several: comma-separated).
    pub url: AmqpUrls,
    /// Prefix of every exchange and queue name, `^[a-z0-9_-]{1,64}$`.
    pub prefix: String,
    /// Inbox prefetch (unacknowledged deliveries) per daemon.
    pub prefetch: u16,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: default_url("amqp://guest:guest@127.0.0.1:5672/%2f").into(),
            prefix: "turnd".to_owned(),
            prefetch: 64,
        }
    }
}

/// `[session]`
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Where conversation state lives; decides how turns without context are treated
    /// (CONTRACT §4).
    pub store: SessionStore,
}

/// `session.store`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionStore {
    /// `"snapshot"`: turns with a `runId` write a shared snapshot and need
    /// `organizationId` and `conversationId`.
    #[default]
    Snapshot,
    /// `"file"`: state lives in the workspace; every turn runs as a legacy turn.
    File,
}

/// `[intake]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    /// Largest accepted turn body in bytes; a larger one is parked as `INVALID_TURN`.
    pub max_turn_bytes: usize,
    /// Refusals before a refused turn is parked with `MISSING_CONTEXT`.
    pub max_attempts: u32,
    /// Delay before the first requeue of a refused turn; doubles each attempt.
    #[serde(with = "duration_str")]
    pub retry_delay: Duration,
    /// Upper bound of the requeue delay.
    #[serde(with = "duration_str")]
    pub retry_max_delay: Duration,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            max_turn_bytes: 262_144,
            max_attempts: 5,
            retry_delay: Duration::from_secs(2),
            retry_max_delay: Duration::from_secs(60),
        }
    }
}

/// `[worker]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The worker's argv (never run through a shell); default: the bundled demo worker next
    /// to the `turnd` binary.
    pub command: Vec<String>,
    /// Extra environment variables for every worker. Values are secrets (API keys end up
    /// here): `check-config` and `Debug` show `***`.
    pub env: BTreeMap<String, Secret>,
    /// Live workers per daemon; past it the least recently used idle one is stopped, and
    /// waiting deployments are admitted round-robin across organizations.
    pub max_workers: usize,
    /// Live workers of one organization on this daemon; 0 = no cap. A turn of an organization
    /// at its cap stays queued until one of its workers stops (or `turn.queue_timeout`).
    pub max_workers_per_org: usize,
    /// Live workers of one organization in the whole cluster (counted in PostgreSQL); 0 = no cap.
    pub max_workers_per_org_cluster: usize,
    /// An idle worker is stopped after this.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when a worker is stopped.
    #[serde(with = "duration_str")]
    pub stop_timeout: Duration,
    /// Longest accepted stdout line in bytes; a longer one is logged and ignored.
    pub max_line_bytes: usize,
    /// How workers are spawned and confined (CONTRACT §5).
    pub sandbox: Sandbox,
    /// Extra absolute paths a `landlock` worker may read and execute (its language runtime,
    /// caches, model files), besides the system directories.
    pub sandbox_read: Vec<PathBuf>,
    /// Extra absolute paths a `landlock` worker may write (and read), besides its workspace.
    pub sandbox_write: Vec<PathBuf>,
    /// TCP ports a `landlock` worker may connect to (any address); binding is never allowed.
    pub sandbox_connect: Vec<u32>,
    /// Resource limits: systemd properties with `sandbox = "systemd-run"`; what rlimits can
    /// express with `landlock`.
    pub limits: WorkerLimits,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            command: vec![default_worker_command()],
            env: BTreeMap::new(),
            max_workers: 256,
            max_workers_per_org: 0,
            max_workers_per_org_cluster: 0,
            idle_timeout: Duration::from_secs(10 * 60),
            stop_timeout: Duration::from_secs(5),
            max_line_bytes: 1_048_576,
            sandbox: Sandbox::None,
            sandbox_read: Vec::new(),
            sandbox_write: Vec::new(),
            sandbox_connect: vec![443],
            limits: WorkerLimits::default(),
        }
    }
}

/// `worker.sandbox`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sandbox {
    /// `"none"`: a plain child process.
    #[default]
    None,
    /// `"systemd-run"`: a transient systemd scope per worker, with `worker.limits`.
    SystemdRun,
    /// `"landlock"`: each worker confined by Linux Landlock (ABI ≥ 6) and rlimits; the daemon
    /// refuses to start on a kernel without it.
    Landlock,
    /// `"auto"`: `landlock` where the kernel has it, else a plain spawn with one warning.
    Auto,
}

/// `worker.limits`: systemd resource properties for `sandbox = "systemd-run"`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerLimits {
    /// systemd `MemoryMax=`, e.g. `"2G"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<String>,
    /// systemd `CPUQuota=`, e.g. `"200%"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_quota: Option<String>,
    /// systemd `TasksMax=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks_max: Option<u64>,
    /// systemd `LimitNOFILE=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nofile: Option<u64>,
}

/// `[turn]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// A running turn fails with `TURN_TIMEOUT` this long after its last heartbeat.
    #[serde(with = "duration_str")]
    pub deadline: Duration,
    /// A turn waiting for its worker fails after this.
    #[serde(with = "duration_str")]
    pub queue_timeout: Duration,
    /// How long a running turn's worker has, after an operator cancelled the turn, to answer
    /// it itself (it gets a `cancel` line) before the turn ends `TURN_CANCELLED` and the
    /// worker is stopped. Longer lets a worker wind down cleanly; shorter frees the
    /// conversation sooner. Zero ends a running turn at once (the worker still gets the line).
    /// A cancel never extends a turn: its deadline at the time still applies if it is sooner.
    #[serde(with = "duration_str")]
    pub cancel_grace: Duration,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            deadline: Duration::from_secs(60),
            queue_timeout: Duration::from_secs(10 * 60),
            cancel_grace: Duration::from_secs(10),
        }
    }
}

/// `[reply]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplyConfig {
    /// How long published terminal events are kept: the window in which a duplicate turn is
    /// recognised.
    #[serde(with = "duration_str")]
    pub retention: Duration,
}

impl Default for ReplyConfig {
    fn default() -> Self {
        ReplyConfig { retention: Duration::from_secs(7 * 24 * 60 * 60) }
    }
}

/// `[sweep]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepConfig {
    /// How often every daemon sweeps lapsed turns and adopts orphaned deployments.
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// A waiting turn with no owner is adopted after this.
    #[serde(with = "duration_str")]
    pub adoption_delay: Duration,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig { interval: Duration::from_secs(5), adoption_delay: Duration::from_secs(10) }
    }
}

impl SweepConfig {
    /// A daemon whose heartbeat (written each sweep) is older than this is not live: three
    /// missed sweeps, and never under 15 s, so a slow round is not taken for a death.
    pub fn live_within(&self) -> Duration {
        (self.interval * 3).max(Duration::from_secs(15))
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM, how long running turns may finish.
    #[serde(with = "duration_str")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace: Duration::from_secs(30) }
    }
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`, the console and the API; `None` (an
    /// empty string in TOML) disables the listener.
    #[serde(with = "listen_addr")]
    pub listen: Option<SocketAddr>,
    /// Bearer token for console/API actions (replay, purge); without it they answer 403.
    /// A secret: keep it in the environment file as `TURND_HTTP__ADMIN_TOKEN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<Secret>,
    /// Who the admin token stands for in the audit log (`turnd_audit.who`, the console's
    /// audit section): e.g. the team or person it was given to.
    pub admin_token_name: String,
    /// When set, the console pages and every `/api/v1/` read need it (or the admin token):
    /// as a bearer token, or entered once on the page's login form. `/metrics`, `/healthz`
    /// and `/readyz` never need it. A secret, like `admin_token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_token: Option<Secret>,
    /// A second listener serving only `/metrics`, `/healthz` and `/readyz` (e.g.
    /// `0.0.0.0:9188` for probes and scraping while `listen` stays on loopback); `None` (an
    /// empty string in TOML, the default) has none.
    #[serde(with = "listen_addr")]
    pub ops_listen: Option<SocketAddr>,
    /// Whether the console shows turn payloads.
    pub show_payloads: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9187))),
            admin_token: None,
            admin_token_name: "admin".to_owned(),
            read_token: None,
            ops_listen: None,
            show_payloads: false,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// tracing filter directives, e.g. `turnd=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Pretty, level: "info".to_owned() }
    }
}

/// `[otel]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// Base URL of an OTLP/HTTP collector (as `OTEL_EXPORTER_OTLP_ENDPOINT`: spans go to
    /// `<endpoint>/v1/traces`, JSON-encoded); `None` (an empty string in TOML, the default)
    /// exports nothing. `http://` only: turnd carries no TLS stack for it (a local collector
    /// or agent sidecar forwards).
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "empty_is_none")]
    pub endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of the traces that start at turnd (a turn without a producer's context) that are
    /// sampled, 0.0 to 1.0. A producer's own decision (its `traceparent` flag) always stands.
    pub sample_ratio: f64,
    /// Spans waiting for export at most; past it new spans are dropped (counted in
    /// `turnd_otel_spans_dropped_total`), never waited for: export never slows a turn.
    pub queue_size: usize,
}

impl Default for OtelConfig {
    fn default() -> Self {
        OtelConfig {
            endpoint: None,
            service_name: "turnd".to_owned(),
            sample_ratio: 1.0,
            queue_size: 2048,
        }
    }
}

fn empty_is_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()))
}

/// `log.format`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// `"pretty"`: human-readable lines.
    #[default]
    Pretty,
    /// `"json"`: one JSON object per line.
    Json,
}

fn default_url(s: &str) -> SecretUrl {
    match s.parse() {
        Ok(u) => u,
        // The defaults are constants that parse; this arm is never taken.
        Err(e) => unreachable!("default URL {s:?} does not parse: {e}"),
    }
}

/// This host's name: the default `daemon.id`'s prefix, and the daemon record's `hostname`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call;
    // the result is read only up to the first NUL or the end of `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let from_libc = (rc == 0).then(|| {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    });
    from_libc
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "turnd".to_owned())
}

/// `<dir of the running binary>/turnd-demo-worker`. When the running binary is a cargo test
/// harness in `target/<profile>/deps/`, the demo worker is one directory up.
fn default_worker_command() -> String {
    let Some(dir) =
        std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf))
    else {
        return DEMO_WORKER.to_owned();
    };
    let mut path = dir.join(DEMO_WORKER);
    if !path.exists()
        && dir.file_name().is_some_and(|n| n == "deps")
        && let Some(parent) = dir.parent()
    {
        path = parent.join(DEMO_WORKER);
    }
    path.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// Keys and environment overrides
// ---------------------------------------------------------------------------------------------

/// How an environment override's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The raw value is the string (URLs, durations, names, enums, addresses).
    Text,
    /// The value is TOML (numbers, booleans, lists, tables).
    Toml,
}

/// Every section and key of §9, in its order, with how an override of it is read. A test
/// checks it against the structs.
const KEYS: &[(&str, &[(&str, Kind)])] = &[
    ("daemon", &[("id", Kind::Text), ("state_dir", Kind::Text)]),
    (
        "database",
        &[("url", Kind::Text), ("max_connections", Kind::Toml), ("auto_migrate", Kind::Toml)],
    ),
    ("amqp", &[("url", Kind::Text), ("prefix", Kind::Text), ("prefetch", Kind::Toml)]),
    ("session", &[("store", Kind::Text)]),
    (
        "intake",
        &[
            ("max_turn_bytes", Kind::Toml),
            ("max_attempts", Kind::Toml),
            ("retry_delay", Kind::Text),
            ("retry_max_delay", Kind::Text),
        ],
    ),
    (
        "worker",
        &[
            ("command", Kind::Toml),
            ("env", Kind::Toml),
            ("max_workers", Kind::Toml),
            ("max_workers_per_org", Kind::Toml),
            ("max_workers_per_org_cluster", Kind::Toml),
            ("idle_timeout", Kind::Text),
            ("stop_timeout", Kind::Text),
            ("max_line_bytes", Kind::Toml),
            ("sandbox", Kind::Text),
            ("sandbox_read", Kind::Toml),
            ("sandbox_write", Kind::Toml),
            ("sandbox_connect", Kind::Toml),
            ("limits", Kind::Toml),
        ],
    ),
    (
        "turn",
        &[("deadline", Kind::Text), ("queue_timeout", Kind::Text), ("cancel_grace", Kind::Text)],
    ),
    ("reply", &[("retention", Kind::Text)]),
    ("sweep", &[("interval", Kind::Text), ("adoption_delay", Kind::Text)]),
    ("shutdown", &[("grace", Kind::Text)]),
    (
        "http",
        &[
            ("listen", Kind::Text),
            ("admin_token", Kind::Text),
            ("admin_token_name", Kind::Text),
            ("read_token", Kind::Text),
            ("ops_listen", Kind::Text),
            ("show_payloads", Kind::Toml),
        ],
    ),
    ("log", &[("format", Kind::Text), ("level", Kind::Text)]),
    (
        "otel",
        &[
            ("endpoint", Kind::Text),
            ("service_name", Kind::Text),
            ("sample_ratio", Kind::Toml),
            ("queue_size", Kind::Toml),
        ],
    ),
];

fn section_keys(section: &str) -> Option<&'static [(&'static str, Kind)]> {
    KEYS.iter().find(|(name, _)| *name == section).map(|(_, keys)| *keys)
}

fn key_kind(section: &str, key: &str) -> Option<Kind> {
    section_keys(section)?.iter().find(|(name, _)| *name == key).map(|(_, kind)| *kind)
}

fn known_keys_list(section: &str) -> String {
    section_keys(section).unwrap_or(&[]).iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

fn known_sections_list() -> String {
    KEYS.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(", ")
}

/// If `name` is `TURND_WORKER_ENV_<NAME>` (a variable passed to workers as `<NAME>`, CONTRACT
/// §5), returns `<NAME>`.
pub fn is_worker_env_passthrough(name: &str) -> Option<&str> {
    name.strip_prefix(WORKER_ENV_PREFIX).filter(|rest| !rest.is_empty())
}

/// If `name` is a config override `TURND_<SECTION>__<KEY>` with a known section, returns
/// (section, key), both lowercased; the key may still be unknown.
fn override_target(name: &str) -> Option<(&'static str, String)> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let (section, key) = rest.split_once("__")?;
    let section = section.to_ascii_lowercase();
    let (section, _) = KEYS.iter().find(|(s, _)| *s == section)?;
    Some((section, key.to_ascii_lowercase()))
}

/// Reads an override's raw value as a TOML value.
fn override_value(var: &str, dotted: &str, kind: Kind, raw: String) -> Result<Value> {
    match kind {
        Kind::Text => Ok(Value::String(raw)),
        Kind::Toml => {
            let hint = "the value is TOML: a number, true/false, a list like [\"a\", \"b\"] or a \
                        table like {NAME = \"value\"}";
            let mut table: Table =
                format!("value = {raw}").parse().map_err(|e: toml::de::Error| {
                    ConfigError::invalid(
                        dotted,
                        format!(
                            "environment variable {var} is not valid: {}; {hint}",
                            e.message().trim_end()
                        ),
                    )
                })?;
            match table.remove("value") {
                Some(v) if table.is_empty() => Ok(v),
                _ => Err(ConfigError::invalid(
                    dotted,
                    format!("environment variable {var} must hold one value; {hint}"),
                )),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Where each key that did not come from the defaults was set, for error messages.
type Origins = BTreeMap<String, String>;

impl Config {
    /// Loads the configuration from `path` (or [`DEFAULT_PATH`] if it exists, or the defaults)
    /// and the process environment, and validates it.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] if a file given explicitly is missing or unreadable,
    /// [`ConfigError::Parse`] if it is not TOML, [`ConfigError::Invalid`] naming the key for
    /// anything else.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Ok(name) = name.into_string() else {
                continue; // not one of ours: our names are ASCII
            };
            match value.into_string() {
                Ok(value) => env.push((name, value)),
                Err(_) => {
                    if let Some((section, key)) = override_target(&name) {
                        return Err(ConfigError::invalid(
                            format!("{section}.{key}"),
                            format!("environment variable {name} is not valid UTF-8"),
                        ));
                    }
                }
            }
        }
        Self::load_from(path, env)
    }

    /// Like [`Config::load`], with the environment given as `(name, value)` pairs.
    ///
    /// # Errors
    ///
    /// As [`Config::load`].
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let (file, origin) = match path {
            Some(path) => (read_file(path)?, Some(path)),
            None => {
                let path = Path::new(DEFAULT_PATH);
                match read_bounded(path) {
                    Ok(text) => (parse_file(path, &text)?, Some(path)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => (Table::new(), None),
                    Err(source) => {
                        return Err(ConfigError::Read { path: path.to_path_buf(), source });
                    }
                }
            }
        };
        let source = origin.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
        let origin = origin.map(|p| p.display().to_string());
        let mut config = build(file, origin.as_deref(), env)?;
        config.source = source;
        Ok(config)
    }

    /// Parses a TOML document (no environment, no file) and validates it.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] if it is not TOML, [`ConfigError::Invalid`] naming the key.
    pub fn from_toml_str(text: &str) -> Result<Config> {
        let table = parse_toml("<string>", text)?;
        build(table, None, std::iter::empty())
    }

    /// The effective configuration as TOML, with the passwords of URLs, the tokens
    /// (`http.admin_token`, `http.read_token`) and the values of `worker.env` shown as `***`.
    /// Durations are written in humantime form (`"10m"`, `"7days"`).
    pub fn redacted_toml(&self) -> String {
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# the configuration cannot be shown as TOML: {e}\n"))
    }

    /// Checks ranges and cross-key rules (already done by the loaders).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the first key at fault.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &str, message: String| Err(ConfigError::invalid(key, message));

        // daemon
        let id = &self.daemon.id;
        if id.is_empty() {
            return invalid("daemon.id", "must not be empty".into());
        }
        if id.len() > 128 {
            return invalid("daemon.id", format!("is {} bytes long; at most 128", id.len()));
        }
        if id.chars().any(char::is_control) {
            return invalid("daemon.id", "must not contain control characters".into());
        }
        if self.daemon.state_dir.as_os_str().is_empty() {
            return invalid("daemon.state_dir", "must not be empty".into());
        }

        // database
        if !matches!(self.database.url.scheme(), "postgres" | "postgresql") {
            return invalid(
                "database.url",
                format!(
                    "scheme is {:?}; expected postgres:// or postgresql://",
                    self.database.url.scheme()
                ),
            );
        }
        if self.database.max_connections < 2 {
            return invalid(
                "database.max_connections",
                format!("is {}; at least 2", self.database.max_connections),
            );
        }

        // amqp
        if self.amqp.url.is_empty() {
            return invalid("amqp.url", "the list of URLs is empty".into());
        }
        for (i, url) in self.amqp.url.iter().enumerate() {
            if !matches!(url.scheme(), "amqp" | "amqps") {
                let which = if self.amqp.url.len() == 1 {
                    String::new()
                } else {
                    format!("URL {} of {}: ", i + 1, self.amqp.url.len())
                };
                return invalid(
                    "amqp.url",
                    format!("{which}scheme is {:?}; expected amqp:// or amqps://", url.scheme()),
                );
            }
        }
        if !valid_prefix(&self.amqp.prefix) {
            return invalid(
                "amqp.prefix",
                format!(
                    "{:?} is not 1 to 64 characters of a-z, 0-9, '_' and '-'",
                    self.amqp.prefix
                ),
            );
        }
        if self.amqp.prefetch < 1 {
            return invalid("amqp.prefetch", "must be at least 1".into());
        }

        // intake
        if self.intake.max_turn_bytes < 1024 {
            return invalid(
                "intake.max_turn_bytes",
                format!("is {}; at least 1024", self.intake.max_turn_bytes),
            );
        }
        if self.intake.max_attempts < 1 {
            return invalid("intake.max_attempts", "must be at least 1".into());
        }
        if self.intake.retry_delay > self.intake.retry_max_delay {
            return invalid(
                "intake.retry_delay",
                format!(
                    "{} is longer than intake.retry_max_delay ({})",
                    humantime::format_duration(self.intake.retry_delay),
                    humantime::format_duration(self.intake.retry_max_delay)
                ),
            );
        }

        // worker
        match self.worker.command.first() {
            None => {
                return invalid(
                    "worker.command",
                    "must name a program: [\"/path/to/worker\", \"args…\"]".into(),
                );
            }
            Some(program) if program.is_empty() => {
                return invalid(
                    "worker.command",
                    "the program (first element) must not be empty".into(),
                );
            }
            Some(_) => {}
        }
        if self.worker.command.iter().any(|a| a.contains('\0')) {
            return invalid("worker.command", "must not contain NUL characters".into());
        }
        for (name, value) in &self.worker.env {
            if !valid_env_name(name) {
                return invalid(
                    "worker.env",
                    format!("{name:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"),
                );
            }
            if value.expose().contains('\0') {
                return invalid(
                    "worker.env",
                    format!("the value of {name} contains a NUL character"),
                );
            }
        }
        if self.worker.max_workers < 1 {
            return invalid("worker.max_workers", "must be at least 1".into());
        }
        let (per_org, per_org_cluster) =
            (self.worker.max_workers_per_org, self.worker.max_workers_per_org_cluster);
        if per_org_cluster > 0 && per_org > per_org_cluster {
            return invalid(
                "worker.max_workers_per_org",
                format!(
                    "is {per_org}, above worker.max_workers_per_org_cluster ({per_org_cluster}): \
                     the cluster-wide cap would never let it be reached"
                ),
            );
        }
        if self.worker.max_line_bytes < 1024 {
            return invalid(
                "worker.max_line_bytes",
                format!("is {}; at least 1024", self.worker.max_line_bytes),
            );
        }
        let limits = &self.worker.limits;
        for (key, value) in [
            ("worker.limits.memory_max", &limits.memory_max),
            ("worker.limits.cpu_quota", &limits.cpu_quota),
        ] {
            if let Some(v) = value
                && (v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return invalid(key, format!("{v:?} is not a systemd property value"));
            }
        }
        for (key, value) in
            [("worker.limits.tasks_max", limits.tasks_max), ("worker.limits.nofile", limits.nofile)]
        {
            if value == Some(0) {
                return invalid(key, "must be at least 1".into());
            }
        }
        for (key, paths) in [
            ("worker.sandbox_read", &self.worker.sandbox_read),
            ("worker.sandbox_write", &self.worker.sandbox_write),
        ] {
            for path in paths {
                if !path.is_absolute() {
                    return invalid(key, format!("{} is not an absolute path", path.display()));
                }
                if path.as_os_str().as_encoded_bytes().contains(&0) {
                    return invalid(key, format!("{path:?} contains a NUL character"));
                }
            }
        }
        for port in &self.worker.sandbox_connect {
            if !(1..=65535).contains(port) {
                return invalid(
                    "worker.sandbox_connect",
                    format!("{port} is not a TCP port (1 to 65535)"),
                );
            }
        }
        if matches!(self.worker.sandbox, Sandbox::Landlock | Sandbox::Auto)
            && let Some(m) = &limits.memory_max
            && let Err(why) = parse_bytes(m)
        {
            return invalid(
                "worker.limits.memory_max",
                format!("{m:?} {why}; with sandbox = \"landlock\" it becomes RLIMIT_AS"),
            );
        }

        // every duration
        for (key, d) in [
            ("intake.retry_delay", self.intake.retry_delay),
            ("intake.retry_max_delay", self.intake.retry_max_delay),
            ("worker.idle_timeout", self.worker.idle_timeout),
            ("worker.stop_timeout", self.worker.stop_timeout),
            ("turn.deadline", self.turn.deadline),
            ("turn.queue_timeout", self.turn.queue_timeout),
            ("reply.retention", self.reply.retention),
            ("sweep.interval", self.sweep.interval),
            ("sweep.adoption_delay", self.sweep.adoption_delay),
            ("shutdown.grace", self.shutdown.grace),
        ] {
            if d.is_zero() {
                return invalid(key, "must be longer than zero".into());
            }
        }

        // http
        let name = &self.http.admin_token_name;
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return invalid(
                "http.admin_token_name",
                "must be 1 to 64 printable characters (it names the token in the audit log)".into(),
            );
        }
        if let Some(token) = &self.http.admin_token
            && token.expose().is_empty()
        {
            return invalid(
                "http.admin_token",
                "must not be empty; leave the key out to disable console actions".into(),
            );
        }
        if let Some(token) = &self.http.read_token {
            let t = token.expose();
            if t.is_empty() {
                return invalid(
                    "http.read_token",
                    "must not be empty; leave the key out to keep console reads open".into(),
                );
            }
            // It travels in an Authorization header and a form field: visible ASCII only.
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return invalid(
                    "http.read_token",
                    "must be printable ASCII without spaces (it is sent as a bearer token)".into(),
                );
            }
        }
        if let (Some(ops), Some(listen)) = (self.http.ops_listen, self.http.listen) {
            let overlap = ops.ip() == listen.ip()
                || ops.ip().is_unspecified()
                || listen.ip().is_unspecified();
            if ops.port() != 0 && ops.port() == listen.port() && overlap {
                return invalid(
                    "http.ops_listen",
                    format!(
                        "{ops} and http.listen {listen} cannot both listen on port {}; give \
                         http.ops_listen a port of its own (e.g. 9188)",
                        ops.port()
                    ),
                );
            }
        }

        // log
        if self.log.level.trim().is_empty() {
            return invalid("log.level", "must not be empty, e.g. \"info\"".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid(
                "log.level",
                format!(
                    "{:?} is not a tracing filter ({e}); e.g. \"turnd=debug,info\"",
                    self.log.level
                ),
            );
        }

        // otel
        if let Some(endpoint) = &self.otel.endpoint {
            match url::Url::parse(endpoint) {
                Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                    // check-config prints this key: no secrets in it.
                    return invalid(
                        "otel.endpoint",
                        "must not carry credentials; send them as headers with OTEL_EXPORTER_OTLP_HEADERS".into(),
                    );
                }
                Ok(u) if u.scheme() == "http" && u.host_str().is_some() => {}
                Ok(u) if u.scheme() == "https" => {
                    return invalid(
                        "otel.endpoint",
                        format!(
                            "{endpoint:?}: https is not supported (turnd carries no TLS stack for export); use a local collector over http://"
                        ),
                    );
                }
                Ok(_) => {
                    return invalid(
                        "otel.endpoint",
                        format!(
                            "{endpoint:?} is not an http:// URL with a host, e.g. \"http://127.0.0.1:4318\""
                        ),
                    );
                }
                Err(e) => {
                    return invalid(
                        "otel.endpoint",
                        format!("{endpoint:?} is not a URL ({e}); e.g. \"http://127.0.0.1:4318\""),
                    );
                }
            }
        }
        if self.otel.service_name.is_empty() || self.otel.service_name.chars().any(char::is_control)
        {
            return invalid(
                "otel.service_name",
                "must be a non-empty name without control characters".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.otel.sample_ratio) {
            return invalid(
                "otel.sample_ratio",
                format!("is {}; between 0.0 and 1.0", self.otel.sample_ratio),
            );
        }
        if !(1..=1_000_000).contains(&self.otel.queue_size) {
            return invalid(
                "otel.queue_size",
                format!("is {}; between 1 and 1000000", self.otel.queue_size),
            );
        }

        Ok(())
    }
}

/// A size as systemd writes it: bytes, or a number with K, M, G, T (powers of 1024), or
/// `infinity` (`None`).
///
/// # Errors
///
/// Why it is not one, for the message.
pub fn parse_bytes(s: &str) -> std::result::Result<Option<u64>, &'static str> {
    if s == "infinity" {
        return Ok(None);
    }
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "is not a size: bytes, or a whole number with K, M, G or T, or infinity")?;
    n.checked_mul(1u64 << shift).map(Some).ok_or("is too large")
}

fn valid_prefix(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Reads at most one byte more than [`MAX_CONFIG_BYTES`] (enough for the parser to refuse it).
fn read_bounded(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    Ok(text)
}

fn read_file(path: &Path) -> Result<Table> {
    let text = read_bounded(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse_file(path, &text)
}

fn parse_file(path: &Path, text: &str) -> Result<Table> {
    parse_toml(&path.display().to_string(), text)
}

fn parse_toml(path: &str, text: &str) -> Result<Table> {
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::Parse {
            path: path.to_owned(),
            message: format!(
                "it is larger than {MAX_CONFIG_BYTES} bytes; a config file is a few KiB"
            ),
        });
    }
    text.parse::<Table>().map_err(|e| {
        let mut message = e.to_string().trim_end().to_owned();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(" …");
        }
        ConfigError::Parse { path: path.to_owned(), message }
    })
}

/// Checks the file's sections and keys, applies the environment overrides, deserializes
/// section by section and validates.
fn build(
    mut table: Table,
    file: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config> {
    let mut origins = Origins::new();

    // 1. The file: only known sections, each a table of known keys.
    for (section, value) in &table {
        let Some(_) = section_keys(section) else {
            return Err(ConfigError::invalid(
                section.as_str(),
                format!(
                    "unknown section{}; the sections are {}",
                    in_file(file),
                    known_sections_list()
                ),
            ));
        };
        let Value::Table(keys) = value else {
            return Err(ConfigError::invalid(
                section.as_str(),
                format!("must be a section [{section}], not a value{}", in_file(file)),
            ));
        };
        for key in keys.keys() {
            let dotted = format!("{section}.{key}");
            if key_kind(section, key).is_none() {
                return Err(ConfigError::invalid(
                    dotted,
                    format!(
                        "unknown key{}; the keys of [{section}] are {}",
                        in_file(file),
                        known_keys_list(section)
                    ),
                ));
            }
            if let Some(file) = file {
                origins.insert(dotted, file.to_owned());
            }
        }
    }

    // 2. Environment overrides, in name order so that the outcome does not depend on the
    // order of the environment.
    let mut overrides: Vec<(String, &'static str, String, String)> = env
        .into_iter()
        .filter_map(|(name, value)| {
            let (section, key) = override_target(&name)?;
            Some((name, section, key, value))
        })
        .collect();
    overrides.sort_by(|a, b| a.0.cmp(&b.0));
    for (var, section, key, raw) in overrides {
        let dotted = format!("{section}.{key}");
        let Some(kind) = key_kind(section, &key) else {
            return Err(ConfigError::invalid(
                dotted,
                format!(
                    "unknown key set by environment variable {var}; the keys of [{section}] are {}",
                    known_keys_list(section)
                ),
            ));
        };
        let value = override_value(&var, &dotted, kind, raw)?;
        let entry = table.entry(section.to_owned()).or_insert_with(|| Value::Table(Table::new()));
        if let Value::Table(keys) = entry {
            keys.insert(key, value);
        }
        origins.insert(dotted, format!("environment variable {var}"));
    }

    // 3. Section by section, so that an error names its key.
    let config = Config {
        daemon: section(&mut table, "daemon", &origins)?,
        database: section(&mut table, "database", &origins)?,
        amqp: section(&mut table, "amqp", &origins)?,
        session: section(&mut table, "session", &origins)?,
        intake: section(&mut table, "intake", &origins)?,
        worker: section(&mut table, "worker", &origins)?,
        turn: section(&mut table, "turn", &origins)?,
        reply: section(&mut table, "reply", &origins)?,
        sweep: section(&mut table, "sweep", &origins)?,
        shutdown: section(&mut table, "shutdown", &origins)?,
        http: section(&mut table, "http", &origins)?,
        log: section(&mut table, "log", &origins)?,
        otel: section(&mut table, "otel", &origins)?,
        source: None,
    };

    // 4. Ranges and cross-key rules.
    config.validate().map_err(|e| match e {
        ConfigError::Invalid { key, message } => {
            let message = with_origin(message, &key, &origins);
            ConfigError::Invalid { key, message }
        }
        other => other,
    })?;
    Ok(config)
}

fn in_file(file: Option<&str>) -> String {
    file.map(|f| format!(" in {f}")).unwrap_or_default()
}

/// Appends where `key` (or, for `worker.limits.x`, its parent) was set.
fn with_origin(message: String, key: &str, origins: &Origins) -> String {
    let origin = origins
        .get(key)
        .or_else(|| key.rsplit_once('.').and_then(|(parent, _)| origins.get(parent)));
    match origin {
        Some(origin) => format!("{message} (from {origin})"),
        None => message,
    }
}

/// Deserializes one section. On failure, finds the key at fault by deserializing the
/// section's keys one at a time (the others take their defaults).
fn section<T>(table: &mut Table, name: &str, origins: &Origins) -> Result<T>
where
    T: serde::de::DeserializeOwned + Default,
{
    let Some(value) = table.remove(name) else {
        return Ok(T::default());
    };
    let Value::Table(keys) = value else {
        return Err(ConfigError::invalid(name, format!("must be a table, written [{name}]")));
    };
    match keys.clone().try_into::<T>() {
        Ok(section) => Ok(section),
        Err(whole) => {
            for (key, value) in keys {
                let dotted = format!("{name}.{key}");
                let mut single = Table::new();
                single.insert(key, value);
                if let Err(e) = single.try_into::<T>() {
                    let message = with_origin(e.message().trim_end().to_owned(), &dotted, origins);
                    return Err(ConfigError::invalid(dotted, message));
                }
            }
            Err(ConfigError::invalid(name, whole.message().trim_end().to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const EXAMPLE: &str = include_str!("../config/turnd.toml");

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// Loads `toml` (as the file) and `pairs` (as the environment).
    fn load(toml: &str, pairs: &[(&str, &str)]) -> Result<Config> {
        let table = toml
            .parse::<Table>()
            .map_err(|e| ConfigError::Parse { path: "test".into(), message: e.to_string() })?;
        build(table, Some("test.toml"), env(pairs))
    }

    fn err_key(r: Result<Config>) -> (String, String) {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => (e.key().unwrap_or("<none>").to_owned(), e.to_string()),
        }
    }

    #[test]
    fn defaults_match_the_contract_table() {
        let c = Config::default();
        let pid = std::process::id().to_string();
        assert!(c.daemon.id.ends_with(&format!("-{pid}")), "{}", c.daemon.id);
        assert!(c.daemon.id.len() > pid.len() + 1);
        assert_eq!(c.daemon.state_dir, PathBuf::from("/var/lib/turnd"));
        assert_eq!(c.database.url.expose(), "postgres://127.0.0.1:5432/turnd");
        assert_eq!(c.database.max_connections, 10);
        assert!(c.database.auto_migrate);
        assert_eq!(
            c.amqp.url.first().map(SecretUrl::expose),
            Some("amqp://guest:guest@127.0.0.1:5672/%2f")
        );
        assert_eq!(c.amqp.prefix, "turnd");
        assert_eq!(c.amqp.prefetch, 64);
        assert_eq!(c.session.store, SessionStore::Snapshot);
        assert_eq!(c.intake.max_turn_bytes, 262_144);
        assert_eq!(c.intake.max_attempts, 5);
        assert_eq!(c.intake.retry_delay, Duration::from_secs(2));
        assert_eq!(c.intake.retry_max_delay, Duration::from_secs(60));
        assert_eq!(c.worker.command.len(), 1);
        assert!(c.worker.command[0].ends_with("/turnd-demo-worker"), "{:?}", c.worker.command);
        assert!(c.worker.env.is_empty());
        assert_eq!(c.worker.max_workers, 256);
        assert_eq!(c.worker.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.worker.stop_timeout, Duration::from_secs(5));
        assert_eq!(c.worker.max_line_bytes, 1_048_576);
        assert_eq!(c.worker.sandbox, Sandbox::None);
        assert_eq!(c.worker.limits, WorkerLimits::default());
        assert_eq!(c.turn.deadline, Duration::from_secs(60));
        assert_eq!(c.turn.queue_timeout, Duration::from_secs(600));
        assert_eq!(c.reply.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.sweep.interval, Duration::from_secs(5));
        assert_eq!(c.sweep.adoption_delay, Duration::from_secs(10));
        assert_eq!(c.shutdown.grace, Duration::from_secs(30));
        assert_eq!(c.http.listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(c.http.admin_token, None);
        assert_eq!(c.http.read_token, None);
        assert_eq!(c.http.ops_listen, None);
        assert!(!c.http.show_payloads);
        assert_eq!(c.log.format, LogFormat::Pretty);
        assert_eq!(c.log.level, "info");
        c.validate().unwrap();
    }

    #[test]
    fn empty_file_and_environment_give_the_defaults() {
        let mut c = load("", &[]).unwrap();
        let d = Config::default();
        c.daemon.id = d.daemon.id.clone();
        assert_eq!(c, d);
    }

    #[test]
    fn env_overrides_string_integer_list_and_table() {
        let c = load(
            "[worker]\nenv = { A = \"file\" }\n",
            &[
                ("TURND_DATABASE__URL", "postgres://u:p@db:5432/x"),
                ("TURND_DAEMON__ID", "123"),
                ("TURND_AMQP__PREFETCH", "7"),
                ("TURND_WORKER__COMMAND", r#"["/bin/x", "--y"]"#),
                ("TURND_WORKER__ENV", r#"{FOO="bar"}"#),
                ("TURND_WORKER__IDLE_TIMEOUT", "250ms"),
                ("TURND_WORKER__SANDBOX", "systemd-run"),
                ("TURND_WORKER__LIMITS", r#"{ memory_max = "2G", tasks_max = 64 }"#),
                ("TURND_HTTP__LISTEN", ""),
                ("TURND_HTTP__ADMIN_TOKEN", "tok"),
                ("TURND_HTTP__READ_TOKEN", "read-tok"),
                ("TURND_HTTP__OPS_LISTEN", "0.0.0.0:9188"),
                ("TURND_HTTP__SHOW_PAYLOADS", "true"),
                ("TURND_LOG__FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(c.database.url.expose(), "postgres://u:p@db:5432/x");
        assert_eq!(c.daemon.id, "123");
        assert_eq!(c.amqp.prefetch, 7);
        assert_eq!(c.worker.command, vec!["/bin/x".to_owned(), "--y".to_owned()]);
        assert_eq!(
            c.worker.env,
            BTreeMap::from([("FOO".to_owned(), Secret::new("bar"))]),
            "an override replaces the file's table"
        );
        assert_eq!(c.worker.idle_timeout, Duration::from_millis(250));
        assert_eq!(c.worker.sandbox, Sandbox::SystemdRun);
        assert_eq!(c.worker.limits.memory_max.as_deref(), Some("2G"));
        assert_eq!(c.worker.limits.tasks_max, Some(64));
        assert_eq!(c.http.listen, None);
        assert_eq!(c.http.admin_token.as_ref().map(Secret::expose), Some("tok"));
        assert_eq!(c.http.read_token.as_ref().map(Secret::expose), Some("read-tok"));
        assert_eq!(c.http.ops_listen, Some("0.0.0.0:9188".parse().unwrap()));
        assert!(c.http.show_payloads);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn env_override_wins_over_the_file() {
        let c = load("[amqp]\nprefix = \"file\"\n", &[("TURND_AMQP__PREFIX", "env")]).unwrap();
        assert_eq!(c.amqp.prefix, "env");
    }

    #[test]
    fn worker_env_passthrough_and_other_names_are_not_overrides() {
        let c = load(
            "",
            &[
                ("TURND_WORKER_ENV_FOO", "bar"),
                ("TURND_WORKER_ENV__X", "y"),
                ("TURND_CONFIG", "/x"),
                ("TURND_NOPE__KEY", "1"),
                ("TURND_WORKERS__MAX", "1"),
                ("OTHER__KEY", "1"),
            ],
        )
        .unwrap();
        assert!(c.worker.env.is_empty());
        assert_eq!(is_worker_env_passthrough("TURND_WORKER_ENV_FOO"), Some("FOO"));
        assert_eq!(is_worker_env_passthrough("TURND_WORKER_ENV_"), None);
        assert_eq!(is_worker_env_passthrough("TURND_WORKER__ENV"), None);
        assert_eq!(override_target("TURND_WORKER_ENV_FOO"), None);
        assert_eq!(
            override_target("TURND_WORKER__MAX_WORKERS"),
            Some(("worker", "max_workers".to_owned()))
        );
    }

    #[test]
    fn unknown_key_in_file_names_it() {
        let (key, msg) = err_key(load("[worker]\nidle_timout = \"5s\"\n", &[]));
        assert_eq!(key, "worker.idle_timout");
        assert!(msg.contains("unknown key") && msg.contains("idle_timeout"), "{msg}");

        let (key, msg) = err_key(load("[wrker]\n", &[]));
        assert_eq!(key, "wrker");
        assert!(msg.contains("unknown section"), "{msg}");

        let (key, msg) = err_key(load("[worker.limits]\nmemory = \"1G\"\n", &[]));
        assert_eq!(key, "worker.limits");
        assert!(msg.contains("memory"), "{msg}");
    }

    #[test]
    fn unknown_key_in_env_names_it() {
        let (key, msg) = err_key(load("", &[("TURND_WORKER__IDLE", "5s")]));
        assert_eq!(key, "worker.idle");
        assert!(msg.contains("TURND_WORKER__IDLE"), "{msg}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let (key, msg) = err_key(load("[worker]\nidle_timeout = \"5 parsecs\"\n", &[]));
        assert_eq!(key, "worker.idle_timeout");
        assert!(msg.starts_with("worker.idle_timeout: invalid duration \"5 parsecs\""), "{msg}");
        assert!(msg.contains("test.toml"), "{msg}");

        let (key, msg) = err_key(load("", &[("TURND_TURN__DEADLINE", "soon")]));
        assert_eq!(key, "turn.deadline");
        assert!(msg.contains("TURND_TURN__DEADLINE"), "{msg}");

        let (key, _) = err_key(load("[sweep]\ninterval = 5\n", &[]));
        assert_eq!(key, "sweep.interval");

        let (key, msg) = err_key(load("[shutdown]\ngrace = \"0s\"\n", &[]));
        assert_eq!(key, "shutdown.grace");
        assert!(msg.contains("zero"), "{msg}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let (key, _) = err_key(load("[amqp]\nprefetch = 70000\n", &[]));
        assert_eq!(key, "amqp.prefetch");
        let (key, _) = err_key(load("", &[("TURND_INTAKE__MAX_ATTEMPTS", "five")]));
        assert_eq!(key, "intake.max_attempts");
        let (key, _) = err_key(load("[session]\nstore = \"redis\"\n", &[]));
        assert_eq!(key, "session.store");
        let (key, _) = err_key(load("", &[("TURND_WORKER__COMMAND", "/bin/x")]));
        assert_eq!(key, "worker.command");
        let (key, _) = err_key(load("[http]\nlisten = \"localhost\"\n", &[]));
        assert_eq!(key, "http.listen");
        let (key, msg) = err_key(load("", &[("TURND_HTTP__OPS_LISTEN", "*:9188")]));
        assert_eq!(key, "http.ops_listen");
        assert!(msg.contains("TURND_HTTP__OPS_LISTEN"), "{msg}");
    }

    #[test]
    fn the_ops_listener_needs_a_port_of_its_own() {
        for (listen, ops) in [
            ("127.0.0.1:9187", "127.0.0.1:9187"),
            ("127.0.0.1:9187", "0.0.0.0:9187"),
            ("0.0.0.0:9187", "10.0.0.1:9187"),
            ("[::]:9187", "127.0.0.1:9187"),
        ] {
            let toml = format!("[http]\nlisten = \"{listen}\"\nops_listen = \"{ops}\"\n");
            let (key, msg) = err_key(load(&toml, &[]));
            assert_eq!(key, "http.ops_listen", "{toml}");
            assert!(msg.contains("port of its own"), "{msg}");
        }
        for (listen, ops) in [
            ("127.0.0.1:9187", "0.0.0.0:9188"),
            ("127.0.0.1:9187", "10.0.0.1:9187"),
            ("", "0.0.0.0:9187"),
            ("127.0.0.1:0", "0.0.0.0:0"),
        ] {
            let toml = format!("[http]\nlisten = \"{listen}\"\nops_listen = \"{ops}\"\n");
            let c = load(&toml, &[]).unwrap_or_else(|e| panic!("{toml}: {e}"));
            assert_eq!(c.http.ops_listen, Some(ops.parse().unwrap()));
        }
        assert_eq!(load("[http]\nops_listen = \"\"\n", &[]).unwrap().http.ops_listen, None);
    }

    #[test]
    fn bad_url_names_the_key_and_hides_it() {
        let (key, msg) = err_key(load("", &[("TURND_DATABASE__URL", "secret not a url")]));
        assert_eq!(key, "database.url");
        assert!(msg.contains("invalid URL"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
        let (key, _) = err_key(load("[amqp]\nurl = \"amqp://h:notaport/\"\n", &[]));
        assert_eq!(key, "amqp.url");

        let (key, _) = err_key(load("[database]\nurl = \"mysql://h/db\"\n", &[]));
        assert_eq!(key, "database.url");
        let (key, _) = err_key(load("", &[("TURND_AMQP__URL", "http://h/")]));
        assert_eq!(key, "amqp.url");
        load(
            "",
            &[("TURND_DATABASE__URL", "postgresql://h/db"), ("TURND_AMQP__URL", "amqps://h/v")],
        )
        .unwrap();
    }

    #[test]
    fn amqp_url_takes_a_list_in_toml_and_in_the_environment() {
        let nodes = ["amqp://u:pw@a:5672/%2f", "amqp://u:pw@b:5673/v", "amqps://u:pw@c/%2f"];
        let exposed =
            |c: &Config| c.amqp.url.iter().map(|u| u.expose().to_owned()).collect::<Vec<_>>();
        let toml = format!("[amqp]\nurl = [{}]\n", nodes.map(|n| format!("{n:?}")).join(", "));
        assert_eq!(exposed(&load(&toml, &[]).unwrap()), nodes);
        for env in [
            nodes.join(","),
            nodes.join(" , "),
            format!("[{}]", nodes.map(|n| format!("{n:?}")).join(",")),
        ] {
            let c = load("", &[("TURND_AMQP__URL", &env)]).unwrap_or_else(|e| panic!("{env}: {e}"));
            assert_eq!(exposed(&c), nodes, "{env}");
        }
        // A single string keeps working, and prints as one.
        let c = load("[amqp]\nurl = \"amqp://u:pw@a/%2f\"\n", &[]).unwrap();
        assert_eq!(exposed(&c), ["amqp://u:pw@a/%2f"]);
        assert!(
            c.redacted_toml().contains("url = \"amqp://u:***@a/%2f\""),
            "{}",
            c.redacted_toml()
        );
        // Several print as a list, every password hidden.
        let text = load(&toml, &[]).unwrap().redacted_toml();
        assert!(!text.contains("pw"), "{text}");
        assert_eq!(Config::from_toml_str(&text).unwrap().amqp.url.len(), 3, "{text}");
    }

    #[test]
    fn a_bad_amqp_url_in_a_list_is_named_and_hidden() {
        for (toml, env, says) in [
            ("[amqp]\nurl = []\n", None, "empty"),
            ("[amqp]\nurl = [\"amqp://a/\", \"http://b/\"]\n", None, "URL 2 of 2: scheme"),
            ("[amqp]\nurl = [\"amqp://a/\", 5]\n", None, "invalid type"),
            ("", Some("amqp://u:secret@a/,amqp://u:secret@b:x/"), "URL 2 of 2 is invalid"),
            ("", Some("amqp://u:secret@a/,,amqp://b/"), "URL 2 of 3 is invalid"),
            ("", Some("[\"amqp://u:secret@a/\", 5]"), "list of URL strings"),
        ] {
            let pairs: Vec<(&str, &str)> = env.iter().map(|v| ("TURND_AMQP__URL", *v)).collect();
            let (key, msg) = err_key(load(toml, &pairs));
            assert_eq!(key, "amqp.url", "{toml} {env:?}: {msg}");
            assert!(msg.contains(says), "{toml} {env:?}: {msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
    }

    #[test]
    fn bad_prefix_names_the_key() {
        for bad in ["", "Turnd", "a.b", "a b", &"x".repeat(65)] {
            let (key, _) = err_key(load("", &[("TURND_AMQP__PREFIX", bad)]));
            assert_eq!(key, "amqp.prefix", "{bad:?}");
        }
        for good in ["a", "turnd-test_1", &"x".repeat(64)] {
            load("", &[("TURND_AMQP__PREFIX", good)]).unwrap();
        }
    }

    #[test]
    fn range_and_cross_key_rules_name_the_key() {
        for (toml, want) in [
            ("[amqp]\nprefetch = 0", "amqp.prefetch"),
            ("[intake]\nmax_attempts = 0", "intake.max_attempts"),
            ("[intake]\nmax_turn_bytes = 100", "intake.max_turn_bytes"),
            ("[intake]\nretry_delay = \"2m\"\nretry_max_delay = \"1m\"", "intake.retry_delay"),
            ("[worker]\nmax_workers = 0", "worker.max_workers"),
            (
                "[worker]\nmax_workers_per_org = 5\nmax_workers_per_org_cluster = 3",
                "worker.max_workers_per_org",
            ),
            ("[worker]\nmax_line_bytes = 10", "worker.max_line_bytes"),
            ("[worker]\ncommand = []", "worker.command"),
            ("[worker]\ncommand = [\"\"]", "worker.command"),
            ("[worker]\nenv = { \"1X\" = \"y\" }", "worker.env"),
            ("[worker.limits]\ntasks_max = 0", "worker.limits.tasks_max"),
            ("[worker]\nsandbox_read = [\"relative/dir\"]", "worker.sandbox_read"),
            ("[worker]\nsandbox_write = [\"/ok\", \"x\"]", "worker.sandbox_write"),
            ("[worker]\nsandbox_connect = [0]", "worker.sandbox_connect"),
            ("[worker]\nsandbox_connect = [70000]", "worker.sandbox_connect"),
            ("[worker]\nsandbox_connect = [-1]", "worker.sandbox_connect"),
            ("[worker]\nsandbox_connect = 443", "worker.sandbox_connect"),
            ("[worker]\nsandbox = \"jail\"", "worker.sandbox"),
            (
                "[worker]\nsandbox = \"landlock\"\n[worker.limits]\nmemory_max = \"50%\"",
                "worker.limits.memory_max",
            ),
            ("[database]\nmax_connections = 1", "database.max_connections"),
            ("[daemon]\nid = \"\"", "daemon.id"),
            ("[daemon]\nid = \"a\\nb\"", "daemon.id"),
            ("[http]\nadmin_token = \"\"", "http.admin_token"),
            ("[http]\nread_token = \"\"", "http.read_token"),
            ("[http]\nread_token = \"with space\"", "http.read_token"),
            ("[http]\nread_token = \"caf\\u00e9\"", "http.read_token"),
            ("[log]\nlevel = \"turnd=loud\"", "log.level"),
            ("[otel]\nendpoint = \"https://c:4318\"", "otel.endpoint"),
            ("[otel]\nendpoint = \"127.0.0.1:4318\"", "otel.endpoint"),
            ("[otel]\nendpoint = \"not a url\"", "otel.endpoint"),
            ("[otel]\nendpoint = \"http://u:p@c:4318\"", "otel.endpoint"),
            ("[otel]\nservice_name = \"\"", "otel.service_name"),
            ("[otel]\nsample_ratio = 1.5", "otel.sample_ratio"),
            ("[otel]\nsample_ratio = -0.1", "otel.sample_ratio"),
            ("[otel]\nqueue_size = 0", "otel.queue_size"),
        ] {
            let (key, _) = err_key(load(toml, &[]));
            assert_eq!(key, want, "{toml}");
        }
        let (key, _) = err_key(load("", &[("TURND_DAEMON__ID", &"x".repeat(129))]));
        assert_eq!(key, "daemon.id");
        load("", &[("TURND_LOG__LEVEL", "turnd=debug,info")]).unwrap();
        // Export is off by default; an empty endpoint is off too.
        assert_eq!(load("", &[]).unwrap().otel.endpoint, None);
        assert_eq!(load("[otel]\nendpoint = \"\"", &[]).unwrap().otel.endpoint, None);
        let c = load("", &[("TURND_OTEL__ENDPOINT", "http://127.0.0.1:4318")]).unwrap();
        assert_eq!(c.otel.endpoint.as_deref(), Some("http://127.0.0.1:4318"));
    }

    #[test]
    fn sandbox_keys_have_contract_defaults_and_take_overrides() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.worker.sandbox_connect, vec![443]);
        assert!(c.worker.sandbox_read.is_empty() && c.worker.sandbox_write.is_empty());
        let c = load(
            "[worker]\nsandbox = \"landlock\"\nsandbox_read = [\"/opt/python\"]\n",
            &[
                ("TURND_WORKER__SANDBOX", "auto"),
                ("TURND_WORKER__SANDBOX_WRITE", "[\"/var/cache/agent\"]"),
                ("TURND_WORKER__SANDBOX_CONNECT", "[443, 8443]"),
            ],
        )
        .unwrap();
        assert_eq!(c.worker.sandbox, Sandbox::Auto);
        assert_eq!(c.worker.sandbox_read, vec![PathBuf::from("/opt/python")]);
        assert_eq!(c.worker.sandbox_write, vec![PathBuf::from("/var/cache/agent")]);
        assert_eq!(c.worker.sandbox_connect, vec![443, 8443]);
        // A memory limit systemd understands but an rlimit cannot is fine without landlock.
        load("[worker.limits]\nmemory_max = \"50%\"", &[]).unwrap();
        let c = load("[worker]\nsandbox = \"landlock\"\nlimits = { memory_max = \"2G\" }", &[])
            .unwrap();
        assert_eq!(c.worker.limits.memory_max.as_deref(), Some("2G"));
    }

    #[test]
    fn sizes_read_as_systemd_writes_them() {
        assert_eq!(parse_bytes("512"), Ok(Some(512)));
        assert_eq!(parse_bytes("2G"), Ok(Some(2 << 30)));
        assert_eq!(parse_bytes("64m"), Ok(Some(64 << 20)));
        assert_eq!(parse_bytes("infinity"), Ok(None));
        assert!(parse_bytes("50%").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let e =
            Config::load_from(Some(Path::new("/nonexistent/turnd.toml")), env(&[])).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/turnd.toml"), "{e}");
    }

    #[test]
    fn file_syntax_error_is_a_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turnd.toml");
        std::fs::write(&path, "[worker\n").unwrap();
        let e = Config::load_from(Some(&path), env(&[])).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("line 1"), "{e}");

        std::fs::write(&path, "[amqp]\nprefix = \"fromfile\"\n").unwrap();
        let c = Config::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(c.amqp.prefix, "fromfile");
    }

    #[test]
    fn redaction_hides_passwords_and_the_token() {
        let c = load(
            "",
            &[
                ("TURND_DATABASE__URL", "postgres://u:secret@h/db?sslmode=require&password=qs"),
                ("TURND_HTTP__ADMIN_TOKEN", "tok3n-value"),
                ("TURND_HTTP__READ_TOKEN", "r3ad-value"),
                ("TURND_WORKER__ENV", "{ OPENAI_API_KEY = \"sk-w0rker-key\" }"),
            ],
        )
        .unwrap();
        let text = c.redacted_toml();
        assert!(!text.contains("sk-w0rker"), "{text}");
        assert!(text.contains("OPENAI_API_KEY = \"***\""), "{text}");
        assert_eq!(c.worker.env["OPENAI_API_KEY"].expose(), "sk-w0rker-key");
        assert!(!text.contains("secret"), "{text}");
        assert!(!text.contains("tok3n"), "{text}");
        assert!(!text.contains("r3ad"), "{text}");
        assert!(text.contains("read_token = \"***\""), "{text}");
        assert!(!text.contains("=qs"), "{text}");
        assert!(!text.contains("guest:guest"), "{text}");
        assert!(text.contains("postgres://u:***@h/db"), "{text}");
        assert!(text.contains("admin_token = \"***\""), "{text}");
        assert!(text.contains("sslmode=require"), "{text}");

        let debug = format!("{c:?}");
        assert!(
            !debug.contains("secret") && !debug.contains("tok3n") && !debug.contains("r3ad"),
            "{debug}"
        );
        assert!(!debug.contains("sk-w0rker"), "{debug}");
        assert_eq!(
            format!("{}", c.database.url),
            "postgres://u:***@h/db?sslmode=require&password=***"
        );
        assert_eq!(c.database.url.expose(), "postgres://u:secret@h/db?sslmode=require&password=qs");
        let token = c.http.admin_token.as_ref().unwrap();
        assert_eq!(token.expose(), "tok3n-value");
        assert!(token.matches("tok3n-value") && !token.matches("tok3n-valuE"));
        assert!(!token.matches("tok3n-valu") && !token.matches("") && !token.matches("r3ad-value"));
    }

    #[test]
    fn mac_is_hmac_sha256() {
        // RFC 4231, test cases 1 and 2 (the second has a key shorter than a block).
        let key = Secret::new(String::from_utf8(vec![0x0b; 20]).unwrap());
        assert_eq!(
            hex::encode(key.mac(b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex::encode(Secret::new("Jefe").mac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // A key longer than a block is hashed first; one of exactly a block is not (values
        // from Python's hmac module).
        assert_eq!(
            hex::encode(
                Secret::new("*".repeat(131))
                    .mac(b"Test Using Larger Than Block-Size Key - Hash Key First")
            ),
            "a879fe293ec4822a32e30037ac471452fbecd684d14d8c2b72a0743f6c2f40a6"
        );
        assert_eq!(
            hex::encode(Secret::new("*".repeat(64)).mac(b"m")),
            "33db77b477fbed80a24d7d01fae5d372acebf47f3fe44d4857c3f6bf79f51811"
        );
    }

    #[test]
    fn redacted_toml_reads_back() {
        let mut d = Config::default();
        d.http.listen = None;
        d.worker.limits.nofile = Some(1024);
        d.worker.env.insert("A".into(), Secret::new("b"));
        let text = d.redacted_toml();
        let mut back = Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        // the only differences: the redacted password and worker.env values
        back.amqp.url = d.amqp.url.clone();
        assert_eq!(back.worker.env["A"].expose(), "***");
        back.worker.env = d.worker.env.clone();
        assert_eq!(back, d, "{text}");
        assert!(text.contains("retention = \"7days\""), "{text}");
    }

    /// The example file has every key, and (but for the four commented-out examples) with
    /// its default value.
    #[test]
    fn example_file_equals_the_defaults() {
        let mut c = Config::from_toml_str(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
        let d = Config::default();
        assert_eq!(c.http.admin_token, None);
        assert_eq!(c.http.read_token, None);
        c.daemon.id = d.daemon.id.clone();
        c.worker.command = d.worker.command.clone();
        assert_eq!(c, d);
    }

    #[test]
    fn example_file_has_every_key() {
        let table: Table = EXAMPLE.parse().unwrap();
        let commented = ["daemon.id", "worker.command", "http.admin_token", "http.read_token"];
        for (section, keys) in KEYS {
            // the text of this section: from its header to the next one
            let header = format!("\n[{section}]\n");
            let start = EXAMPLE.find(&header).unwrap_or_else(|| panic!("no {header}"));
            let body = &EXAMPLE[start + header.len()..];
            let body = &body[..body.find("\n[").unwrap_or(body.len())];
            for (key, _) in *keys {
                let dotted = format!("{section}.{key}");
                if commented.contains(&dotted.as_str()) {
                    assert!(
                        body.contains(&format!("\n# {key} = ")),
                        "{dotted} is not a commented-out example"
                    );
                } else {
                    assert!(
                        table.get(*section).and_then(|s| s.get(key)).is_some(),
                        "{dotted} is missing from config/turnd.toml"
                    );
                }
            }
        }
        // sections in §9 order
        let positions: Vec<usize> =
            KEYS.iter().filter_map(|(s, _)| EXAMPLE.find(&format!("\n[{s}]\n"))).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "sections out of order");
    }

    /// `KEYS` lists exactly the fields of the structs, and a key is read as text exactly when
    /// its value is a string.
    #[test]
    fn key_list_matches_the_structs() {
        let mut d = Config::default();
        d.http.admin_token = Some(Secret::new("x"));
        d.http.read_token = Some(Secret::new("y"));
        d.otel.endpoint = Some("http://127.0.0.1:4318".into());
        let table = Table::try_from(&d).unwrap();
        let from_structs: BTreeSet<(String, String, bool)> = table
            .iter()
            .flat_map(|(section, keys)| {
                keys.as_table()
                    .unwrap()
                    .iter()
                    .map(move |(k, v)| (section.clone(), k.clone(), v.is_str()))
            })
            .collect();
        let from_list: BTreeSet<(String, String, bool)> = KEYS
            .iter()
            .flat_map(|(section, keys)| {
                keys.iter().map(move |(k, kind)| {
                    ((*section).to_owned(), (*k).to_owned(), *kind == Kind::Text)
                })
            })
            .collect();
        assert_eq!(from_structs, from_list);
        let sections: Vec<&str> = KEYS.iter().map(|(s, _)| *s).collect();
        assert_eq!(sections.len(), table.len());
    }
}
