//! Event subscriptions: their definitions, filters, lock tokens and the per-partition delivery
//! state (ack floor, locks, delivery counts, delays) with its durable record format.
//!
//! Owns the rules of delivery; knows nothing of shards or sockets, and meets the wire protocol
//! only in [`wire`] (a definition's wire form). The broker
//! (`broker::subscriptions`) runs these rules on the shard that owns each partition, and the
//! bytes go to disk through `storage::StateLog`.

pub mod filter;
pub mod partition;
pub mod state;
pub mod wire;

pub use filter::Filter;
pub use partition::{Delivered, SubscriptionPartition};
pub use state::{DeadLetter, DeadLetterReason, LockError, SubState};

/// Lock duration when the subscription does not name one.
pub const DEFAULT_LOCK_DURATION_MS: u32 = 30_000;
/// Deliveries before dead-lettering when the subscription does not name a limit.
pub const DEFAULT_MAX_DELIVERIES: u32 = 10;
/// Shortest lock duration accepted.
pub const MIN_LOCK_DURATION_MS: u32 = 100;
/// Longest lock duration accepted (also the longest renewal).
pub const MAX_LOCK_DURATION_MS: u32 = 3_600_000;
/// Most deliveries a subscription may allow.
pub const MAX_MAX_DELIVERIES: u32 = 1_000;
/// Longest delay a release may ask for.
pub const MAX_RELEASE_DELAY_MS: u32 = 3_600_000;

/// Headers added to a dead-lettered event (CloudEvents extension attribute names: lower-case
/// letters and digits).
pub mod headers {
    /// Why: `max-deliveries`, `ttl-expired` or `rejected`.
    pub const REASON: &str = "deadletterreason";
    /// The subscription it was delivered through.
    pub const SUBSCRIPTION: &str = "deadlettersubscription";
    /// How many times it was delivered.
    pub const DELIVERY_COUNT: &str = "deliverycount";
    /// Where it came from: topic, partition and offset.
    pub const TOPIC: &str = "deadlettertopic";
    /// The original partition.
    pub const PARTITION: &str = "deadletterpartition";
    /// The original offset.
    pub const OFFSET: &str = "deadletteroffset";
    /// When it was dead-lettered, milliseconds since the Unix epoch.
    pub const TIME: &str = "deadlettertime";
}

/// Where a new subscription starts reading each partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPosition {
    /// The first stored event.
    Earliest,
    /// After the last event stored when the subscription is created.
    Latest,
}

impl StartPosition {
    /// The name used by the CLI and in topics.json.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
        }
    }
}

/// A subscription's definition: topic metadata, saved by shard 0 and copied to every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionConfig {
    /// Which events it delivers.
    pub filter: Filter,
    /// How long a received event stays locked.
    pub lock_duration_ms: u32,
    /// Deliveries before an event is dead-lettered.
    pub max_deliveries: u32,
    /// Events older than this (record time) are dead-lettered instead of delivered.
    pub ttl_ms: Option<u64>,
    /// Where rejected, expired and exhausted events go; `None`: dropped and counted.
    pub dead_letter_topic: Option<String>,
    /// Where it starts in each partition.
    pub start: StartPosition,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        Self {
            filter: Filter::default(),
            lock_duration_ms: DEFAULT_LOCK_DURATION_MS,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            ttl_ms: None,
            dead_letter_topic: None,
            start: StartPosition::Earliest,
        }
    }
}

impl SubscriptionConfig {
    /// Checks the settings against their limits, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_LOCK_DURATION_MS..=MAX_LOCK_DURATION_MS).contains(&self.lock_duration_ms) {
            return Err(format!(
                "lock duration must be {MIN_LOCK_DURATION_MS}..={MAX_LOCK_DURATION_MS} ms, got {}",
                self.lock_duration_ms
            ));
        }
        if !(1..=MAX_MAX_DELIVERIES).contains(&self.max_deliveries) {
            return Err(format!(
                "max deliveries must be 1..={MAX_MAX_DELIVERIES}, got {}",
                self.max_deliveries
            ));
        }
        if self.ttl_ms == Some(0) {
            return Err("ttl must be positive".into());
        }
        self.filter.validate()
    }

    /// True when an event with record time `timestamp_ms` has outlived the TTL at `now_ms`.
    pub fn expired(&self, timestamp_ms: i64, now_ms: i64) -> bool {
        match self.ttl_ms {
            Some(ttl) => {
                now_ms.saturating_sub(timestamp_ms) > i64::try_from(ttl).unwrap_or(i64::MAX)
            }
            None => false,
        }
    }
}

/// A lock token: which event of which partition, and which delivery of it (a random nonce,
/// so that a token of an earlier delivery never settles a later one). Printed as
/// `PARTITION-OFFSET-NONCE` (decimal, decimal, 16 hex digits), so that any shard can route
/// it to the partition's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LockToken {
    /// The partition.
    pub partition: u32,
    /// The event's offset.
    pub offset: u64,
    /// Names the delivery.
    pub nonce: u64,
}

impl std::fmt::Display for LockToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{:016x}", self.partition, self.offset, self.nonce)
    }
}

impl std::str::FromStr for LockToken {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("'{text}' is not a lock token (PARTITION-OFFSET-NONCE)");
        let mut parts = text.split('-');
        let (Some(p), Some(o), Some(n), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if n.len() != 16 {
            return Err(bad());
        }
        Ok(Self {
            partition: p.parse().map_err(|_| bad())?,
            offset: o.parse().map_err(|_| bad())?,
            nonce: u64::from_str_radix(n, 16).map_err(|_| bad())?,
        })
    }
}

/// A small non-cryptographic random generator (xorshift64*), one per shard: lock nonces need
/// to be unpredictable enough not to collide, not secret.
#[derive(Debug)]
pub struct Nonces {
    state: u64,
}

impl Nonces {
    /// A generator seeded from the kernel's random source (the clock if that fails).
    pub fn new(salt: u64) -> Self {
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most `seed.len()` bytes into `seed`.
        let got = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let mut state = u64::from_le_bytes(seed);
        if got != 8 {
            state = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        }
        state ^= salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Self { state: state | 1 }
    }

    /// The next nonce (never 0).
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_junk() {
        let t = LockToken {
            partition: 3,
            offset: 123_456,
            nonce: 0xdead_beef_0000_0001,
        };
        let text = t.to_string();
        assert_eq!(text, "3-123456-deadbeef00000001");
        assert_eq!(text.parse::<LockToken>(), Ok(t));
        for junk in [
            "",
            "1-2",
            "1-2-3",
            "a-2-deadbeef00000001",
            "1-2-deadbeef00000001-4",
        ] {
            assert!(junk.parse::<LockToken>().is_err(), "{junk}");
        }
    }

    #[test]
    fn nonces_differ() {
        let mut n = Nonces::new(1);
        let a = n.next_u64();
        let b = n.next_u64();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }
}
