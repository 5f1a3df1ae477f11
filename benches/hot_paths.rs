//! Micro-benchmarks of the hot paths: CRC32C of a batch, batch validation, request parsing.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use corebus::record::{Batch, BatchBuilder, RecordWriter};

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
    group.bench_function("validate", |b| {
        b.iter(|| Batch::validate(&batch, 100_000).map(|b| b.as_bytes().len()))
    });
    group.finish();
}

criterion_group!(benches, batches);
criterion_main!(benches);
