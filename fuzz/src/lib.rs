//! Helpers shared by the corebus fuzz targets: walking every field of verified messages, a
//! glommio executor kept for the whole fuzzing process, scratch directories on the real disk
//! and a quiet stderr for the noisy storage code.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use corebus::protocol::message::parse_response;
use corebus::protocol::wire;
use corebus::record::{Batch, BatchIter, BatchLimits, Decompressor};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};

/// Reads every field of a verified request, iterating every vector, so that every generated
/// accessor behind the verifier runs. Returns a number derived from what was read so that
/// nothing is optimised away.
pub fn walk_request(request: &wire::Request<'_>) -> u64 {
    let mut sum = request.correlation_id();
    sum = sum.wrapping_add(u64::from(request.body_type().0));
    // `body()` is only safe to follow for a known tag: the verifier skips the body of an
    // unknown union tag (and of NONE), so its offset may point anywhere. corebus itself only
    // reads bodies through `body_as_*`, which check the tag first.
    let known = (wire::RequestBody::ENUM_MIN..=wire::RequestBody::ENUM_MAX)
        .contains(&request.body_type().0)
        && request.body_type() != wire::RequestBody::NONE;
    if known {
        if let Some(table) = request.body() {
            sum = sum.wrapping_add(table.buf().len() as u64);
        }
    }
    // Every union accessor, whatever the tag says: all but one must answer `None`.
    let mut bodies = 0;
    if let Some(r) = request.body_as_create_topic_request() {
        bodies += 1;
        sum = sum.wrapping_add(r.name().len() as u64);
        sum = sum.wrapping_add(u64::from(r.partitions()));
        sum = sum.wrapping_add(r.retention_ms() as u64);
        sum = sum.wrapping_add(r.retention_bytes() as u64);
    }
    if let Some(r) = request.body_as_delete_topic_request() {
        bodies += 1;
        sum = sum.wrapping_add(r.name().len() as u64);
    }
    if request.body_as_list_topics_request().is_some() {
        bodies += 1;
    }
    if let Some(r) = request.body_as_metadata_request() {
        bodies += 1;
        for name in r.topics().iter().flatten() {
            sum = sum.wrapping_add(name.len() as u64);
        }
    }
    if let Some(r) = request.body_as_produce_request() {
        bodies += 1;
        sum = sum.wrapping_add(r.topic().len() as u64);
        for part in r.partitions().iter().flatten() {
            sum = sum.wrapping_add(u64::from(part.partition()));
            let batches = part.batches().map(|v| v.bytes()).unwrap_or_default();
            for (i, b) in part.batches().iter().flatten().enumerate() {
                assert_eq!(b, batches[i]);
            }
            sum = sum.wrapping_add(walk_batches(batches));
        }
    }
    if let Some(r) = request.body_as_fetch_request() {
        bodies += 1;
        sum = sum.wrapping_add(r.topic().len() as u64);
        sum = sum.wrapping_add(u64::from(r.partition()));
        sum = sum.wrapping_add(r.offset());
        sum = sum.wrapping_add(u64::from(r.max_bytes()));
        sum = sum.wrapping_add(u64::from(r.max_wait_ms()));
    }
    assert!(bodies <= 1, "more than one union accessor answered");
    // The generated Debug impl walks the whole table once more.
    sum.wrapping_add(format!("{request:?}").len() as u64)
}

/// Reads every field of a verified response (broker replies must always verify).
pub fn walk_response(response: &wire::Response<'_>) -> u64 {
    let mut sum = response.correlation_id();
    if let Some(e) = response.error() {
        sum = sum.wrapping_add(u64::from(e.code().0));
        sum = sum.wrapping_add(e.message().map_or(0, str::len) as u64);
    }
    if let Some(r) = response.body_as_produce_response() {
        for p in r.partitions().iter().flatten() {
            sum = sum
                .wrapping_add(u64::from(p.partition()))
                .wrapping_add(p.base_offset())
                .wrapping_add(p.last_offset());
            if let Some(e) = p.error() {
                sum = sum.wrapping_add(u64::from(e.code().0));
            }
        }
    }
    if let Some(r) = response.body_as_fetch_response() {
        sum = sum
            .wrapping_add(r.high_watermark())
            .wrapping_add(r.log_start_offset());
        let batches = r.batches().map(|v| v.bytes()).unwrap_or_default();
        for batch in BatchIter::new(batches) {
            let batch = batch.expect("the broker served a batch that fails its CRC");
            sum = sum.wrapping_add(batch.header().base_offset());
        }
    }
    if let Some(r) = response.body_as_metadata_response() {
        for s in r.shards().iter().flatten() {
            sum = sum.wrapping_add(u64::from(s.shard()) + u64::from(s.port()));
        }
        for t in r.topics().iter().flatten() {
            sum = sum.wrapping_add(t.name().map_or(0, str::len) as u64);
            for p in t.partitions().iter().flatten() {
                sum = sum.wrapping_add(u64::from(p.partition()) + u64::from(p.shard()));
            }
        }
    }
    if let Some(r) = response.body_as_list_topics_response() {
        for t in r.topics().iter().flatten() {
            sum = sum.wrapping_add(u64::from(t.partitions()));
        }
    }
    sum.wrapping_add(format!("{response:?}").len() as u64)
}

