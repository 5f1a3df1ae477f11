//! The broker's TOML configuration file (`corebus serve --config FILE`) and its commented
//! example (`corebus config example`). Keys are the `serve` flags with `_` for `-`; sizes take
//! `4096`, `"64KiB"`, `"1GiB"`; durations take `"500ms"`, `"30s"`, `"7d"` (or milliseconds).
//! Unknown keys and bad values are refused, naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use corebus::broker::BrokerConfig;
use corebus::storage::{Durability, GroupCommit};
use serde::Deserialize;

use super::{parse_bytes, parse_millis};

/// A size or duration: a number, or a string with a unit.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum Quantity {
    Number(u64),
    Text(String),
}

impl Quantity {
    fn bytes(&self, key: &str) -> Result<u64, String> {
        match self {
            Self::Number(n) => Ok(*n),
            Self::Text(t) => parse_bytes(t).map_err(|e| format!("{key}: {e}")),
        }
    }
    fn millis(&self, key: &str) -> Result<u64, String> {
        match self {
            Self::Number(n) => Ok(*n),
            Self::Text(t) => parse_millis(t).map_err(|e| format!("{key}: {e}")),
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    shards: Option<usize>,
    cpus: Option<Vec<usize>>,
    durability: Option<String>,
    max_frame_bytes: Option<Quantity>,
    max_batch_bytes: Option<Quantity>,
    max_batch_records: Option<u32>,
    max_inflight_per_connection: Option<usize>,
    max_buffered_bytes_per_connection: Option<Quantity>,
    max_connections_per_shard: Option<usize>,
    max_connections: Option<usize>,
    idle_timeout: Option<Quantity>,
    frame_timeout: Option<Quantity>,
    max_topics: Option<usize>,
    max_partitions_total: Option<u64>,
    max_partitions_per_topic: Option<u32>,
    io_memory: Option<Quantity>,
    cache_bytes_per_partition: Option<Quantity>,
    cache_bytes_per_shard: Option<Quantity>,
    segment_bytes: Option<Quantity>,
    segment_age: Option<Quantity>,
    preallocate_bytes: Option<Quantity>,
    group_commit: Option<String>,
    prewrite_bytes: Option<Quantity>,
    prewrite_budget_bytes: Option<Quantity>,
    prewrite_max_flush_bytes: Option<Quantity>,
    retention_ms: Option<Quantity>,
    retention_bytes: Option<Quantity>,
    retention_check_interval: Option<Quantity>,
    checkpoint_interval: Option<Quantity>,
    max_fetch_bytes: Option<Quantity>,
    max_fetch_wait: Option<Quantity>,
}

/// Reads `path` and writes its settings into `config`. Returns whether it set `shards`.
pub fn apply(path: &Path, config: &mut BrokerConfig) -> Result<bool, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let at = |key: &str| format!("{} setting {key}", path.display());
    macro_rules! plain {
        ($key:ident) => {
            if let Some(v) = file.$key.clone() {
                config.$key = v.into();
            }
        };
    }
    macro_rules! size {
        ($key:ident => $($target:ident).+) => {
            if let Some(q) = &file.$key {
                config.$($target).+ = q.bytes(&at(stringify!($key)))? as _;
            }
        };
    }
    macro_rules! millis {
        ($key:ident => $target:ident) => {
            if let Some(q) = &file.$key {
                config.$target = q.millis(&at(stringify!($key)))? as _;
            }
        };
    }
    plain!(data_dir);
    plain!(listen);
    plain!(shards);
    plain!(max_batch_records);
    plain!(max_inflight_per_connection);
    plain!(max_connections_per_shard);
    plain!(max_connections);
    plain!(max_topics);
    plain!(max_partitions_total);
    plain!(max_partitions_per_topic);
    if file.metrics_listen.is_some() {
        config.metrics_listen = file.metrics_listen;
    }
    if file.cpus.is_some() {
        config.cpus = file.cpus.clone();
    }
    if let Some(d) = &file.durability {
        config.durability = <Durability as clap::ValueEnum>::from_str(d, true).map_err(|_| {
            format!(
                "{}: must be sync, write or none, got '{d}'",
                at("durability")
            )
        })?;
    }
    size!(max_frame_bytes => max_frame_bytes);
    size!(max_batch_bytes => max_batch_bytes);
    size!(max_buffered_bytes_per_connection => max_buffered_bytes_per_connection);
    size!(io_memory => io_memory_bytes);
    size!(cache_bytes_per_partition => cache_bytes_per_partition);
    size!(cache_bytes_per_shard => cache_bytes_per_shard);
    size!(segment_bytes => segment_bytes);
    size!(preallocate_bytes => preallocate_bytes);
    if let Some(g) = &file.group_commit {
        config.group_commit =
            <GroupCommit as clap::ValueEnum>::from_str(g, true).map_err(|_| {
                format!(
                    "{}: must be partition or shard, got '{g}'",
                    at("group_commit")
                )
            })?;
    }
    size!(prewrite_bytes => prewrite.ahead_bytes);
    size!(prewrite_budget_bytes => prewrite.shard_budget_bytes);
    size!(prewrite_max_flush_bytes => prewrite.max_flush_bytes);
    size!(max_fetch_bytes => max_fetch_bytes);
    millis!(idle_timeout => idle_timeout_ms);
    millis!(frame_timeout => frame_timeout_ms);
    millis!(retention_check_interval => retention_check_ms);
    millis!(checkpoint_interval => checkpoint_interval_ms);
    millis!(max_fetch_wait => max_fetch_wait_ms);
    if let Some(q) = &file.segment_age {
        config.segment_ms = Some(q.millis(&at("segment_age"))?);
    }
    if let Some(q) = &file.retention_ms {
        config.retention_ms = Some(q.millis(&at("retention_ms"))?);
    }
    if let Some(q) = &file.retention_bytes {
        config.retention_bytes = Some(q.bytes(&at("retention_bytes"))?);
    }
    Ok(file.shards.is_some())
}

/// A commented example with every setting at its default.
pub const EXAMPLE: &str = r#"# corebus.toml: settings of `corebus serve --config corebus.toml`.
# Every key is also a flag of `corebus serve` (with - for _); flags override this file.
# Sizes: 4096, "64KiB", "32MiB", "1GiB". Durations: "500ms", "30s", "10m", "7d".

# --- where
data_dir = "./corebus-data"          # topics, logs, superblock; a real filesystem (xfs, ext4)
listen = "127.0.0.1:7070"            # public port; shard i also listens on port + 1 + i
# metrics_listen = "127.0.0.1:9464"  # Prometheus text format at http://ADDR/metrics

# --- cores
# shards = 2                         # default: one per CPU
# cpus = [0, 1]                      # pin shard i to cpus[i]
io_memory = "64MiB"                  # DMA buffer pool per shard (glommio io_memory)

# --- durability and storage
durability = "sync"                  # sync: after fdatasync; write: after the O_DIRECT write; none: in memory
segment_bytes = "1GiB"               # roll a segment past this size
# segment_age = "7d"                 # roll a segment whose first batch is older
preallocate_bytes = "32MiB"          # preallocation step of segment files
group_commit = "shared-flush"        # shared-flush: one disk flush per shard round for overwrites; partition: fdatasync each; syncfs
prewrite_bytes = "8MiB"              # zero-fill this far ahead of a partition's end (0: off) ...
prewrite_budget_bytes = "256MiB"     # ... at most this much over a shard's partitions ...
prewrite_max_flush_bytes = "512KiB"  # ... for partitions whose flushes are smaller than this
checkpoint_interval = "1s"           # how often logs record their durable point (bounds recovery scans)
cache_bytes_per_partition = "8MiB"   # recent data served from memory ...
cache_bytes_per_shard = "128MiB"     # ... at most this much over a shard's partitions

# --- retention (topics may override with `topic create --retention-*`)
# retention_ms = "7d"                # delete segments whose newest record is older
# retention_bytes = "100GiB"         # keep each partition under this size
retention_check_interval = "5s"

# --- limits
max_frame_bytes = "16MiB"
max_batch_bytes = "16MiB"
max_batch_records = 100000
max_inflight_per_connection = 256
max_buffered_bytes_per_connection = "64MiB"
max_connections_per_shard = 10000
max_connections = 50000
idle_timeout = "10m"
frame_timeout = "30s"
max_topics = 10000
max_partitions_total = 100000
max_partitions_per_topic = 10000
max_fetch_bytes = "8MiB"
max_fetch_wait = "60s"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BrokerConfig {
        BrokerConfig::new(PathBuf::from("."), SocketAddr::from(([127, 0, 0, 1], 1)))
    }

    #[test]
    fn the_example_parses_to_the_defaults() {
        let dir = std::env::temp_dir().join(format!("corebus-example-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("corebus.toml");
        std::fs::write(&path, EXAMPLE).expect("write");
        let mut c = config();
        apply(&path, &mut c).expect("example is valid");
        let d = BrokerConfig::new(
            PathBuf::from("./corebus-data"),
            SocketAddr::from(([127, 0, 0, 1], 7070)),
        );
        assert_eq!(c.data_dir, d.data_dir);
        assert_eq!(c.segment_bytes, d.segment_bytes);
        assert_eq!(c.idle_timeout_ms, d.idle_timeout_ms);
        assert_eq!(
            c.max_buffered_bytes_per_connection,
            d.max_buffered_bytes_per_connection
        );
        std::fs::write(&path, "segment_bytes = \"12 parsecs\"\n").expect("write");
        let err = apply(&path, &mut config()).expect_err("bad value");
        assert!(err.contains("segment_bytes"), "{err}");
        std::fs::write(&path, "segmnt_bytes = 5\n").expect("write");
        let err = apply(&path, &mut config()).expect_err("unknown key");
        assert!(err.contains("segmnt_bytes"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
