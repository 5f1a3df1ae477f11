//! Per-batch compression of the records region (batch format v2): the codecs, a compressor
//! and a bounded decompressor that each reuse their buffers and zstd contexts.
//!
//! The whole records region of a batch is compressed as one unit: LZ4 as one raw block (no
//! frame, no size prefix: the batch header carries the uncompressed size), zstd as one
//! standard frame. Decompression never allocates more than the caller's bound, whatever the
//! input declares: a "bomb" fails with an error, not with an allocation.

use std::cell::RefCell;

use super::RecordError;

/// The codec of a batch's records region: bits 0..=2 of the header's `attributes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// Stored as is.
    #[default]
    None,
    /// One raw LZ4 block (lz4_flex).
    Lz4,
    /// One zstd frame.
    Zstd,
}

/// The attribute bits that hold the codec.
pub const CODEC_MASK: u16 = 0b111;

/// zstd level the producers and the broker compress at: zstd's own default, a good ratio at
/// several hundred MB/s per core.
const ZSTD_LEVEL: i32 = 3;

impl Codec {
    /// The codec named by `attributes`; `None` (the Rust one) for an unknown value.
    pub fn from_attributes(attributes: u16) -> Option<Self> {
        match attributes & CODEC_MASK {
            0 => Some(Self::None),
            1 => Some(Self::Lz4),
            2 => Some(Self::Zstd),
            _ => None,
        }
    }
    /// The attribute bits of this codec.
    pub fn attribute_bits(self) -> u16 {
        match self {
            Self::None => 0,
            Self::Lz4 => 1,
            Self::Zstd => 2,
        }
    }
    /// The codec's name as the CLI and the topic setting spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd),
            other => Err(format!(
                "unknown compression '{other}' (expected none, lz4 or zstd)"
            )),
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Compresses records regions, reusing its zstd context.
#[derive(Default)]
pub struct Compressor {
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    /// A compressor; the zstd context is made on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `input` compressed with `codec` to `out`.
    pub fn compress_into(
        &mut self,
        codec: Codec,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let start = out.len();
        match codec {
            Codec::None => out.extend_from_slice(input),
            Codec::Lz4 => {
                out.resize(
                    start + lz4_flex::block::get_maximum_output_size(input.len()),
                    0,
                );
                let n = lz4_flex::block::compress_into(input, &mut out[start..])
                    .map_err(|_| RecordError::Compression("lz4 output buffer too small"))?;
                out.truncate(start + n);
            }
            Codec::Zstd => {
                let zstd = match &mut self.zstd {
                    Some(z) => z,
                    slot => slot.insert(
                        zstd::bulk::Compressor::new(ZSTD_LEVEL)
                            .map_err(|_| RecordError::Compression("zstd context"))?,
                    ),
                };
                out.resize(start + zstd::zstd_safe::compress_bound(input.len()), 0);
                let n = zstd
                    .compress_to_buffer(input, &mut out[start..])
                    .map_err(|_| RecordError::Compression("zstd compression failed"))?;
                out.truncate(start + n);
            }
        }
        Ok(())
    }
}

/// Decompresses records regions into one reused buffer, never past a bound.
#[derive(Default)]
pub struct Decompressor {
    scratch: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    /// A decompressor with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decompresses `input` (codec `codec`), which must come to exactly `declared` bytes;
    /// `declared` over `max_bytes` is refused before anything is allocated. The result lives
    /// in this decompressor's buffer until the next call.
    pub fn decompress(
        &mut self,
        codec: Codec,
        input: &[u8],
        declared: usize,
        max_bytes: usize,
    ) -> Result<&[u8], RecordError> {
        if declared > max_bytes {
            return Err(RecordError::DecompressedTooLarge {
                declared,
                max: max_bytes,
            });
        }
        self.scratch.clear();
        self.scratch.resize(declared, 0);
        let n = match codec {
            Codec::None => {
                if input.len() != declared {
                    return Err(RecordError::DecompressedSize {
                        declared,
                        actual: input.len(),
                    });
                }
                self.scratch.copy_from_slice(input);
                declared
            }
            Codec::Lz4 => lz4_flex::block::decompress_into(input, &mut self.scratch)
                .map_err(|_| RecordError::Compression("lz4 block does not decode"))?,
            Codec::Zstd => {
                let zstd = match &mut self.zstd {
                    Some(z) => z,
                    slot => slot.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|_| RecordError::Compression("zstd context"))?,
                    ),
                };
                zstd.decompress_to_buffer(input, &mut self.scratch[..])
                    .map_err(|_| RecordError::Compression("zstd frame does not decode"))?
            }
        };
        if n != declared {
            return Err(RecordError::DecompressedSize {
                declared,
                actual: n,
            });
        }
        // A one-off huge batch must not pin its size for the shard's lifetime.
        const KEEP: usize = 4 << 20;
        let out_len = self.scratch.len();
        if self.scratch.capacity() > KEEP.max(out_len * 2) {
            self.scratch.shrink_to(out_len.max(KEEP));
        }
        Ok(&self.scratch[..n])
    }
}

