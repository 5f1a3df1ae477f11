//! Consumer-group offsets of one partition: for each group, the next offset it will read
//! (Kafka's committed offset), kept durably by the shard that owns the partition in a state
//! log next to the partition's segments (`consumer-offsets.state`).
//!
//! Owns the map and its record format; knows nothing of shards or the wire protocol.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

use crate::storage::{disk_trace, Durability, SnapshotSource, StateLog, StorageError, SyncHealth};

/// Longest consumer-group name accepted, in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 255;

/// The offsets file of the partition in `dir`.
pub fn offsets_path(dir: &Path) -> PathBuf {
    dir.join("consumer-offsets.state")
}

/// Checks a consumer-group name: 1..=255 bytes, no control characters.
pub fn validate_group(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_GROUP_NAME_BYTES {
        return Err(format!(
            "group name must be 1..={MAX_GROUP_NAME_BYTES} bytes, got {}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("group name may not hold control characters".into());
    }
    Ok(())
}

fn encode(group: &str, offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + group.len());
    out.extend_from_slice(&(group.len() as u16).to_le_bytes());
    out.extend_from_slice(group.as_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<(String, u64)> {
    let len = u16::from_le_bytes([*bytes.first()?, *bytes.get(1)?]) as usize;
    let name = bytes.get(2..2 + len)?;
    let offset = bytes.get(2 + len..2 + len + 8)?;
    if bytes.len() != 2 + len + 8 {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(offset);
    Some((
        String::from_utf8(name.to_vec()).ok()?,
        u64::from_le_bytes(b),
    ))
}

/// The committed offsets of one partition.
pub struct GroupOffsets {
    /// Every commit as appended, durable or not yet: what a compaction snapshot must hold.
    appended: RefCell<BTreeMap<String, u64>>,
    /// Commits that are durable, with the state-log sequence number that made them so: what
    /// readers see (a crash can not take back an offset a reader was shown).
    durable: RefCell<BTreeMap<String, (u64, u64)>>,
    store: Rc<StateLog>,
}

impl SnapshotSource for GroupOffsets {
    fn snapshot(&self) -> Vec<Vec<u8>> {
        self.appended
            .borrow()
            .iter()
            .map(|(g, &o)| encode(g, o))
            .collect()
    }
}

impl GroupOffsets {
    /// Opens (or creates) the offsets of the partition whose directory is `dir`.
    pub async fn open(
        dir: &Path,
        durability: Durability,
        health: Rc<SyncHealth>,
    ) -> Result<Rc<Self>, StorageError> {
        let path = offsets_path(dir);
        let (store, offsets) = match StateLog::open(&path, durability, Rc::clone(&health)).await? {
            Some((store, records)) => {
                let mut offsets = BTreeMap::new();
                for r in &records {
                    let (group, offset) = decode(r).ok_or_else(|| {
                        StorageError::Corrupt(format!("{}: malformed record", path.display()))
                    })?;
                    offsets.insert(group, offset);
                }
                (store, offsets)
            }
            None => (
                StateLog::create(&path, Vec::new(), durability, health).await?,
                BTreeMap::new(),
            ),
        };
        let durable = offsets.iter().map(|(g, &o)| (g.clone(), (o, 0))).collect();
        let this = Rc::new(Self {
            appended: RefCell::new(offsets),
            durable: RefCell::new(durable),
            store: Rc::clone(&store),
        });
        let weak: Weak<dyn SnapshotSource> =
            Rc::downgrade(&(Rc::clone(&this) as Rc<dyn SnapshotSource>));
        store.set_snapshot_source(weak);
        Ok(this)
    }

    /// The group's committed offset, once durable.
    pub fn get(&self, group: &str) -> Option<u64> {
        self.durable.borrow().get(group).map(|&(offset, _)| offset)
    }

    /// Whether a commit for `group` fits within `max_groups` groups (it already has an
    /// offset, or there is room for one more).
    pub fn admits(&self, group: &str, max_groups: usize) -> bool {
        let appended = self.appended.borrow();
        appended.contains_key(group) || appended.len() < max_groups
    }

    /// Commits `offset` for `group`; returns once it is durable, and only then do readers see
    /// it. Of two commits of one group, the later one wins whatever order they finish in.
    pub async fn commit(&self, group: &str, offset: u64) -> Result<(), StorageError> {
        self.appended.borrow_mut().insert(group.to_string(), offset);
        let seq = self.store.append(&encode(group, offset));
        self.store.durable(seq).await?;
        disk_trace::instant(|| disk_trace::Op::Note {
            text: format!(
                "group {} {group} {offset}",
                self.store
                    .path()
                    .parent()
                    .unwrap_or(Path::new(""))
                    .display()
            ),
        });
        let mut durable = self.durable.borrow_mut();
        match durable.get_mut(group) {
            Some(known) if known.1 > seq => {}
            Some(known) => *known = (offset, seq),
            None => {
                durable.insert(group.to_string(), (offset, seq));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let bytes = encode("billing", 42);
        assert_eq!(decode(&bytes), Some(("billing".to_string(), 42)));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        assert!(validate_group("").is_err());
        assert!(validate_group("a\nb").is_err());
    }
}
