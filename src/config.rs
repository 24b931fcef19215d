//! The daemon's configuration file (TOML). Every key is optional and has
//! the default of [`ServerConfig::new`]; command-line flags override the
//! file. Unknown keys and bad values are refused with the key's name and
//! what is wrong (toml's error shows the offending line).
//!
//! Durations are written as `30s`, `5m`, `7d` (humantime); sizes as
//! `4096`, `64KiB`, `1MiB`, `2GiB` (also `KB`, `MB`, `GB`, powers of 1000).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::server::ServerConfig;

/// The file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on.
    pub listen: Option<SocketAddr>,
    /// The `host:port` invites carry.
    pub public_addr: Option<String>,
    /// The data directory.
    pub data_dir: Option<PathBuf>,
    /// Event loops (default: the number of CPUs).
    pub workers: Option<usize>,
    /// `env_logger` filter, e.g. `info` or `tidings=debug` (`RUST_LOG`
    /// overrides).
    pub log_level: Option<String>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// How long undelivered entries are kept.
    #[serde(default)]
    pub retention: Retention,
    /// Quotas that refuse new messages.
    #[serde(default)]
    pub quotas: QuotaSettings,
    /// The store path.
    #[serde(default)]
    pub store: StoreSettings,
    /// Attachments (blobs).
    #[serde(default)]
    pub blobs: BlobSettings,
    /// Groups.
    #[serde(default)]
    pub groups: GroupSettings,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsSettings,
}

/// `[blobs]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobSettings {
    /// The largest blob taken.
    #[serde(default, deserialize_with = "size")]
    pub max_size: Option<u64>,
    /// Most bytes one user's blobs may take.
    #[serde(default, deserialize_with = "size")]
    pub user_budget: Option<u64>,
    /// How long an upload may stay unfinished.
    #[serde(default, deserialize_with = "duration")]
    pub upload_ttl: Option<Duration>,
    /// Most bytes of blob chunks and reads in flight in the daemon.
    #[serde(default, deserialize_with = "size")]
    pub transfer_memory: Option<u64>,
}

/// `[groups]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSettings {
    /// Most members of one group (default 256, at most 1024).
    pub max_members: Option<usize>,
    /// Most groups one user is in (default 100, at most 1000).
    pub max_per_user: Option<usize>,
    /// Membership changes a device may make per minute.
    pub changes_per_minute: Option<u32>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Where to serve `/metrics` (off when absent), e.g. `127.0.0.1:9420`.
    pub listen: Option<SocketAddr>,
}

/// `[store]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// How long a copy for an online device may wait in memory for its
    /// ack before it is written.
    #[serde(default, deserialize_with = "duration")]
    pub write_delay: Option<Duration>,
    /// Most bytes of copies waiting in memory to be written.
    #[serde(default, deserialize_with = "size")]
    pub write_memory: Option<u64>,
    /// Free space below which new messages are refused (re-read on
    /// SIGHUP).
    #[serde(default, deserialize_with = "size")]
    pub min_free: Option<u64>,
}

/// `[retention]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Queue entries (and remembered message ids) older than this expire.
    #[serde(default, deserialize_with = "duration")]
    pub period: Option<Duration>,
    /// Pause between sweeps.
    #[serde(default, deserialize_with = "duration")]
    pub sweep_every: Option<Duration>,
}

/// `[quotas]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    /// Most entries in one device's queue.
    pub queue_messages: Option<u64>,
    /// Most bytes in one device's queue.
    #[serde(default, deserialize_with = "size")]
    pub queue_bytes: Option<u64>,
    /// Most bytes the database may take on disk.
    #[serde(default, deserialize_with = "size")]
    pub disk_budget: Option<u64>,
    /// Most message copies waiting on disk in all queues together.
    pub total_messages: Option<u64>,
    /// Most bytes one user's messages and receipts may hold in all queues
    /// (default: an eighth of `disk_budget`).
    #[serde(default, deserialize_with = "size")]
    pub user_bytes: Option<u64>,
    /// Most entries one user's messages and receipts may make in all
    /// queues (default: an eighth of `total_messages`).
    pub user_messages: Option<u64>,
}

