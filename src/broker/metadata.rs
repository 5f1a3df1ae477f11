//! Topic metadata: the list of topics and their partition counts, the subscriptions defined on
//! them, and where it is kept.
//!
//! Shard 0 is the only writer; it saves the whole catalog atomically (write a temporary file,
//! fsync, rename, fsync the directory) and then tells every shard by message. Every shard
//! reads the saved list once at start. The store is one small interface so that it can move
//! to a consensus service (etcd) when corebus spans machines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::protocol::wire::TopicCompression;
use crate::record::Codec;
use crate::subscription::{Filter, StartPosition, SubscriptionConfig};

/// A topic's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// Number of partitions.
    pub partitions: u32,
    /// Retention by age; `None` uses the broker's default.
    pub retention_ms: Option<u64>,
    /// Retention by size per partition; `None` uses the broker's default.
    pub retention_bytes: Option<u64>,
    /// The codec batches are stored in; `None` keeps what each producer sent.
    pub compression: Option<Codec>,
}

impl TopicConfig {
    /// A topic with `partitions` partitions and the broker's default retention.
    pub fn with_partitions(partitions: u32) -> Self {
        Self {
            partitions,
            retention_ms: None,
            retention_bytes: None,
            compression: None,
        }
    }
}

/// The topic setting's name for `compression`: `producer` or a codec.
pub fn compression_name(compression: Option<Codec>) -> &'static str {
    compression.map_or("producer", Codec::name)
}

/// Parses the topic setting `compression`: `producer` (keep what producers send) or a codec.
pub fn parse_compression(s: &str) -> Result<Option<Codec>, String> {
    match s {
        "producer" => Ok(None),
        codec => codec
            .parse()
            .map(Some)
            .map_err(|e: String| format!("{e}, or producer")),
    }
}

/// The wire form of the topic setting `compression`.
pub fn compression_to_wire(compression: Option<Codec>) -> TopicCompression {
    match compression {
        None => TopicCompression::Producer,
        Some(Codec::None) => TopicCompression::None,
        Some(Codec::Lz4) => TopicCompression::Lz4,
        Some(Codec::Zstd) => TopicCompression::Zstd,
    }
}

/// The topic setting `compression` from the wire; `Err` for a value this broker does not know.
pub fn compression_from_wire(wire: TopicCompression) -> Result<Option<Codec>, String> {
    match wire {
        TopicCompression::Producer => Ok(None),
        TopicCompression::None => Ok(Some(Codec::None)),
        TopicCompression::Lz4 => Ok(Some(Codec::Lz4)),
        TopicCompression::Zstd => Ok(Some(Codec::Zstd)),
        other => Err(format!("unknown topic compression {}", other.0)),
    }
}

/// Topic name → settings.
pub type TopicMap = BTreeMap<String, TopicConfig>;

/// (topic, subscription name) → definition.
pub type SubscriptionMap = BTreeMap<(String, String), SubscriptionConfig>;

/// Everything the metadata store keeps.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// The topics.
    pub topics: TopicMap,
    /// The subscriptions on them.
    pub subscriptions: SubscriptionMap,
}

fn subscription_to_json(topic: &str, name: &str, c: &SubscriptionConfig) -> serde_json::Value {
    serde_json::json!({
        "topic": topic,
        "name": name,
        "filter": {
            "types": c.filter.types,
            "subject_begins_with": c.filter.subject_begins_with,
            "subject_ends_with": c.filter.subject_ends_with,
            "attributes": c.filter.attributes,
        },
        "lock_duration_ms": c.lock_duration_ms,
        "max_deliveries": c.max_deliveries,
        "ttl_ms": c.ttl_ms,
        "dead_letter_topic": c.dead_letter_topic,
        "start": c.start.as_str(),
    })
}

fn subscription_from_json(
    entry: &serde_json::Value,
) -> Option<(String, String, SubscriptionConfig)> {
    let string = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let topic = string(entry.get("topic")?)?;
    let name = string(entry.get("name")?)?;
    let filter = entry.get("filter")?;
    let types = filter
        .get("types")?
        .as_array()?
        .iter()
        .map(string)
        .collect::<Option<Vec<_>>>()?;
    let mut attributes = Vec::new();
    for pair in filter.get("attributes")?.as_array()? {
        let pair = pair.as_array()?;
        let (Some(k), Some(v), 2) = (pair.first(), pair.get(1), pair.len()) else {
            return None;
        };
        attributes.push((string(k)?, string(v)?));
    }
    let start = match entry.get("start")?.as_str()? {
        "earliest" => StartPosition::Earliest,
        "latest" => StartPosition::Latest,
        _ => return None,
    };
    let config = SubscriptionConfig {
        filter: Filter {
            types,
            subject_begins_with: filter.get("subject_begins_with").and_then(string),
            subject_ends_with: filter.get("subject_ends_with").and_then(string),
            attributes,
        },
        lock_duration_ms: u32::try_from(entry.get("lock_duration_ms")?.as_u64()?).ok()?,
        max_deliveries: u32::try_from(entry.get("max_deliveries")?.as_u64()?).ok()?,
        ttl_ms: entry.get("ttl_ms").and_then(serde_json::Value::as_u64),
        dead_letter_topic: entry.get("dead_letter_topic").and_then(string),
        start,
    };
    Some((topic, name, config))
}

