//! Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/): valid frames of every
//! request kind built as the client builds them, valid record batches, valid segment files and
//! valid state logs. Run from the repository root:
//!
//! ```text
//! cargo run --example fuzz_seeds -- fuzz/corpus
//! ```

use std::path::{Path, PathBuf};

use corebus::protocol::message::finish_request;
use corebus::protocol::wire;
use corebus::record::batch::stamp;
use corebus::record::{BatchBuilder, BatchOptions, Codec, RecordWriter, HEADER_PREFIX_LEN};
use corebus::storage::state_log;
use corebus::subscription::state::{Counters, Op};
use flatbuffers::FlatBufferBuilder;

fn batch(values: &[&str], with_extras: bool) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for (i, v) in values.iter().enumerate() {
        let headers: &[(&[u8], &[u8])] = if with_extras {
            &[(b"trace", b"abc123"), (b"n", b"")]
        } else {
            &[]
        };
        b.push(&RecordWriter {
            timestamp_ms: 1_700_000_000_000 + i as i64,
            key: with_extras.then_some(b"key".as_slice()),
            value: v.as_bytes(),
            id: if with_extras { "id-1" } else { "" },
            source: if with_extras { "/orders" } else { "" },
            event_type: if with_extras {
                "com.example.created"
            } else {
                ""
            },
            subject: if with_extras { "orders/1" } else { "" },
            headers,
        });
    }
    b.finish()
}

fn produce(id: u64, topic: &str, parts: &[(u32, &[u8])]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let parts: Vec<_> = parts
        .iter()
        .map(|(partition, batches)| {
            let data = fbb.create_vector(batches);
            wire::PartitionProduce::create(
                &mut fbb,
                &wire::PartitionProduceArgs {
                    partition: *partition,
                    batches: Some(data),
                },
            )
        })
        .collect();
    let parts = fbb.create_vector(&parts);
    let topic = fbb.create_string(topic);
    let body = wire::ProduceRequest::create(
        &mut fbb,
        &wire::ProduceRequestArgs {
            topic: Some(topic),
            partitions: Some(parts),
        },
    );
    finish_request(
        fbb,
        id,
        wire::RequestBody::ProduceRequest,
        body.as_union_value(),
    )
    .as_bytes()
    .to_vec()
}

fn fetch(id: u64, topic: &str, partition: u32, offset: u64) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let topic = fbb.create_string(topic);
    let body = wire::FetchRequest::create(
        &mut fbb,
        &wire::FetchRequestArgs {
            topic: Some(topic),
            partition,
            offset,
            max_bytes: 1 << 20,
            max_wait_ms: 0,
        },
    );
    finish_request(
        fbb,
        id,
        wire::RequestBody::FetchRequest,
        body.as_union_value(),
    )
    .as_bytes()
    .to_vec()
}

fn metadata(id: u64, topics: &[&str]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let names: Vec<_> = topics.iter().map(|t| fbb.create_string(t)).collect();
    let names = fbb.create_vector(&names);
    let body = wire::MetadataRequest::create(
        &mut fbb,
        &wire::MetadataRequestArgs {
            topics: Some(names),
        },
    );
    finish_request(
        fbb,
        id,
        wire::RequestBody::MetadataRequest,
        body.as_union_value(),
    )
    .as_bytes()
    .to_vec()
}

fn create_topic(id: u64, name: &str, partitions: u32) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let name = fbb.create_string(name);
    let body = wire::CreateTopicRequest::create(
        &mut fbb,
        &wire::CreateTopicRequestArgs {
            name: Some(name),
            partitions,
            retention_ms: 60_000,
            retention_bytes: -1,
            compression: wire::TopicCompression::Producer,
        },
    );
    finish_request(
        fbb,
        id,
        wire::RequestBody::CreateTopicRequest,
        body.as_union_value(),
    )
    .as_bytes()
    .to_vec()
}

fn delete_topic(id: u64, name: &str) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let name = fbb.create_string(name);
    let body = wire::DeleteTopicRequest::create(
        &mut fbb,
        &wire::DeleteTopicRequestArgs { name: Some(name) },
    );
    finish_request(
        fbb,
        id,
        wire::RequestBody::DeleteTopicRequest,
        body.as_union_value(),
    )
    .as_bytes()
    .to_vec()
}