/// `[timeouts]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// From accept to the end of the handshake.
    #[serde(default, deserialize_with = "duration")]
    pub handshake: Option<Duration>,
    /// Silence after which the server pings.
    #[serde(default, deserialize_with = "duration")]
    pub ping_after: Option<Duration>,
    /// Silence after which the server closes.
    #[serde(default, deserialize_with = "duration")]
    pub idle: Option<Duration>,
    /// How long a link code stays valid.
    #[serde(default, deserialize_with = "duration")]
    pub link_code: Option<Duration>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most bytes waiting to be written to one connection.
    #[serde(default, deserialize_with = "size")]
    pub max_output: Option<u64>,
    /// Most unacknowledged deliveries per connection.
    pub delivery_window: Option<u64>,
    /// Key claims per device per minute.
    pub key_claims_per_minute: Option<u32>,
    /// Ephemeral sends (typing) and presence requests per device per
    /// minute.
    pub ephemeral_per_minute: Option<u32>,
    /// `Send`s per device per minute, sustained.
    pub sends_per_minute: Option<u32>,
    /// `Send`s per device at once.
    pub send_burst: Option<u32>,
    /// Receipts, retractions and key uploads per device per minute.
    pub writes_per_minute: Option<u32>,
    /// Receipts, retractions and key uploads per device at once.
    pub write_burst: Option<u32>,
    /// One-time keys of one device handed out per minute, whoever claims.
    pub one_time_keys_per_minute: Option<u32>,
    /// One-time keys of one device handed out at once.
    pub one_time_keys_burst: Option<u32>,
    /// sled's page cache.
    #[serde(default, deserialize_with = "size")]
    pub cache: Option<u64>,
    /// Open connections allowed from one address.
    pub connections_per_ip: Option<u32>,
    /// New connections (handshakes) per second allowed from one address.
    pub handshakes_per_second_per_ip: Option<u32>,
    /// Open connections allowed in all.
    pub max_connections: Option<u32>,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    match humantime::parse_duration(&text) {
        Ok(v) if !v.is_zero() => Ok(Some(v)),
        Ok(_) => Err(serde::de::Error::custom("a duration must be more than zero")),
        Err(e) => Err(serde::de::Error::custom(format!(
            "not a duration: {e} (write e.g. 30s, 5m, 7d)"
        ))),
    }
}

/// Parses `4096`, `64KiB`, `1 MiB`, `2GB`...
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(Some(n)),
        Size::Text(t) => parse_size(&t)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("not a size: {t:?} (write e.g. 4096, 64KiB, 1MiB, 2GB)"))),
    }
}

