//! Producer tasks: closed loop (a fixed number of requests in flight) or open loop (a schedule
//! of intended send times; latency counts from the intended time, so a slow broker cannot hide
//! its stalls by slowing the generator down: no coordinated omission).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use corebus::client::Client;
use corebus::record::{BatchBuilder, BatchOptions, ProducerFields, RecordWriter};
use futures::future::join_all;
use glommio::sync::Semaphore;

use crate::args::Args;
use crate::payload::{self, Filler};
use crate::stats::{Clock, Stats};

/// Open-loop requests in flight per producer at most (the schedule keeps its times anyway).
const OPEN_LOOP_MAX_IN_FLIGHT: u64 = 4096;

/// What every producer task shares.
pub struct Shared {
    /// The client.
    pub client: Rc<Client>,
    /// Topic.
    pub topic: String,
    /// Options.
    pub args: Args,
    /// Measurements.
    pub stats: Rc<Stats>,
    /// The run's clock.
    pub clock: Clock,
    /// Payload filler.
    pub filler: Rc<Filler>,
    /// Producers stop sending at this time (ns).
    pub stop_ns: u64,
    /// Per partition: one past the highest acknowledged offset.
    pub acked_end: Rc<RefCell<Vec<u64>>>,
}

/// One producer's sequence and partition cursors.
struct Cursor {
    id: u32,
    seq: Cell<u64>,
    batch: Cell<u64>,
    /// The idempotent producer's id and epoch (`--idempotence on`).
    identity: Option<(u64, u16)>,
    /// Per partition: the next record's sequence number.
    sequences: RefCell<Vec<u32>>,
    /// Per partition: held from building a batch to queueing it, so that numbered batches
    /// reach the broker in their order.
    lanes: Vec<Semaphore>,
}

impl Cursor {
    fn next_partition(&self, partitions: u32, producers: u32) -> u32 {
        let b = self.batch.get();
        self.batch.set(b + 1);
        ((u64::from(self.id) + b * u64::from(producers)) % u64::from(partitions)) as u32
    }
}

/// Builds one batch of `count` messages for `partition` with send times from `sent_ns(i)`;
/// returns the bytes.
fn build_batch(
    shared: &Shared,
    cursor: &Cursor,
    partition: u32,
    builder: &mut BatchBuilder,
    scratch: &mut Vec<u8>,
    count: usize,
    sent_ns: impl Fn(usize) -> u64,
) -> Vec<u8> {
    let key = cursor.id.to_le_bytes();
    let timestamp_ms = corebus::clock::now_ms();
    for i in 0..count {
        let seq = cursor.seq.get();
        cursor.seq.set(seq + 1);
        payload::write(
            scratch,
            &shared.filler,
            cursor.id,
            seq,
            sent_ns(i),
            shared.args.message_size,
        );
        builder.push(&RecordWriter {
            timestamp_ms,
            key: Some(&key),
            value: scratch,
            ..RecordWriter::default()
        });
    }
    let producer = cursor.identity.map(|(producer_id, epoch)| {
        let mut sequences = cursor.sequences.borrow_mut();
        let next = &mut sequences[partition as usize];
        let base_sequence = *next;
        *next = next.wrapping_add(count as u32);
        ProducerFields {
            producer_id,
            epoch,
            base_sequence,
        }
    });
    builder.finish_with(BatchOptions {
        codec: shared.args.codec(),
        producer,
    })
}

/// Messages per batch: as many as fit in `--batch-bytes`.
pub fn messages_per_batch(args: &Args) -> usize {
    // Record overhead: 4 length + 4 delta + 8 time + 4+4 key + 4 value + 8 attributes + 2 headers.
    let per_message = args.message_size + 38;
    ((args.batch_bytes.saturating_sub(64)) / per_message).max(1)
}

/// Waits for a produce's reply and records its messages (and the batch's `wire_bytes`).
async fn complete(
    shared: &Shared,
    partition: u32,
    reply: corebus::client::Reply,
    sent: &[u64],
    wire_bytes: usize,
) {
    let result = corebus::client::produce_result(reply, partition).await;
    let acked_ns = shared.clock.now_ns();
    match result {
        Ok((_, last)) => {
            if let Some(&first) = sent.first() {
                shared.stats.acked_batch(first, wire_bytes);
            }
            for &s in sent {
                shared.stats.acked(s, acked_ns, shared.args.message_size);
            }
            let mut ends = shared.acked_end.borrow_mut();
            if let Some(end) = ends.get_mut(partition as usize) {
                *end = (*end).max(last + 1);
            }
        }
        Err(e) => shared
            .stats
            .error(format!("produce to partition {partition}: {e}")),
    }
}

