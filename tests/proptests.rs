//! Property tests of the byte layouts: records, record batches, frames and checkpoints
//! round-trip, and damage is refused. (The checkpoint's encoding is also checked beside the
//! code, in src/storage/checkpoint.rs.)

use std::pin::Pin;
use std::task::{Context, Poll};

use corebus::protocol::frame::{FrameError, FrameReader};
use corebus::record::batch::{crc_matches, stamp};
use corebus::record::{
    Batch, BatchBuilder, BatchIter, BatchLimits, BatchOptions, Codec, Decompressor, RecordError,
    RecordIter, RecordWriter,
};
use corebus::storage::checkpoint::Checkpoint;
use futures_lite::io::{AsyncRead, Cursor};
use proptest::collection::vec;
use proptest::prelude::*;

/// The owned fields of one record.
#[derive(Clone, Debug)]
struct Rec {
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    id: String,
    source: String,
    event_type: String,
    subject: String,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Rec {
    fn with_writer<T>(&self, f: impl FnOnce(&RecordWriter<'_>) -> T) -> T {
        let headers: Vec<(&[u8], &[u8])> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        f(&RecordWriter {
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_deref(),
            value: &self.value,
            id: &self.id,
            source: &self.source,
            event_type: &self.event_type,
            subject: &self.subject,
            headers: &headers,
        })
    }

    /// Checks a decoded record against these fields.
    fn assert_decoded(&self, r: &corebus::record::Record<'_>, offset_delta: u32) {
        assert_eq!(r.offset_delta, offset_delta);
        assert_eq!(r.timestamp_ms, self.timestamp_ms);
        assert_eq!(r.key, self.key.as_deref());
        assert_eq!(r.value, self.value.as_slice());
        assert_eq!(r.id, self.id.as_bytes());
        assert_eq!(r.source, self.source.as_bytes());
        assert_eq!(r.event_type, self.event_type.as_bytes());
        assert_eq!(r.subject, self.subject.as_bytes());
        let headers: Vec<(Vec<u8>, Vec<u8>)> =
            r.headers().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(headers, self.headers);
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

fn record() -> impl Strategy<Value = Rec> {
    (
        any::<i64>(),
        proptest::option::of(bytes(40)),
        bytes(300),
        ".{0,12}",
        ".{0,12}",
        ".{0,24}",
        ".{0,12}",
        vec((bytes(16), bytes(40)), 0..5),
    )
        .prop_map(
            |(timestamp_ms, key, value, id, source, event_type, subject, headers)| Rec {
                timestamp_ms,
                key,
                value,
                id,
                source,
                event_type,
                subject,
                headers,
            },
        )
}

fn build(records: &[Rec]) -> Vec<u8> {
    build_with(records, Codec::None)
}

fn build_with(records: &[Rec], codec: Codec) -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    for r in records {
        r.with_writer(|w| builder.push(w));
    }
    builder.finish_with(BatchOptions {
        codec,
        producer: None,
    })
}

fn codec() -> impl Strategy<Value = Codec> {
    prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd)]
}

fn limits(max_records: u32) -> BatchLimits {
    BatchLimits {
        max_records,
        max_records_bytes: 64 << 20,
    }
}

/// First byte covered by a batch's CRC (after base offset, length, epoch, time and the CRC).
const CRC_START: usize = 28;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `RecordWriter` → `RecordIter` gives back every field and header, and `encoded_len`
    /// is the encoded size.
    #[test]
    fn records_round_trip(records in vec(record(), 1..8)) {
        let mut body = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let before = body.len();
            r.with_writer(|w| {
                w.encode_into(i as u32, &mut body);
                prop_assert_eq!(body.len() - before, w.encoded_len());
                Ok(())
            })?;
        }
        let decoded: Vec<_> = RecordIter::new(&body).collect();
        prop_assert_eq!(decoded.len(), records.len());
        for (i, (r, d)) in records.iter().zip(&decoded).enumerate() {
            let d = d.as_ref().expect("decodes");
            r.assert_decoded(d, i as u32);
        }
    }

    /// Any cut of an encoded record is an error, never a panic or a shorter record.
    #[test]
    fn truncated_records_are_refused(r in record(), cut in any::<prop::sample::Index>()) {
        let mut body = Vec::new();
        r.with_writer(|w| w.encode_into(0, &mut body));
        let cut = cut.index(body.len()); // 0..len: always short
        if cut > 0 {
            let first = RecordIter::new(&body[..cut]).next().expect("an item");
            prop_assert!(first.is_err());
        }
    }

    /// `BatchBuilder::finish` → `Batch::validate` accepts the batch with its record count,
    /// timestamps and records; broker stamping keeps it valid.
    #[test]
    fn batches_round_trip(
        records in vec(record(), 1..20),
        base in 0u64..(1 << 50),
        append_time in any::<i64>(),
        codec in codec(),
    ) {
        let mut bytes = build_with(&records, codec);
        let n = records.len() as u32;
        let mut decompressor = Decompressor::new();
        {
            let batch = Batch::validate(&bytes, limits(n), &mut decompressor).expect("valid");
            let h = batch.header();
            prop_assert_eq!(h.batch_len() as usize, bytes.len());
            prop_assert_eq!(h.record_count(), n);
            prop_assert_eq!(h.last_offset_delta(), n - 1);
            prop_assert_eq!(h.first_timestamp_ms(), records[0].timestamp_ms);
            let max = records.iter().map(|r| r.timestamp_ms).max().expect("records");
            prop_assert_eq!(h.max_timestamp_ms(), max);
            prop_assert_eq!(h.magic(), 2);
            // Data that does not shrink is stored uncompressed.
            prop_assert!(h.codec() == Some(codec) || h.codec() == Some(Codec::None));
            let decoded = batch.records(&mut decompressor).expect("records");
            for (i, (r, d)) in records.iter().zip(decoded).enumerate() {
                r.assert_decoded(&d.expect("decodes"), i as u32);
            }
        }
        let over_limit = matches!(
            Batch::validate(&bytes, limits(n - 1), &mut decompressor),
            Err(RecordError::BadRecordCount(c)) if c == n
        );
        prop_assert!(over_limit, "a batch over max_records was accepted");
        stamp(&mut bytes[..64], base, append_time);
        let batch = Batch::validate(&bytes, limits(n), &mut decompressor).expect("valid after stamping");
        prop_assert_eq!(batch.header().base_offset(), base);
        prop_assert_eq!(batch.header().last_offset(), base + u64::from(n) - 1);
        prop_assert_eq!(batch.header().append_time_ms(), append_time);
        prop_assert!(crc_matches(&bytes));
    }

    /// Any single bit flip in the CRC-covered range (magic to the end) is refused, by
    /// `Batch::validate`, by `crc_matches` and by `BatchIter`.
    #[test]
    fn any_bit_flip_in_the_crc_range_is_refused(
        records in vec(record(), 1..6),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        codec in codec(),
    ) {
        let mut bytes = build_with(&records, codec);
        let byte = CRC_START + at.index(bytes.len() - CRC_START);
        bytes[byte] ^= 1 << bit;
        let refused = Batch::validate(&bytes, limits(u32::MAX), &mut Decompressor::new()).is_err();
        prop_assert!(refused, "flip at byte {}", byte);
        prop_assert!(!crc_matches(&bytes));
        prop_assert!(BatchIter::new(&bytes).next().expect("an item").is_err());
    }

    /// Concatenated batches come back one by one from `BatchIter`, each intact.
    #[test]
    fn batch_iter_splits_concatenated_batches(batches in vec(vec(record(), 1..4), 0..6)) {
        let built: Vec<Vec<u8>> = batches.iter().map(|b| build(b)).collect();
        let all = built.concat();
        let read: Vec<Vec<u8>> = BatchIter::new(&all)
            .map(|b| b.expect("intact").as_bytes().to_vec())
            .collect();
        prop_assert_eq!(read, built);
    }
}

