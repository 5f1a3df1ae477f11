//! Request verification and dispatch: arbitrary bytes as one whole request frame (length
//! prefix included).
//!
//! 1. `parse_request` (the FlatBuffers verifier with the broker's limits); a verified request
//!    has every field of every union body read and every vector iterated.
//! 2. `error_response` for the verifier's error, which must verify as a response.
//! 3. The real `broker::handlers::dispatch` against a real one-shard `Shard` (topic `t` with
//!    two partitions, data on disk, durability `write`), kept for the whole process in one
//!    glommio executor. Its reply must verify, carry the request's correlation id (0 for a
//!    frame that fails verification), and every batch it serves must pass its CRC. Topic
//!    changes made by the input are undone after each run, and the topic is recreated when
//!    its logs grow past a few MiB, so that state and disk use stay bounded.

#![no_main]

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use corebus::broker::config::BrokerConfig;
use corebus::broker::handlers::dispatch;
use corebus::broker::messages::{ShardMessage, TopicChange};
use corebus::broker::metadata::TopicConfig;
use corebus::broker::shard::Shard;
use corebus::protocol::message::{error_response, parse_request, peek_envelope, ApiError};
use corebus::protocol::wire::ErrorCode;
use corebus::storage::{superblock, Durability};
use corebus_fuzz::{check_response_frame, quietly, run, scratch_dir, walk_request};
use glommio::channels::channel_mesh::{MeshBuilder, Receivers};
use libfuzzer_sys::fuzz_target;

const TOPIC: &str = "t";
const PARTITIONS: u32 = 2;
/// Past this many bytes in the topic's logs, the topic is deleted and made again.
const MAX_LOG_BYTES: u64 = 4 << 20;

struct Broker {
    shard: Rc<Shard>,
    _receivers: Receivers<ShardMessage>,
}

thread_local! {
    static BROKER: RefCell<Option<Broker>> = const { RefCell::new(None) };
}

fn config(data_dir: std::path::PathBuf) -> BrokerConfig {
    let mut c = BrokerConfig::new(data_dir, "127.0.0.1:1".parse().expect("address"));
    c.durability = Durability::Write;
    c.max_batch_records = 1000;
    c.max_partitions_per_topic = 4;
    c.max_fetch_bytes = 64 * 1024;
    c.max_fetch_wait_ms = 0; // a fetch at the end of the log must not wait
    c.cache_bytes_per_partition = 256 * 1024;
    c.max_io_bytes = 64 * 1024;
    c.max_pending_bytes_per_partition = 1 << 20;
    c.segment_bytes = 256 * 1024;
    c.preallocate_bytes = 64 * 1024;
    c.index_interval_bytes = 1024;
    c
}

async fn start() -> Broker {
    let dir = scratch_dir("request_dispatch");
    superblock::ensure(&dir).expect("superblock");
    // glommio 0.9: the first DmaFile opened on a device must not be empty.
    superblock::verify(&dir).await.expect("superblock check");
    let (senders, receivers) = MeshBuilder::<ShardMessage, _>::full(1, 16)
        .join()
        .await
        .expect("a mesh of one");
    let shard = Shard::start(Arc::new(config(dir)), senders)
        .await
        .expect("shard start");
    shard
        .change_topic(TopicChange::Created {
            name: TOPIC.into(),
            config: TopicConfig::with_partitions(PARTITIONS),
        })
        .await
        .expect("creating the topic");
    Broker {
        shard,
        _receivers: receivers,
    }
}

/// Undoes topic changes made by the input and bounds the data kept.
async fn restore(shard: &Shard) {
    let wanted = TopicConfig::with_partitions(PARTITIONS);
    let topics = shard.topics();
    for name in topics.keys().filter(|n| *n != TOPIC) {
        let _ = shard
            .change_topic(TopicChange::Deleted { name: name.clone() })
            .await;
    }
    let bytes: u64 = shard.logs().iter().map(|l| l.stats().bytes).sum();
    let keep = topics.get(TOPIC) == Some(&wanted) && bytes <= MAX_LOG_BYTES;
    if !keep {
        if topics.contains_key(TOPIC) {
            shard
                .change_topic(TopicChange::Deleted { name: TOPIC.into() })
                .await
                .expect("deleting the topic");
        }
        shard
            .change_topic(TopicChange::Created {
                name: TOPIC.into(),
                config: wanted,
            })
            .await
            .expect("recreating the topic");
    }
}

fuzz_target!(|data: &[u8]| {
    // 1 and 2: verification, every accessor, and the error reply.
    let expected_id = match parse_request(data) {
        Ok(request) => {
            walk_request(&request);
            Some(request.correlation_id())
        }
        Err(e) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            let reply = error_response(0, &e);
            check_response_frame(reply.as_bytes());
            // The reply echoes the id wherever the envelope can be read (protocol.md s. 3).
            peek_envelope(data).map(|peek| peek.correlation_id)
        }
    };
    let custom = ApiError::new(ErrorCode::CorruptBatch, String::from_utf8_lossy(data));
    check_response_frame(error_response(u64::from(data.len() as u32), &custom).as_bytes());

    // 3: the broker's own dispatch on a real shard.
    let frame = Bytes::copy_from_slice(data);
    quietly(|| {
        run(async move {
            let shard = BROKER.with(|b| b.borrow().as_ref().map(|b| Rc::clone(&b.shard)));
            let shard = match shard {
                Some(shard) => shard,
                None => {
                    let broker = start().await;
                    let shard = Rc::clone(&broker.shard);
                    BROKER.with(|b| *b.borrow_mut() = Some(broker));
                    shard
                }
            };
            let reply = dispatch(&shard, frame).await;
            let bytes = reply.to_vec();
            check_response_frame(&bytes);
            let response = corebus::protocol::message::parse_response(&bytes).expect("verified");
            assert_eq!(response.correlation_id(), expected_id.unwrap_or(0));
            restore(&shard).await;
        })
    });
});
