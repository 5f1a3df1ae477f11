//! A partition's checkpoint: how far its log is known to be durable, where it starts, and
//! whether the broker shut down cleanly.
//!
//! Recovery trusts it in three ways. Bytes below `durable_end` of the active segment were
//! acknowledged, so a checksum failure there is corruption to report, never a torn tail to
//! cut. With `clean` set, the log starts at the recorded end without a scan. Segments wholly
//! below `log_start` are what a retention pass cut short by a crash left: retention saves the
//! checkpoint before it unlinks anything, and recovery finishes the removal (a power cut may
//! keep any subset of the unlinks, which would otherwise leave a gap in the offsets). The file
//! is replaced atomically (temporary file, fsync, rename); a missing or damaged checkpoint only
//! costs a longer scan.
//!
//! Format: magic `CBCKPT02`, then `segment_base`, `durable_end`, `next_offset`, `log_start`
//! (u64 little-endian), `clean` (u8) and a CRC32C of everything before it. Version 1
//! (`CBCKPT01`, without `log_start`) is still read, as a log start of 0.

use std::path::{Path, PathBuf};

const FILE_NAME: &str = "checkpoint";
const MAGIC: &[u8; 8] = b"CBCKPT02";
const LEN: usize = 8 + 8 + 8 + 8 + 8 + 1 + 4;
/// Version 1, written before the log start was recorded.
const MAGIC_V1: &[u8; 8] = b"CBCKPT01";
const LEN_V1: usize = 8 + 8 + 8 + 8 + 1 + 4;

/// What a checkpoint records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Base offset of the active segment when it was written.
    pub segment_base: u64,
    /// Bytes of that segment known durable (acknowledged).
    pub durable_end: u64,
    /// Next offset after the durable bytes.
    pub next_offset: u64,
    /// First offset of the log: segments wholly below it are removed at open.
    pub log_start: u64,
    /// Written by a clean shutdown, with nothing appended after.
    pub clean: bool,
}

/// The checkpoint file of the partition in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.segment_base.to_le_bytes());
        out.extend_from_slice(&self.durable_end.to_le_bytes());
        out.extend_from_slice(&self.next_offset.to_le_bytes());
        out.extend_from_slice(&self.log_start.to_le_bytes());
        out.push(u8::from(self.clean));
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let v1 = match (bytes.len(), bytes.get(..8)?) {
            (LEN, magic) if magic == MAGIC => false,
            (LEN_V1, magic) if magic == MAGIC_V1 => true,
            _ => return None,
        };
        let len = bytes.len();
        let crc = u32::from_le_bytes(bytes[len - 4..].try_into().ok()?);
        if crc32c::crc32c(&bytes[..len - 4]) != crc {
            return None;
        }
        let u64_at = |at: usize| bytes[at..at + 8].try_into().ok().map(u64::from_le_bytes);
        Some(Self {
            segment_base: u64_at(8)?,
            durable_end: u64_at(16)?,
            next_offset: u64_at(24)?,
            log_start: if v1 { 0 } else { u64_at(32)? },
            clean: bytes[len - 5] == 1,
        })
    }

    /// Reads the checkpoint in `dir`; `None` if it is missing or damaged.
    pub fn load(dir: &Path) -> Option<Self> {
        std::fs::read(path(dir)).ok().and_then(|b| Self::decode(&b))
    }

    /// Replaces the checkpoint in `dir` atomically and durably (blocking I/O).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        super::atomic_file::replace(&path(dir), &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let c = Checkpoint {
            segment_base: 7,
            durable_end: 4096,
            next_offset: 99,
            log_start: 3,
            clean: true,
        };
        let mut bytes = c.encode();
        assert_eq!(Checkpoint::decode(&bytes), Some(c));
        bytes[10] ^= 1;
        assert_eq!(Checkpoint::decode(&bytes), None);
        assert_eq!(Checkpoint::decode(&bytes[..5]), None);
    }

    #[test]
    fn reads_version_1_as_a_log_start_of_0() {
        let mut v1 = MAGIC_V1.to_vec();
        for field in [7u64, 4096, 99] {
            v1.extend_from_slice(&field.to_le_bytes());
        }
        v1.push(1);
        v1.extend_from_slice(&crc32c::crc32c(&v1).to_le_bytes());
        let c = Checkpoint::decode(&v1).expect("a version 1 checkpoint");
        assert_eq!(
            (c.segment_base, c.durable_end, c.next_offset),
            (7, 4096, 99)
        );
        assert_eq!((c.log_start, c.clean), (0, true));
    }

    proptest::proptest! {
        /// Any checkpoint encodes to `LEN` bytes and decodes back; any single bit flip, cut
        /// or extra byte is refused.
        #[test]
        fn encoding_round_trips_and_any_damage_is_refused(
            segment_base: u64,
            durable_end: u64,
            next_offset: u64,
            log_start: u64,
            clean: bool,
            at in 0..LEN,
            bit in 0u8..8,
            cut in 0..LEN,
        ) {
            let c = Checkpoint { segment_base, durable_end, next_offset, log_start, clean };
            let bytes = c.encode();
            proptest::prop_assert_eq!(bytes.len(), LEN);
            proptest::prop_assert_eq!(Checkpoint::decode(&bytes), Some(c));
            let mut damaged = bytes.clone();
            damaged[at] ^= 1 << bit;
            proptest::prop_assert_eq!(Checkpoint::decode(&damaged), None);
            proptest::prop_assert_eq!(Checkpoint::decode(&bytes[..cut]), None);
            let mut longer = bytes.clone();
            longer.push(0);
            proptest::prop_assert_eq!(Checkpoint::decode(&longer), None);
        }

        /// Decoding arbitrary bytes never panics.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2 * LEN),
        ) {
            let _ = Checkpoint::decode(&bytes);
        }
    }
}