impl FileConfig {
    /// Reads and checks a configuration file.
    ///
    /// # Errors
    /// A message naming the file and, for a bad key or value, the key.
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        FileConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses configuration text.
    ///
    /// # Errors
    /// toml's message, which names the key and shows the line.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        let config: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.workers == Some(0) {
            return Err("workers: must be at least 1".into());
        }
        if config.limits.delivery_window == Some(0) {
            return Err("limits.delivery_window: must be at least 1".into());
        }
        if config.quotas.queue_messages == Some(0) {
            return Err("quotas.queue_messages: must be at least 1".into());
        }
        if config.limits.connections_per_ip == Some(0) {
            return Err("limits.connections_per_ip: must be at least 1".into());
        }
        if config.limits.handshakes_per_second_per_ip == Some(0) {
            return Err("limits.handshakes_per_second_per_ip: must be at least 1".into());
        }
        if config.limits.key_claims_per_minute == Some(0) {
            return Err("limits.key_claims_per_minute: must be at least 1".into());
        }
        if config.limits.max_connections == Some(0) {
            return Err("limits.max_connections: must be at least 1".into());
        }
        if config.limits.ephemeral_per_minute == Some(0) {
            return Err("limits.ephemeral_per_minute: must be at least 1".into());
        }
        let g = &config.groups;
        if g.max_members
            .is_some_and(|n| !(2..=crate::wire::MAX_GROUP_MEMBERS).contains(&n))
        {
            return Err(format!(
                "groups.max_members: must be from 2 to {}",
                crate::wire::MAX_GROUP_MEMBERS
            ));
        }
        if g.max_per_user
            .is_some_and(|n| !(1..=crate::wire::MAX_GROUPS_PER_USER).contains(&n))
        {
            return Err(format!(
                "groups.max_per_user: must be from 1 to {}",
                crate::wire::MAX_GROUPS_PER_USER
            ));
        }
        if g.changes_per_minute == Some(0) {
            return Err("groups.changes_per_minute: must be at least 1".into());
        }
        let l = &config.limits;
        for (key, v) in [
            ("sends_per_minute", l.sends_per_minute),
            ("send_burst", l.send_burst),
            ("writes_per_minute", l.writes_per_minute),
            ("write_burst", l.write_burst),
            ("one_time_keys_per_minute", l.one_time_keys_per_minute),
            ("one_time_keys_burst", l.one_time_keys_burst),
        ] {
            if v == Some(0) {
                return Err(format!("limits.{key}: must be at least 1"));
            }
        }
        // spec §9: the server pings a silent connection before it closes
        // it; an idle timeout at or below ping_after would close
        // connections that answer every ping.
        let session = config.to_server_config().session;
        if session.idle_timeout <= session.ping_after {
            return Err(format!(
                "timeouts.idle ({}) must be longer than timeouts.ping_after ({})",
                humantime::format_duration(session.idle_timeout),
                humantime::format_duration(session.ping_after)
            ));
        }
        Ok(config)
    }

    /// The server configuration: defaults, then this file's settings.
    pub fn to_server_config(&self) -> ServerConfig {
        let mut c = ServerConfig::new(self.data_dir.clone().unwrap_or_else(|| PathBuf::from("./tidings-data")));
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = &self.public_addr {
            c.public_addr = Some(v.clone());
        }
        if let Some(v) = self.workers {
            c.workers = v;
        }
        let t = &self.timeouts;
        if let Some(v) = t.handshake {
            c.session.handshake_timeout = v;
        }
        if let Some(v) = t.ping_after {
            c.session.ping_after = v;
        }
        if let Some(v) = t.idle {
            c.session.idle_timeout = v;
        }
        if let Some(v) = t.link_code {
            c.hub.link_ttl = v;
        }
        let l = &self.limits;
        if let Some(v) = l.max_output {
            c.session.max_output = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = l.delivery_window {
            c.hub.window = v;
        }
        if let Some(v) = l.key_claims_per_minute {
            c.hub.claims_per_minute = v;
        }
        if let Some(v) = l.ephemeral_per_minute {
            c.hub.ephemeral_per_minute = v;
        }
        let rates = [
            (&mut c.hub.send_rate, l.sends_per_minute, l.send_burst),
            (&mut c.hub.write_rate, l.writes_per_minute, l.write_burst),
            (
                &mut c.hub.key_handouts,
                l.one_time_keys_per_minute,
                l.one_time_keys_burst,
            ),
        ];
        for (rate, per_minute, burst) in rates {
            if let Some(v) = per_minute {
                rate.per_minute = v;
            }
            if let Some(v) = burst {
                rate.burst = v;
            }
        }
        if let Some(v) = l.cache {
            c.store.cache_capacity = v;
        }
        if let Some(v) = self.retention.period {
            c.retention.period = v;
        }
        if let Some(v) = self.retention.sweep_every {
            c.retention.sweep_every = v;
        }
        let q = &self.quotas;
        if let Some(v) = q.queue_messages {
            c.store.quotas.queue_messages = v;
        }
        if let Some(v) = q.queue_bytes {
            c.store.quotas.queue_bytes = v;
        }
        if let Some(v) = q.disk_budget {
            c.store.quotas.disk_budget = v;
        }
        if let Some(v) = q.total_messages {
            c.store.quotas.total_messages = v;
        }
        // The users' shares follow the budget unless they are set.
        c.store.quotas = c.store.quotas.with_default_shares();
        if let Some(v) = q.user_bytes {
            c.store.quotas.user_bytes = v;
        }
        if let Some(v) = q.user_messages {
            c.store.quotas.user_messages = v;
        }
        let st = &self.store;
        if let Some(v) = st.write_delay {
            c.store.write_delay = v;
        }
        if let Some(v) = st.write_memory {
            c.store.write_memory = v;
        }
        if let Some(v) = st.min_free {
            c.store.min_free = v;
        }
        if let Some(v) = l.connections_per_ip {
            c.per_ip.connections = v;
        }
        let g = &self.groups;
        if let Some(v) = g.max_members {
            c.hub.group_members = v;
        }
        if let Some(v) = g.max_per_user {
            c.hub.groups_per_user = v;
        }
        if let Some(v) = g.changes_per_minute {
            c.hub.group_changes_per_minute = v;
        }
        if let Some(v) = l.handshakes_per_second_per_ip {
            c.per_ip.handshakes_per_second = v;
        }
        let b = &self.blobs;
        if let Some(v) = b.max_size {
            c.store.blobs.max_size = v;
        }
        if let Some(v) = b.user_budget {
            c.store.blobs.user_budget = v;
        }
        if let Some(v) = b.upload_ttl {
            c.store.blobs.upload_ttl = v;
        }
        if let Some(v) = b.transfer_memory {
            c.hub.blob_memory = v;
        }
        if let Some(v) = l.max_connections {
            c.max_connections = v;
        }
        c.metrics_listen = self.metrics.listen;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file() {
        let c = FileConfig::parse(
            r#"
            listen = "0.0.0.0:7000"
            public_addr = "chat.example.org:7000"
            data_dir = "/var/lib/tidings"
            workers = 2
            log_level = "info"
            [timeouts]
            handshake = "5s"
            ping_after = "20s"
            idle = "1m"
            link_code = "15m"
            [limits]
            max_output = "2MiB"
            delivery_window = 128
            key_claims_per_minute = 10
            ephemeral_per_minute = 20
            sends_per_minute = 120
            send_burst = 1000
            writes_per_minute = 240
            write_burst = 50
            one_time_keys_per_minute = 2
            one_time_keys_burst = 5
            cache = 33554432
            connections_per_ip = 10
            handshakes_per_second_per_ip = 5
            max_connections = 500
            [retention]
            period = "7d"
            sweep_every = "10s"
            [quotas]
            queue_messages = 1000
            queue_bytes = "10MiB"
            disk_budget = "1GiB"
            [store]
            write_delay = "20ms"
            write_memory = "4MiB"
            min_free = "1GiB"
            [blobs]
            max_size = "16MiB"
            user_budget = "100MiB"
            upload_ttl = "2h"
            transfer_memory = "8MiB"
            [groups]
            max_members = 1024
            max_per_user = 20
            changes_per_minute = 30
            [metrics]
            listen = "127.0.0.1:9420"
            "#,
        )
        .unwrap();
        let s = c.to_server_config();
        assert_eq!(s.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(s.public_addr.as_deref(), Some("chat.example.org:7000"));
        assert_eq!(s.data_dir, PathBuf::from("/var/lib/tidings"));
        assert_eq!(s.workers, 2);
        assert_eq!(s.session.handshake_timeout, Duration::from_secs(5));
        assert_eq!(s.session.idle_timeout, Duration::from_secs(60));
        assert_eq!(s.session.max_output, 2 << 20);
        assert_eq!(s.hub.window, 128);
        assert_eq!(s.hub.link_ttl, Duration::from_secs(900));
        assert_eq!(s.hub.ephemeral_per_minute, 20);
        assert_eq!((s.hub.send_rate.per_minute, s.hub.send_rate.burst), (120, 1000));
        assert_eq!((s.hub.write_rate.per_minute, s.hub.write_rate.burst), (240, 50));
        assert_eq!((s.hub.key_handouts.per_minute, s.hub.key_handouts.burst), (2, 5));
        assert_eq!(s.store.cache_capacity, 32 << 20);
        assert_eq!(s.per_ip.connections, 10);
        assert_eq!(s.per_ip.handshakes_per_second, 5);
        assert_eq!(s.max_connections, 500);
        assert_eq!(s.retention.period, Duration::from_secs(7 * 86400));
        assert_eq!(s.retention.sweep_every, Duration::from_secs(10));
        assert_eq!(s.store.quotas.queue_messages, 1000);
        assert_eq!(s.store.quotas.queue_bytes, 10 << 20);
        assert_eq!(s.store.quotas.disk_budget, 1 << 30);
        assert_eq!(s.store.quotas.user_bytes, 128 << 20, "an eighth of the budget");
        assert_eq!(s.store.write_delay, Duration::from_millis(20));
        assert_eq!(s.store.write_memory, 4 << 20);
        assert_eq!(s.store.min_free, 1 << 30);
        assert_eq!(s.store.blobs.max_size, 16 << 20);
        assert_eq!(s.store.blobs.user_budget, 100 << 20);
        assert_eq!(s.store.blobs.upload_ttl, Duration::from_secs(7200));
        assert_eq!(s.hub.blob_memory, 8 << 20);
        assert_eq!(
            (
                s.hub.group_members,
                s.hub.groups_per_user,
                s.hub.group_changes_per_minute
            ),
            (1024, 20, 30)
        );
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9420".parse().unwrap()));
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let s = FileConfig::parse("").unwrap().to_server_config();
        assert_eq!(s.listen, ServerConfig::new("x".into()).listen);
    }

    #[test]
    fn mistakes_name_the_key() {
        for (text, needle) in [
            ("listn = \"127.0.0.1:1\"", "listn"),
            ("[limits]\ndelivery_windw = 3", "delivery_windw"),
            ("[timeouts]\nidle = \"soon\"", "idle"),
            ("[limits]\ncache = \"lots\"", "cache"),
            ("workers = 0", "workers"),
            ("listen = \"nowhere\"", "listen"),
            ("[timeouts]\nidle = \"0s\"", "idle"),
            ("[limits]\nsend_burst = 0", "send_burst"),
            ("[groups]\nmax_members = 2000", "max_members"),
            ("[groups]\nmax_per_user = 0", "max_per_user"),
            ("[timeouts]\nidle = \"20s\"", "timeouts.idle"),
            ("[timeouts]\nping_after = \"2m\"", "timeouts.ping_after"),
            ("[timeouts]\nidle = \"30s\"\nping_after = \"30s\"", "longer than"),
            ("[limits]\nmax_connections = 0", "max_connections"),
        ] {
            let e = FileConfig::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1 MiB"), Some(1 << 20));
        assert_eq!(parse_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_size("2XB"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }
}