/// Converts a wire value where -1 (any negative) means "not set".
pub fn optional(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

/// Converts back to the wire: `None` is -1.
pub fn to_wire(value: Option<u64>) -> i64 {
    value.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// The file-backed metadata store.
#[derive(Clone, Debug)]
pub struct MetadataStore {
    path: PathBuf,
}

impl MetadataStore {
    /// The store inside `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join("topics.json"),
        }
    }

    /// Reads the saved catalog (empty if the file does not exist yet).
    pub fn load(&self) -> Result<Catalog, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Catalog::default()),
            Err(e) => return Err(format!("reading {}: {e}", self.path.display())),
        };
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("parsing {}: {e}", self.path.display()))?;
        let mut topics = TopicMap::new();
        let list = value
            .get("topics")
            .and_then(|t| t.as_array())
            .ok_or_else(|| format!("{}: no \"topics\" list", self.path.display()))?;
        for entry in list {
            let name = entry.get("name").and_then(|n| n.as_str());
            let partitions = entry.get("partitions").and_then(|p| p.as_u64());
            let retention_ms = entry.get("retention_ms").and_then(|v| v.as_u64());
            let retention_bytes = entry.get("retention_bytes").and_then(|v| v.as_u64());
            // Absent in files written before topics had the setting.
            let compression = match entry.get("compression").and_then(|v| v.as_str()) {
                None => Ok(None),
                Some(name) => parse_compression(name),
            };
            match (name, partitions, compression) {
                (Some(name), Some(p), Ok(compression)) if p > 0 && p <= u64::from(u32::MAX) => {
                    let config = TopicConfig {
                        partitions: p as u32,
                        retention_ms,
                        retention_bytes,
                        compression,
                    };
                    topics.insert(name.to_string(), config);
                }
                _ => {
                    return Err(format!(
                        "{}: malformed topic entry {entry}",
                        self.path.display()
                    ))
                }
            }
        }
        let mut subscriptions = SubscriptionMap::new();
        // Absent in files written before subscriptions existed.
        if let Some(list) = value.get("subscriptions").and_then(|s| s.as_array()) {
            for entry in list {
                let Some((topic, name, config)) = subscription_from_json(entry) else {
                    return Err(format!(
                        "{}: malformed subscription entry {entry}",
                        self.path.display()
                    ));
                };
                subscriptions.insert((topic, name), config);
            }
        }
        Ok(Catalog {
            topics,
            subscriptions,
        })
    }

    /// Saves the whole catalog atomically and durably (blocking; run off the executor).
    pub fn save(&self, catalog: &Catalog) -> Result<(), String> {
        let subscriptions: Vec<serde_json::Value> = catalog
            .subscriptions
            .iter()
            .map(|((topic, name), c)| subscription_to_json(topic, name, c))
            .collect();
        let list: Vec<serde_json::Value> = catalog
            .topics
            .iter()
            .map(|(name, c)| {
                serde_json::json!({
                    "name": name,
                    "partitions": c.partitions,
                    "retention_ms": c.retention_ms,
                    "retention_bytes": c.retention_bytes,
                    "compression": compression_name(c.compression),
                })
            })
            .collect();
        let text = serde_json::json!({"format": 1, "topics": list, "subscriptions": subscriptions})
            .to_string();
        crate::storage::atomic_file::replace(&self.path, text.as_bytes())
            .map_err(|e| format!("saving {}: {e}", self.path.display()))
    }
}

/// Producer ids are handed out from blocks of this many; the end of the last block is saved
/// before any id of it is given, so that no id is given twice across restarts.
pub const PRODUCER_ID_BLOCK: u64 = 1000;

impl MetadataStore {
    fn producer_ids_path(&self) -> PathBuf {
        self.path.with_file_name("producer_ids")
    }

    /// The end of the last block of producer ids handed out (0 if none ever was).
    pub fn load_producer_id_block_end(&self) -> Result<u64, String> {
        let path = self.producer_ids_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|e| format!("{}: not a number: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Saves the end of the block of producer ids about to be handed out, atomically and
    /// durably (blocking; run off the executor).
    pub fn save_producer_id_block_end(&self, end: u64) -> Result<(), String> {
        let path = self.producer_ids_path();
        crate::storage::atomic_file::replace(&path, format!("{end}\n").as_bytes())
            .map_err(|e| format!("saving {}: {e}", path.display()))
    }
}

/// The directory of one partition's log.
pub fn partition_dir(data_dir: &Path, topic: &str, partition: u32) -> PathBuf {
    data_dir
        .join("topics")
        .join(topic)
        .join(partition.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_round_trip_through_json() {
        let config = SubscriptionConfig {
            filter: Filter {
                types: vec!["a.b".into()],
                subject_begins_with: Some("eu/".into()),
                subject_ends_with: None,
                attributes: vec![("region".into(), "eu".into())],
            },
            lock_duration_ms: 1_000,
            max_deliveries: 3,
            ttl_ms: Some(60_000),
            dead_letter_topic: Some("dlq".into()),
            start: StartPosition::Latest,
        };
        let json = subscription_to_json("t", "s", &config);
        let (topic, name, back) = subscription_from_json(&json).expect("parses");
        assert_eq!((topic.as_str(), name.as_str()), ("t", "s"));
        assert_eq!(back, config);
    }
}
