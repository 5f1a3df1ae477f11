//! Topic metadata: the list of topics and their partition counts, and where it is kept.
//!
//! Shard 0 is the only writer; it saves the whole list atomically (write a temporary file,
//! fsync, rename, fsync the directory) and then tells every shard by message. Every shard
//! reads the saved list once at start. The store is one small interface so that it can move
//! to a consensus service (etcd) when corebus spans machines.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A topic's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// Number of partitions.
    pub partitions: u32,
    /// Retention by age; `None` uses the broker's default.
    pub retention_ms: Option<u64>,
    /// Retention by size per partition; `None` uses the broker's default.
    pub retention_bytes: Option<u64>,
}

impl TopicConfig {
    /// A topic with `partitions` partitions and the broker's default retention.
    pub fn with_partitions(partitions: u32) -> Self {
        Self {
            partitions,
            retention_ms: None,
            retention_bytes: None,
        }
    }
}

/// Topic name → settings.
pub type TopicMap = BTreeMap<String, TopicConfig>;

/// Converts a wire value where -1 (any negative) means "not set".
pub fn optional(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

/// Converts back to the wire: `None` is -1.
pub fn to_wire(value: Option<u64>) -> i64 {
    value.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// Longest topic name accepted.
pub const MAX_TOPIC_NAME_LEN: usize = 200;

/// Checks a topic name: 1..=200 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOPIC_NAME_LEN {
        return Err(format!(
            "topic name must be 1..={MAX_TOPIC_NAME_LEN} characters, got {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name '{name}' is reserved"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name may only hold [A-Za-z0-9._-], found {c:?}"
        ));
    }
    Ok(())
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

    /// Reads the saved topics (none if the file does not exist yet).
    pub fn load(&self) -> Result<TopicMap, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TopicMap::new()),
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
            match (name, partitions) {
                (Some(name), Some(p)) if p > 0 && p <= u64::from(u32::MAX) => {
                    let config = TopicConfig {
                        partitions: p as u32,
                        retention_ms,
                        retention_bytes,
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
        Ok(topics)
    }

    /// Saves the whole list atomically and durably (blocking; run off the executor).
    pub fn save(&self, topics: &TopicMap) -> Result<(), String> {
        let list: Vec<serde_json::Value> = topics
            .iter()
            .map(|(name, c)| {
                serde_json::json!({
                    "name": name,
                    "partitions": c.partitions,
                    "retention_ms": c.retention_ms,
                    "retention_bytes": c.retention_bytes,
                })
            })
            .collect();
        let text = serde_json::json!({"format": 1, "topics": list}).to_string();
        let tmp = self.path.with_extension("json.tmp");
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| format!("saving {}: {e}", self.path.display()))
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
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_eu-west").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "ü"] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_topic_name(&"x".repeat(201)).is_err());
    }
}