thread_local! {
    /// The shard's decompressor: one executor per thread, so one buffer per shard.
    static SHARD_DECOMPRESSOR: RefCell<Decompressor> = RefCell::new(Decompressor::new());
    /// The shard's compressor (the topic setting that recompresses produced batches).
    static SHARD_COMPRESSOR: RefCell<Compressor> = RefCell::new(Compressor::new());
}

/// Runs `f` with this thread's (shard's) decompressor. `f` must not call back into it.
pub fn with_shard_decompressor<T>(f: impl FnOnce(&mut Decompressor) -> T) -> T {
    SHARD_DECOMPRESSOR.with(|d| match d.try_borrow_mut() {
        Ok(mut d) => f(&mut d),
        // Re-entered: fall back to a fresh one rather than panic.
        Err(_) => f(&mut Decompressor::new()),
    })
}

/// Runs `f` with this thread's (shard's) compressor.
pub fn with_shard_compressor<T>(f: impl FnOnce(&mut Compressor) -> T) -> T {
    SHARD_COMPRESSOR.with(|c| match c.try_borrow_mut() {
        Ok(mut c) => f(&mut c),
        Err(_) => f(&mut Compressor::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        let pattern = b"{\"event\":\"order-created\",\"id\":";
        (0..n).map(|i| pattern[i % pattern.len()]).collect()
    }

    #[test]
    fn every_codec_round_trips() {
        let input = text(10_000);
        let mut c = Compressor::new();
        let mut d = Decompressor::new();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let mut out = vec![7u8; 3];
            c.compress_into(codec, &input, &mut out).expect("compress");
            assert_eq!(&out[..3], &[7, 7, 7], "{codec} keeps what was there");
            if codec != Codec::None {
                assert!(out.len() < input.len() / 4, "{codec}: {} bytes", out.len());
            }
            let back = d
                .decompress(codec, &out[3..], input.len(), 1 << 20)
                .expect("decompress");
            assert_eq!(back, &input[..]);
        }
    }

    #[test]
    fn a_bomb_or_a_lie_is_refused() {
        let input = vec![0u8; 1 << 20];
        let mut c = Compressor::new();
        let mut d = Decompressor::new();
        for codec in [Codec::Lz4, Codec::Zstd] {
            let mut out = Vec::new();
            c.compress_into(codec, &input, &mut out).expect("compress");
            // Declares less than it holds: stops at the bound, no bigger allocation.
            assert!(d.decompress(codec, &out, 1000, 1 << 30).is_err(), "{codec}");
            // Declares more than the limit.
            assert!(matches!(
                d.decompress(codec, &out, input.len(), 4096),
                Err(RecordError::DecompressedTooLarge { .. })
            ));
            // Declares more than it holds.
            assert!(d.decompress(codec, &out, input.len() + 1, 1 << 30).is_err());
            // Garbage.
            assert!(d.decompress(codec, &[0xff; 64], 100, 1 << 30).is_err());
        }
    }
}