fn list_topics(id: u64, kind: wire::RequestBody) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::ListTopicsRequest::create(&mut fbb, &wire::ListTopicsRequestArgs {});
    finish_request(fbb, id, kind, body.as_union_value())
        .as_bytes()
        .to_vec()
}

/// Batches stamped with consecutive offsets from 0, as the log stores them.
fn stored_batches() -> (Vec<u8>, u64, Vec<usize>) {
    let mut log = Vec::new();
    let mut next = 0u64;
    let mut positions = Vec::new();
    for (i, values) in [&["a"][..], &["b", "c", "d"], &["e", "f"]]
        .iter()
        .enumerate()
    {
        let mut b = batch(values, i == 1);
        stamp(&mut b[..HEADER_PREFIX_LEN], next, 1_700_000_000_500);
        positions.push(log.len());
        next += values.len() as u64;
        log.extend_from_slice(&b);
    }
    (log, next, positions)
}

/// The v1 worked example of docs/protocol.md section 8.1.
const V1_EXAMPLE_BATCH: &str = "\
    00000000000000006400000000000000000000000000000076bc5191010000000100000000000000\
    0068e5cf8b0100000068e5cf8b01000000000000000000002000000000000000\
    0068e5cf8b010000ffffffff02000000686900000000000000000000";

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn main() {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let one = batch(&["hello"], false);
    let rich = batch(&["v0", "v1", "v2"], true);
    let mut two = one.clone();
    two.extend_from_slice(&rich);

    let requests: Vec<(&str, Vec<u8>)> = vec![
        ("produce", produce(1, "t", &[(0, &one)])),
        ("produce-two-batches", produce(2, "t", &[(1, &two)])),
        (
            "produce-two-partitions",
            produce(3, "t", &[(0, &rich), (1, &one)]),
        ),
        ("produce-unknown-topic", produce(4, "nope", &[(0, &one)])),
        ("fetch", fetch(5, "t", 0, 0)),
        ("fetch-past-end", fetch(6, "t", 1, 1000)),
        ("metadata", metadata(7, &["t"])),
        ("metadata-all", metadata(8, &[])),
        ("create-topic", create_topic(9, "u", 2)),
        ("delete-topic", delete_topic(10, "t")),
        (
            "list-topics",
            list_topics(11, wire::RequestBody::ListTopicsRequest),
        ),
        ("unknown-kind", list_topics(12, wire::RequestBody(99))),
    ];

    let dispatch = root.join("request_dispatch");
    for (name, frame) in &requests {
        write(&dispatch, name, frame);
    }

    let frames = root.join("frame_decoder");
    for (name, frame) in &requests {
        let mut input = vec![0u8]; // read chunk: as much as asked
        input.extend_from_slice(frame);
        write(&frames, name, &input);
    }
    let mut stream = vec![7u8]; // 7-byte reads
    for (_, frame) in &requests {
        stream.extend_from_slice(frame);
    }
    write(&frames, "stream-all-kinds", &stream);
    let mut oversized = vec![0u8];
    oversized.extend_from_slice(&u32::MAX.to_le_bytes());
    write(&frames, "oversized-prefix", &oversized);
    let mut truncated = vec![3u8];
    truncated.extend_from_slice(&requests[0].1[..requests[0].1.len() - 5]);
    write(&frames, "truncated", &truncated);

    let batches = root.join("record_batch");
    write(&batches, "one-record", &one);
    write(&batches, "three-records-with-attributes", &rich);
    write(&batches, "two-batches", &two);
    let (stored, _, _) = stored_batches();
    write(&batches, "stored-batches", &stored);

    // Compressed batches, and a v1 one as old clients send them.
    let records: Vec<String> = (0..20)
        .map(|i| format!("{{\"order\":{i},\"status\":\"created\"}}"))
        .collect();
    write(&batches, "v1", &from_hex(V1_EXAMPLE_BATCH));
    let compressed = root.join("compressed_batch");
    for (codec, tag) in [(Codec::Lz4, 0u8), (Codec::Zstd, 1)] {
        let mut b = BatchBuilder::new();
        for r in &records {
            b.push(&RecordWriter {
                timestamp_ms: 1_700_000_000_000,
                value: r.as_bytes(),
                ..RecordWriter::default()
            });
        }
        let bytes = b.finish_with(BatchOptions {
            codec,
            producer: None,
        });
        write(&batches, &format!("{codec}"), &bytes);
        // compressed_batch input: codec tag, declared size, record count, region.
        let mut input = vec![tag];
        input.extend_from_slice(&bytes[72..76]);
        input.push(records.len() as u8);
        input.extend_from_slice(&bytes[80..]);
        write(&compressed, &format!("{codec}"), &input);
    }

    let segments = root.join("segment_recovery");
    let (log, next, positions) = stored_batches();
    let mut file = log.clone();
    file.resize(8192, 0); // preallocated space is zeros
    let mut plain = vec![0u8];
    plain.extend_from_slice(&file);
    write(&segments, "plain", &plain);
    let mut torn = vec![0u8];
    torn.extend_from_slice(&log[..log.len() - 3]);
    torn.resize(4096, 0);
    write(&segments, "torn-tail", &torn);
    for (name, flags) in [("unclean-checkpoint", 1u8), ("clean-checkpoint", 3)] {
        let mut input = vec![flags];
        input.extend_from_slice(&(log.len() as u32).to_le_bytes());
        input.extend_from_slice(&(next as u32).to_le_bytes());
        input.extend_from_slice(&file);
        write(&segments, name, &input);
    }
    // Acknowledged data with a flipped bit: corruption to report, not cut.
    let mut corrupt = vec![1u8];
    corrupt.extend_from_slice(&(log.len() as u32).to_le_bytes());
    corrupt.extend_from_slice(&(next as u32).to_le_bytes());
    let mut damaged = file.clone();
    damaged[positions[1] + 70] ^= 0x40;
    corrupt.extend_from_slice(&damaged);
    write(&segments, "corrupt-acknowledged", &corrupt);
    // An index file with an entry for each batch.
    let mut indexed = vec![4u8, positions.len() as u8];
    let mut offset = 0u32;
    for (i, &pos) in positions.iter().enumerate() {
        indexed.extend_from_slice(&offset.to_le_bytes());
        indexed.extend_from_slice(&(pos as u32).to_le_bytes());
        offset += [1, 3, 2][i];
    }
    indexed.extend_from_slice(&file);
    write(&segments, "with-index", &indexed);

    // State logs: a snapshot group of subscription records, then one group per write; and a
    // file of bare records, as written before groups.
    let states = root.join("state_log");
    let records: Vec<Vec<u8>> = [
        Op::Snapshot {
            floor: 3,
            cursor: 9,
            counters: Counters::default(),
        },
        Op::Lock {
            offset: 4,
            delivery_count: 1,
            nonce: 77,
            until_ms: 1_000,
            timestamp_ms: 5,
        },
        Op::Ack { offset: 4 },
        Op::Lost {
            from: 5,
            to: 9,
            count: 4,
        },
    ]
    .iter()
    .map(Op::encode)
    .collect();
    let mut grouped = state_group(&records[..1], true);
    grouped.extend_from_slice(&state_group(&records[1..3], false));
    grouped.extend_from_slice(&state_group(&records[3..], false));
    write(&states, "groups", &grouped);
    let mut bare = Vec::new();
    for r in &records {
        state_log::frame(r, &mut bare);
    }
    write(&states, "bare-records", &bare);
}

/// One state-log group (as `storage::state_log` writes a write or a snapshot).
fn state_group(records: &[Vec<u8>], sealed: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for r in records {
        state_log::frame(r, &mut body);
    }
    let word = (1u32 << 31) | if sealed { 1 << 30 } else { 0 } | body.len() as u32;
    let mut group = word.to_le_bytes().to_vec();
    group.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    group.extend_from_slice(&body);
    group
}
