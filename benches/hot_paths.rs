//! Micro-benchmarks of the hot paths: CRC32C and validation of a batch, encoding and verifying
//! a produce request, building a fetch reply, appending through the partition log (tail
//! buffer and DMA copy, durability `none`), and serving a fetch from the in-memory tail.
//!
//! `cargo bench --bench hot_paths`; the log benchmarks run inside a glommio executor on a
//! data directory under target/.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};

use corebus::client::requests;
use corebus::protocol::message::parse_request;
use corebus::record::{
    Batch, BatchBuilder, BatchLimits, BatchOptions, Codec, Decompressor, RecordWriter,
};
use corebus::storage::{Durability, LogConfig, PartitionLog};

fn one_mib_batch() -> Vec<u8> {
    let value = vec![b'x'; 1024];
    let mut builder = BatchBuilder::with_capacity(1 << 20);
    while builder.size_bytes() < (1 << 20) - 1200 {
        builder.push(&RecordWriter {
            timestamp_ms: 1,
            value: &value,
            ..RecordWriter::default()
        });
    }
    builder.finish()
}

fn batches(c: &mut Criterion) {
    let batch = one_mib_batch();
    let mut group = c.benchmark_group("batch_1MiB_of_1KiB_records");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group.bench_function("crc32c", |b| b.iter(|| crc32c::crc32c(&batch)));
    let mut decompressor = Decompressor::new();
    group.bench_function("validate", |b| {
        b.iter(|| Batch::validate(&batch, LIMITS, &mut decompressor).map(|b| b.as_bytes().len()))
    });
    group.finish();
}

const LIMITS: BatchLimits = BatchLimits {
    max_records: 100_000,
    max_records_bytes: 64 << 20,
};

/// About 1 MiB of JSON events (as loadgen's `--payload json` makes them), built and checked
/// with each codec: the cost the producer and the broker pay per batch.
fn compression(c: &mut Criterion) {
    let events: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                "{{\"id\":\"ord-{i:08}\",\"type\":\"order.created\",\"customer\":\"c-{}\",\"amount\":{}.{:02},\"currency\":\"EUR\",\"items\":[{{\"sku\":\"sku-{}\",\"qty\":{}}}],\"status\":\"created\",\"region\":\"eu-west-1\",\"note\":\"{}\"}}",
                i * 7919 % 10_000,
                i * 31 % 500,
                i % 100,
                i * 13 % 2000,
                1 + i % 5,
                "x".repeat(700 + i % 100)
            )
        })
        .collect();
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
        let mut builder = BatchBuilder::with_capacity(2 << 20);
        let mut build = || {
            for e in &events {
                builder.push(&RecordWriter {
                    timestamp_ms: 1,
                    value: e.as_bytes(),
                    ..RecordWriter::default()
                });
            }
            builder.finish_with(BatchOptions {
                codec,
                producer: None,
            })
        };
        let built = build();
        let raw: usize = events.iter().map(String::len).sum();
        let mut group = c.benchmark_group(format!("json_1000_events_{codec}"));
        group.throughput(Throughput::Bytes(raw as u64));
        group.bench_function("build", |b| b.iter(&mut build));
        let mut decompressor = Decompressor::new();
        group.bench_function("validate", |b| {
            b.iter(|| {
                Batch::validate(&built, LIMITS, &mut decompressor).map(|b| b.as_bytes().len())
            })
        });
        group.finish();
    }
}

fn frames(c: &mut Criterion) {
    let batch = one_mib_batch();
    let mut group = c.benchmark_group("produce_frame_1MiB");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    // The batch is shared, not copied: encoding builds only the request's head.
    let shared = bytes::Bytes::from(batch.clone());
    group.bench_function("encode", |b| {
        b.iter(|| {
            requests::produce(7, "bench", 0, shared.clone())
                .as_bytes()
                .len()
        })
    });
    let frame = requests::produce(7, "bench", 0, shared.clone()).to_vec();
    group.bench_function("verify_and_parse", |b| {
        b.iter(|| parse_request(&frame).map(|r| r.correlation_id()))
    });
    group.finish();
    let mut group = c.benchmark_group("fetch_reply_1MiB");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group.bench_function("build", |b| {
        b.iter(|| {
            let mut fbb = flatbuffers::FlatBufferBuilder::with_capacity(batch.len() + 256);
            let v = fbb.create_vector(&batch);
            fbb.finish_minimal(v);
            fbb.finished_data().len()
        })
    });
    group.finish();
}

/// Runs `fut` on a fresh glommio executor with a DMA pool like the broker's.
fn in_glommio<T: Send + 'static>(fut: impl std::future::Future<Output = T> + 'static) -> T {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 << 20)
        .make()
        .expect("a glommio executor")
        .run(fut)
}

/// A fresh log (durability `none`) with `preload` batches in it.
async fn fresh_log(preload: usize) -> (Rc<PartitionLog>, std::path::PathBuf) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    let _ = std::fs::remove_dir_all(&dir);
    corebus::storage::superblock::ensure(&dir).expect("superblock");
    corebus::storage::superblock::verify(&dir)
        .await
        .expect("direct I/O");
    let config = Rc::new(LogConfig {
        durability: Durability::None,
        ..LogConfig::default()
    });
    let log = PartitionLog::open(&dir.join("p0"), config)
        .await
        .expect("open");
    let batch = Bytes::from(one_mib_batch());
    for _ in 0..preload {
        let t = log
            .append(std::slice::from_ref(&batch), 1)
            .await
            .expect("append");
        t.durable().await.expect("ack");
    }
    while log.stats().pending_bytes > 0 {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    (log, dir)
}

fn log_benches(c: &mut Criterion) {
    let len = one_mib_batch().len() as u64;
    let mut group = c.benchmark_group("partition_log_1MiB");
    group.throughput(Throughput::Bytes(len));
    group.sample_size(10);
    group.bench_function("append_and_write", |b| {
        b.iter_custom(|iters| {
            in_glommio(async move {
                let (log, dir) = fresh_log(0).await;
                let batch = Bytes::from(one_mib_batch());
                let started = std::time::Instant::now();
                for _ in 0..iters {
                    let t = log
                        .append(std::slice::from_ref(&batch), 1)
                        .await
                        .expect("append");
                    t.durable().await.expect("ack");
                }
                while log.stats().pending_bytes > 0 {
                    glommio::timer::sleep(Duration::from_micros(50)).await;
                }
                let elapsed = started.elapsed();
                log.close().await;
                let _ = std::fs::remove_dir_all(dir);
                elapsed
            })
        })
    });
    group.bench_function("fetch_from_memory", |b| {
        b.iter_custom(|iters| {
            in_glommio(async move {
                let (log, dir) = fresh_log(4).await;
                let last = log.high_watermark() - 1;
                let started = std::time::Instant::now();
                for _ in 0..iters {
                    let data = log
                        .fetch(last, 1 << 20, Duration::ZERO)
                        .await
                        .expect("fetch");
                    assert!(!data.batches.is_empty());
                }
                let elapsed = started.elapsed();
                log.close().await;
                let _ = std::fs::remove_dir_all(dir);
                elapsed
            })
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    batches(&mut c);
    compression(&mut c);
    frames(&mut c);
    log_benches(&mut c);
    c.final_summary();
}
