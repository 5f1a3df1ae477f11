//! Record batches and records: the byte layout shared by producers, the log and readers.
//! Owns encoding, decoding and validation; knows nothing of storage or the network.

pub mod batch;
pub mod compression;
pub mod record;

pub use batch::{
    Batch, BatchBuilder, BatchHeader, BatchIter, BatchLimits, BatchOptions, ProducerFields,
    HEADER_PREFIX_LEN, V2_HEADER_LEN,
};
pub use compression::{Codec, Compressor, Decompressor};
pub use record::{Record, RecordIter, RecordWriter};

/// Why a batch or record was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the layout needs.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// A batch length below the header size.
    BadLength(usize),
    /// An unknown batch format version.
    BadMagic(u16),
    /// The CRC32C does not match the contents.
    BadCrc {
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the bytes.
        computed: u32,
    },
    /// The record count is zero, over the limit, or disagrees with the records.
    BadRecordCount(u32),
    /// A record's offset delta is not its position.
    BadOffsetDelta {
        /// The position of the record.
        expected: u32,
        /// The delta it carries.
        found: u32,
    },
    /// A record's fields overrun its declared length.
    BadRecord(&'static str),
    /// Attribute bits this broker does not know (an unknown codec, or reserved bits set).
    BadAttributes(u16),
    /// A compressed records region does not decode.
    Compression(&'static str),
    /// The records region's declared size is over the limit.
    DecompressedTooLarge {
        /// Size the header declares.
        declared: usize,
        /// The limit (`--max-frame-bytes`).
        max: usize,
    },
    /// The records region is not the size its header declares.
    DecompressedSize {
        /// Size the header declares.
        declared: usize,
        /// Size it came to.
        actual: usize,
    },
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated { needed, available } => {
                write!(f, "truncated: need {needed} bytes, have {available}")
            }
            Self::BadLength(len) => write!(f, "batch length {len} is below the header size"),
            Self::BadMagic(m) => write!(f, "unknown batch format version {m}"),
            Self::BadCrc { stored, computed } => {
                write!(
                    f,
                    "CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}"
                )
            }
            Self::BadRecordCount(n) => write!(f, "bad record count {n}"),
            Self::BadOffsetDelta { expected, found } => {
                write!(f, "record offset delta {found}, expected {expected}")
            }
            Self::BadRecord(what) => write!(f, "malformed record: {what}"),
            Self::BadAttributes(bits) => write!(f, "unknown batch attributes {bits:#06x}"),
            Self::Compression(what) => write!(f, "compressed records: {what}"),
            Self::DecompressedTooLarge { declared, max } => write!(
                f,
                "records declared as {declared} bytes decompressed, over the limit of {max}"
            ),
            Self::DecompressedSize { declared, actual } => write!(
                f,
                "records region is {actual} bytes, its header declares {declared}"
            ),
        }
    }
}

impl std::error::Error for RecordError {}