/// Checks a whole response frame: it verifies, and its length prefix is its length.
pub fn check_response_frame(frame: &[u8]) -> u64 {
    assert!(frame.len() >= 4, "a reply frame shorter than its prefix");
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    assert_eq!(len + 4, frame.len(), "a reply's length prefix lies");
    let response = parse_response(frame).expect("a reply built by corebus failed verification");
    walk_response(&response)
}

/// The produce path's limits as the broker's defaults set them (16 MiB decompressed).
pub const FUZZ_LIMITS: BatchLimits = BatchLimits {
    max_records: 100_000,
    max_records_bytes: 16 << 20,
};

/// Validates the concatenated batches of a produce the way the broker does, reading every
/// record of each valid one.
pub fn walk_batches(mut bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    while !bytes.is_empty() {
        let Ok(batch) = Batch::validate(bytes, FUZZ_LIMITS, &mut Decompressor::new()) else {
            break;
        };
        sum = sum.wrapping_add(walk_batch(&batch));
        bytes = &bytes[batch.as_bytes().len()..];
    }
    sum
}

/// Reads every record and header of a batch that passed `Batch::validate`; every record must
/// decode, since validation walked them.
pub fn walk_batch(batch: &Batch<'_>) -> u64 {
    let h = batch.header();
    let mut sum = h
        .base_offset()
        .wrapping_add(u64::from(h.batch_len()))
        .wrapping_add(u64::from(h.leader_epoch()))
        .wrapping_add(h.append_time_ms() as u64)
        .wrapping_add(u64::from(h.crc()))
        .wrapping_add(u64::from(h.magic()))
        .wrapping_add(u64::from(h.attributes()))
        .wrapping_add(h.first_timestamp_ms() as u64)
        .wrapping_add(h.max_timestamp_ms() as u64);
    let mut count = 0u32;
    let mut decompressor = Decompressor::new();
    let records = batch
        .records(&mut decompressor)
        .expect("a validated batch failed to decompress");
    for record in records {
        let record = record.expect("a record of a validated batch failed to decode");
        assert_eq!(record.offset_delta, count);
        count += 1;
        sum = sum
            .wrapping_add(record.timestamp_ms as u64)
            .wrapping_add(record.key.map_or(0, <[u8]>::len) as u64)
            .wrapping_add(record.value.len() as u64)
            .wrapping_add((record.id.len() + record.source.len()) as u64)
            .wrapping_add((record.event_type.len() + record.subject.len()) as u64);
        for (k, v) in record.headers() {
            sum = sum.wrapping_add((k.len() + v.len()) as u64);
        }
    }
    assert_eq!(count, h.record_count(), "record count of a validated batch");
    assert_eq!(count - 1, h.last_offset_delta());
    sum
}

thread_local! {
    static EXECUTOR: LocalExecutor = LocalExecutorBuilder::new(Placement::Unbound)
        .name("corebus-fuzz")
        .io_memory(16 << 20)
        .make()
        .expect("starting a glommio executor");
}

/// Runs `fut` on this thread's glommio executor, which lives as long as the process: tasks
/// and files of earlier runs stay with it, and starting it is paid once.
pub fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
    EXECUTOR.with(|ex| ex.run(fut))
}

/// A scratch directory for this process on the disk that holds the fuzz crate (not a tmpfs:
/// glommio's direct I/O needs a real file system), emptied at first use. Directories left by
/// earlier processes that are gone are removed.
pub fn scratch_dir(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("scratch");
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let pid = file_name
            .rsplit_once('-')
            .and_then(|(_, p)| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

static SAVED_STDERR: AtomicI32 = AtomicI32::new(-1);
static DEV_NULL: AtomicI32 = AtomicI32::new(-1);
static QUIET_SETUP: Once = Once::new();

/// Runs `f` with stderr sent to /dev/null: the storage code reports every torn tail and
/// corruption it meets, which would bury libFuzzer's own output. A panic puts stderr back
/// before its message is printed. Set `COREBUS_FUZZ_VERBOSE=1` to keep the messages.
pub fn quietly<T>(f: impl FnOnce() -> T) -> T {
    QUIET_SETUP.call_once(|| {
        if std::env::var_os("COREBUS_FUZZ_VERBOSE").is_some() {
            return;
        }
        // SAFETY: plain descriptor calls on descriptors this process owns.
        let (saved, null) = unsafe {
            (
                libc::dup(2),
                libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY),
            )
        };
        if saved < 0 || null < 0 {
            return;
        }
        SAVED_STDERR.store(saved, Ordering::SeqCst);
        DEV_NULL.store(null, Ordering::SeqCst);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_stderr();
            previous(info);
        }));
    });
    let null = DEV_NULL.load(Ordering::SeqCst);
    if null >= 0 {
        // SAFETY: see above.
        unsafe { libc::dup2(null, 2) };
    }
    let out = f();
    restore_stderr();
    out
}

fn restore_stderr() {
    let saved = SAVED_STDERR.load(Ordering::SeqCst);
    if saved >= 0 {
        // SAFETY: `saved` is a duplicate of the original stderr, kept open for good.
        unsafe { libc::dup2(saved, 2) };
    }
}