/// A reader that hands out the stream in the given read sizes (cycled), like a socket.
struct Chunked {
    inner: Cursor<Vec<u8>>,
    sizes: Vec<usize>,
    next: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let size = self.sizes[self.next % self.sizes.len()];
        self.next += 1;
        let n = buf.len().min(size);
        Pin::new(&mut self.inner).poll_read(cx, &mut buf[..n])
    }
}

fn wire(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

const MAX_FRAME: usize = 2048;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any concatenation of frames, read in any chunk sizes, comes back as the same frames,
    /// then a clean end.
    #[test]
    fn frames_split_back_whatever_the_read_sizes(
        payloads in vec(bytes(MAX_FRAME), 0..12),
        sizes in vec(1usize..600, 1..16),
    ) {
        let reader = Chunked { inner: Cursor::new(wire(&payloads)), sizes, next: 0 };
        let mut frames = FrameReader::new(reader, MAX_FRAME);
        let got = futures_lite::future::block_on(async {
            let mut got = Vec::new();
            while let Some(frame) = frames.next_frame().await.expect("valid stream") {
                got.push(frame.to_vec());
            }
            got
        });
        prop_assert!(frames.partial_frame_age().is_none());
        prop_assert_eq!(got.len(), payloads.len());
        for (frame, payload) in got.iter().zip(&payloads) {
            prop_assert_eq!(&frame[..4], &(payload.len() as u32).to_le_bytes()[..]);
            prop_assert_eq!(&frame[4..], payload.as_slice());
        }
    }

    /// A stream cut inside a frame gives the whole frames before the cut, then
    /// `UnexpectedEof`; a length prefix over the maximum gives `TooLarge` before its body.
    #[test]
    fn cut_and_oversized_streams_are_refused(
        payloads in vec(bytes(300), 1..6),
        cut in any::<prop::sample::Index>(),
        sizes in vec(1usize..100, 1..8),
        too_big in (MAX_FRAME as u32 + 1)..=u32::MAX,
    ) {
        let full = wire(&payloads);
        let cut = cut.index(full.len()); // strictly inside the stream
        let boundaries: Vec<usize> = payloads
            .iter()
            .scan(0, |end, p| { *end += 4 + p.len(); Some(*end) })
            .collect();
        let whole = boundaries.iter().filter(|&&b| b <= cut).count();
        let reader = Chunked { inner: Cursor::new(full[..cut].to_vec()), sizes: sizes.clone(), next: 0 };
        let mut frames = FrameReader::new(reader, MAX_FRAME);
        let (count, end) = futures_lite::future::block_on(async {
            let mut count = 0;
            loop {
                match frames.next_frame().await {
                    Ok(Some(_)) => count += 1,
                    other => return (count, other),
                }
            }
        });
        prop_assert_eq!(count, whole);
        let clean_end = boundaries.contains(&cut) || cut == 0;
        let ok = if clean_end {
            matches!(end, Ok(None))
        } else {
            matches!(end, Err(FrameError::UnexpectedEof))
        };
        prop_assert!(ok, "cut at {}: {:?}", cut, end);

        let mut stream = wire(&payloads[..1]);
        stream.extend_from_slice(&too_big.to_le_bytes());
        stream.extend_from_slice(&[0u8; 16]);
        let reader = Chunked { inner: Cursor::new(stream), sizes, next: 0 };
        let mut frames = FrameReader::new(reader, MAX_FRAME);
        let second = futures_lite::future::block_on(async {
            frames.next_frame().await.expect("first frame").expect("present");
            frames.next_frame().await
        });
        let refused = matches!(
            second,
            Err(FrameError::TooLarge { len, max: MAX_FRAME }) if len == too_big as usize
        );
        prop_assert!(refused, "an oversized prefix was not refused: {:?}", second);
    }
}

proptest! {
    // Each case writes a file with fsync: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A checkpoint saved to its file loads back equal; any single bit flip in the file, or a
    /// cut, makes it refused (recovery then scans instead of trusting it).
    #[test]
    fn checkpoint_files_round_trip_and_refuse_damage(
        segment_base in any::<u64>(),
        durable_end in any::<u64>(),
        next_offset in any::<u64>(),
        log_start in any::<u64>(),
        clean in any::<bool>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("proptest-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let c = Checkpoint { segment_base, durable_end, next_offset, log_start, clean };
        c.save(&dir).expect("save");
        prop_assert_eq!(Checkpoint::load(&dir), Some(c));
        let path = corebus::storage::checkpoint::path(&dir);
        let bytes = std::fs::read(&path).expect("read");
        let mut damaged = bytes.clone();
        let byte = at.index(damaged.len());
        damaged[byte] ^= 1 << bit;
        std::fs::write(&path, &damaged).expect("write");
        prop_assert_eq!(Checkpoint::load(&dir), None, "flip at byte {}", byte);
        std::fs::write(&path, &bytes[..byte]).expect("write");
        prop_assert_eq!(Checkpoint::load(&dir), None, "cut at byte {}", byte);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
