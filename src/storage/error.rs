//! The storage layer's error type.

/// Why a storage operation failed. Every variant carries what a reader of the log needs.
#[derive(Debug, Clone)]
pub enum StorageError {
    /// An I/O call failed.
    Io {
        /// What we were doing, and on which file.
        context: String,
        /// The OS error number, when there was one.
        errno: Option<i32>,
        /// The error's text.
        message: String,
    },
    /// The log refuses writes after a fatal error (an fdatasync failure).
    ReadOnly(String),
    /// The requested offset is outside the stored range.
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// The earliest stored offset.
        log_start_offset: u64,
        /// The next offset to be written.
        high_watermark: u64,
    },
    /// A truncation was asked to cut inside a batch.
    NotABatchBoundary {
        /// The offset asked for.
        requested: u64,
        /// The first offset of the batch that holds it.
        batch_base: u64,
        /// The last offset of that batch.
        batch_last: u64,
    },
    /// Stored data failed its checksum and is not served.
    Corrupt(String),
    /// An idempotent producer's batch was refused (out of sequence, or fenced); nothing was
    /// appended.
    Sequence(crate::storage::producers::SequenceError),
}

impl StorageError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, err: &std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            errno: err.raw_os_error(),
            message: err.to_string(),
        }
    }

    /// Wraps a glommio error with context.
    pub fn glommio<T>(context: impl Into<String>, err: glommio::GlommioError<T>) -> Self {
        let io: std::io::Error = err.into();
        Self::io(context, &io)
    }

    /// True for an I/O error of the device itself (`EIO`): after one from a write or sync,
    /// writes it had accepted may be lost (see `storage::sync_health`).
    pub fn is_device_failure(&self) -> bool {
        matches!(
            self,
            Self::Io {
                errno: Some(libc::EIO),
                ..
            }
        )
    }

    /// True for "no space left on device".
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            Self::Io {
                errno: Some(libc::ENOSPC),
                ..
            }
        )
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io {
                context, message, ..
            } => write!(f, "{context}: {message}"),
            Self::ReadOnly(why) => write!(f, "log is read-only: {why}"),
            Self::OffsetOutOfRange {
                requested,
                log_start_offset,
                high_watermark,
            } => write!(
                f,
                "offset {requested} is out of range: the log holds [{log_start_offset}, {high_watermark})"
            ),
            Self::NotABatchBoundary {
                requested,
                batch_base,
                batch_last,
            } => write!(
                f,
                "offset {requested} is not a batch boundary: it is inside the batch \
                 {batch_base}..={batch_last}"
            ),
            Self::Corrupt(what) => write!(f, "corrupt data: {what}"),
            Self::Sequence(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for StorageError {}
