//! Where things live: the stable hash behind keys → partitions and partitions → shards.

/// 64-bit FNV-1a of the topic name: the stable hash behind partition ownership.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The shard that owns `(topic, partition)` among `shards` shards. Consecutive partitions of
/// a topic land on consecutive shards.
pub fn owner_of(topic: &str, partition: u32, shards: usize) -> usize {
    (fnv1a_64(topic.as_bytes()).wrapping_add(u64::from(partition)) % shards as u64) as usize
}