/// Runs every producer until the stop time; returns when all their requests are answered.
pub async fn run(shared: Rc<Shared>) {
    let producers = (0..shared.args.producers).map(|id| {
        let shared = Rc::clone(&shared);
        async move {
            let identity = if shared.args.idempotence {
                match shared.client.init_producer(None).await {
                    Ok(identity) => Some(identity),
                    Err(e) => {
                        shared
                            .stats
                            .error(format!("producer {id}: InitProducer: {e}"));
                        return;
                    }
                }
            } else {
                None
            };
            let partitions = shared.args.partitions as usize;
            let cursor = Rc::new(Cursor {
                id,
                seq: Cell::new(0),
                batch: Cell::new(0),
                identity,
                sequences: RefCell::new(vec![0; partitions]),
                lanes: (0..partitions).map(|_| Semaphore::new(1)).collect(),
            });
            match shared.args.rate {
                None => closed_loop(shared, cursor).await,
                Some(rate) => open_loop(shared, cursor, rate).await,
            }
        }
    });
    join_all(producers).await;
}

async fn closed_loop(shared: Rc<Shared>, cursor: Rc<Cursor>) {
    let per_batch = messages_per_batch(&shared.args);
    let workers = (0..shared.args.in_flight).map(|_| {
        let (shared, cursor) = (Rc::clone(&shared), Rc::clone(&cursor));
        async move {
            let mut builder = BatchBuilder::with_capacity(shared.args.batch_bytes + 4096);
            let mut scratch = Vec::with_capacity(shared.args.message_size);
            let mut sent = vec![0u64; per_batch];
            while shared.clock.now_ns() < shared.stop_ns {
                let partition =
                    cursor.next_partition(shared.args.partitions, shared.args.producers);
                let Ok(lane) = cursor.lanes[partition as usize].acquire_permit(1).await else {
                    break;
                };
                let now = shared.clock.now_ns();
                let bytes = build_batch(
                    &shared,
                    &cursor,
                    partition,
                    &mut builder,
                    &mut scratch,
                    per_batch,
                    |_| now,
                );
                sent.iter_mut().for_each(|s| *s = now);
                let wire_bytes = bytes.len();
                let reply = shared
                    .client
                    .produce_submit(&shared.topic, partition, Bytes::from(bytes))
                    .await;
                drop(lane);
                match reply {
                    Ok(reply) => complete(&shared, partition, reply, &sent, wire_bytes).await,
                    Err(e) => shared
                        .stats
                        .error(format!("produce to partition {partition}: {e}")),
                }
            }
        }
    });
    join_all(workers).await;
}

async fn open_loop(shared: Rc<Shared>, cursor: Rc<Cursor>, rate: u64) {
    let per_producer = (rate as f64 / f64::from(shared.args.producers)).max(1e-3);
    let interval_ns = 1e9 / per_producer;
    let per_batch = messages_per_batch(&shared.args);
    let linger_ns = shared.args.linger.as_nanos() as u64;
    let start_ns = shared.clock.now_ns();
    let intended = |k: u64| start_ns + (k as f64 * interval_ns) as u64;
    let permits = Rc::new(Semaphore::new(OPEN_LOOP_MAX_IN_FLIGHT));
    let mut builder = BatchBuilder::with_capacity(shared.args.batch_bytes + 4096);
    let mut scratch = Vec::with_capacity(shared.args.message_size);
    let mut next = 0u64;
    while intended(next) < shared.stop_ns {
        let now = shared.clock.now_ns();
        let send_at = intended(next) + linger_ns;
        if send_at > now {
            glommio::timer::sleep(Duration::from_nanos(send_at - now)).await;
            continue;
        }
        // Every message whose time has come goes now, in batches of at most `per_batch`.
        let due = (((now - start_ns) as f64 / interval_ns) as u64 + 1).saturating_sub(next);
        let count = (due as usize).clamp(1, per_batch);
        let first = next;
        shared.stats.sent_late(send_at, now);
        let partition = cursor.next_partition(shared.args.partitions, shared.args.producers);
        let bytes = build_batch(
            &shared,
            &cursor,
            partition,
            &mut builder,
            &mut scratch,
            count,
            |i| intended(first + i as u64),
        );
        let wire_bytes = bytes.len();
        let sent: Vec<u64> = (0..count as u64).map(|i| intended(first + i)).collect();
        next += count as u64;
        let Ok(permit) = permits.acquire_static_permit(1).await else {
            break;
        };
        // Queue in order here (a partition's batches reach the broker in the order built),
        // then wait for the reply in a task of its own.
        let reply = match shared
            .client
            .produce_submit(&shared.topic, partition, Bytes::from(bytes))
            .await
        {
            Ok(reply) => reply,
            Err(e) => {
                shared
                    .stats
                    .error(format!("produce to partition {partition}: {e}"));
                continue;
            }
        };
        let shared = Rc::clone(&shared);
        glommio::spawn_local(async move {
            complete(&shared, partition, reply, &sent, wire_bytes).await;
            drop(permit);
        })
        .detach();
    }
    // Every request answered: all permits back.
    let _all = permits.acquire_permit(OPEN_LOOP_MAX_IN_FLIGHT).await;
}
