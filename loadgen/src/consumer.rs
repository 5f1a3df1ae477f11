//! Consumer tasks: read every partition from where the run began, check every message (its
//! payload bytes, per-partition order of each producer's sequence, no duplicates), and measure
//! end-to-end latency.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use corebus::client::{Client, ClientError};
use corebus::record::{BatchHeader, BatchIter, Decompressor};
use futures::future::join_all;

use crate::payload::{self, Filler};
use crate::stats::{Clock, Stats};

/// Bytes asked per fetch.
const FETCH_BYTES: u32 = 8 << 20;
/// Long-poll time of a fetch.
const FETCH_WAIT_MS: u32 = 50;
/// How long consumers may take to catch up after the producers stopped.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// What the consumers share.
pub struct Shared {
    /// The client.
    pub client: Rc<Client>,
    /// Topic.
    pub topic: String,
    /// Measurements.
    pub stats: Rc<Stats>,
    /// The run's clock.
    pub clock: Clock,
    /// Payload filler.
    pub filler: Rc<Filler>,
    /// First offset of the run, per partition.
    pub start: Vec<u64>,
    /// Set when producers are done; `targets` then holds where each partition ends.
    pub producers_done: Rc<Cell<bool>>,
    /// Per partition: one past the highest acknowledged offset (final once producers are done).
    pub targets: Rc<std::cell::RefCell<Vec<u64>>>,
}

/// The high watermark of each partition now: where a run's consumers start.
pub async fn current_ends(
    client: &Client,
    topic: &str,
    partitions: u32,
) -> Result<Vec<u64>, String> {
    let mut ends = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        match client.fetch(topic, p, u64::MAX, 1, 0).await {
            Err(ClientError::OffsetOutOfRange { high_watermark, .. }) => ends.push(high_watermark),
            Ok(_) => ends.push(0),
            Err(e) => return Err(format!("{topic}/{p}: {e}")),
        }
    }
    Ok(ends)
}

/// Runs `consumers` tasks over the partitions until every partition reaches its target.
pub async fn run(shared: Rc<Shared>, consumers: u32) {
    let partitions = shared.start.len() as u32;
    let tasks = (0..consumers).map(|c| {
        let shared = Rc::clone(&shared);
        let mine: Vec<u32> = (0..partitions).filter(|p| p % consumers == c).collect();
        async move {
            join_all(mine.into_iter().map(|p| consume_partition(&shared, p))).await;
        }
    });
    join_all(tasks).await;
}

async fn consume_partition(shared: &Shared, partition: u32) {
    let mut offset = shared.start[partition as usize];
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    let mut decompressor = Decompressor::new();
    let mut drain_started: Option<std::time::Instant> = None;
    let mut in_flight: Option<(u64, corebus::client::Reply)> = None;
    loop {
        if shared.producers_done.get() {
            let target = shared
                .targets
                .borrow()
                .get(partition as usize)
                .copied()
                .unwrap_or(0);
            if offset >= target {
                return;
            }
            let started = *drain_started.get_or_insert_with(std::time::Instant::now);
            if started.elapsed() > DRAIN_DEADLINE {
                shared.stats.error(format!(
                    "partition {partition}: stopped at offset {offset}, {} acknowledged messages never read",
                    target - offset
                ));
                return;
            }
        }
        // The fetch sent ahead while the last reply was checked, if it asked for `offset`.
        let ahead = match in_flight.take() {
            Some((asked, reply)) if asked == offset => Ok(reply),
            _ => submit_fetch(shared, partition, offset).await,
        };
        let fetched = match ahead {
            Ok(reply) => corebus::client::fetch_result(reply, offset).await,
            Err(e) => Err(e),
        };
        let fetched = match fetched {
            Ok(f) => f,
            Err(e) => {
                shared
                    .stats
                    .error(format!("fetch {partition}@{offset}: {e}"));
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Ask for what follows before checking these bytes, so that the broker sends it while
        // the generator verifies: one fetch ahead per partition.
        if let Some(next) = end_of(&fetched.batches).filter(|&n| n > offset) {
            if let Ok(reply) = submit_fetch(shared, partition, next).await {
                in_flight = Some((next, reply));
            }
        }
        let now = shared.clock.now_ns();
        for batch in BatchIter::new(&fetched.batches) {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    shared
                        .stats
                        .error(format!("partition {partition}: bad batch: {e}"));
                    break;
                }
            };
            let base = batch.header().base_offset();
            let records = match batch.records(&mut decompressor) {
                Ok(records) => records,
                Err(e) => {
                    shared
                        .stats
                        .error(format!("partition {partition}: bad batch: {e}"));
                    break;
                }
            };
            for record in records {
                let Ok(record) = record else {
                    shared
                        .stats
                        .error(format!("partition {partition}: bad record"));
                    break;
                };
                let at = base + u64::from(record.offset_delta);
                if at < offset {
                    continue;
                }
                offset = at + 1;
                let Some(msg) = payload::check(record.value, &shared.filler) else {
                    shared.stats.error(format!(
                        "partition {partition} offset {at}: payload damaged"
                    ));
                    continue;
                };
                if let Some(&prev) = last_seq.get(&msg.producer) {
                    if msg.seq <= prev {
                        shared.stats.error(format!(
                            "partition {partition} offset {at}: producer {} seq {} after {prev} (duplicate or out of order)",
                            msg.producer, msg.seq
                        ));
                    }
                }
                last_seq.insert(msg.producer, msg.seq);
                shared.stats.consumed(msg.sent_ns, now, record.value.len());
            }
        }
    }
}

async fn submit_fetch(
    shared: &Shared,
    partition: u32,
    offset: u64,
) -> Result<corebus::client::Reply, ClientError> {
    shared
        .client
        .fetch_submit(&shared.topic, partition, offset, FETCH_BYTES, FETCH_WAIT_MS)
        .await
}

/// One past the last offset of the whole batches in `bytes` (headers only, not checked:
/// the verification that follows checks them).
fn end_of(bytes: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    let mut end = None;
    while let Some(rest) = bytes.get(at..) {
        let Ok(header) = BatchHeader::parse(rest) else {
            break;
        };
        let len = header.batch_len() as usize;
        if len == 0 || rest.len() < len {
            break;
        }
        end = Some(header.last_offset() + 1);
        at += len;
    }
    end
}
