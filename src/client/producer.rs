//! A batching, pipelining producer: records are gathered per partition into batches, each
//! full batch is sent at once, and up to `max_in_flight` produce requests are outstanding.
//! Every record gets a receiver that resolves to its offset when the broker acknowledges it.
//! Batches reach the broker in the order they were sent, so a partition stores them in that
//! order: only the waits for the replies run concurrently.
//!
//! Idempotence (on by default): the producer asks the broker for an id (`InitProducer`),
//! numbers each partition's records, keeps at most [`MAX_IN_FLIGHT_PER_PARTITION`] batches
//! of a partition unanswered, and resends a batch that failed for a reason that may pass
//! (connection lost, broker restarting) with the same numbers until `delivery_timeout`: the
//! partition recognises a batch it already has and answers with its original offsets, so
//! nothing is written twice. Without idempotence the same retries may write a batch twice.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use glommio::sync::Semaphore;

use super::{produce_result, Client, ClientError};
use crate::protocol::wire::ErrorCode;
use crate::record::{BatchBuilder, BatchOptions, Codec, ProducerFields, RecordWriter};

/// Batches of one partition an idempotent producer has unanswered at most: the partition
/// remembers this many per producer, so that any of them can be recognised when resent.
pub const MAX_IN_FLIGHT_PER_PARTITION: usize = 5;

/// Tunables of a [`Producer`].
#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// A batch is sent once it reaches this many bytes (uncompressed).
    pub batch_max_bytes: usize,
    /// ... or this many records.
    pub batch_max_records: u32,
    /// Produce requests outstanding at once.
    pub max_in_flight: usize,
    /// Codec of the batches' records.
    pub compression: Codec,
    /// Number the batches so that resends are not written twice.
    pub idempotence: bool,
    /// How long a batch is resent after failures that may pass; zero: never resent.
    pub delivery_timeout: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            batch_max_bytes: 1 << 20,
            batch_max_records: 10_000,
            max_in_flight: 32,
            compression: Codec::None,
            idempotence: true,
            delivery_timeout: Duration::from_secs(120),
        }
    }
}

/// The acknowledgement of one record: its offset, or why it was not stored.
pub type Ack = oneshot::Receiver<Result<u64, ClientError>>;

struct OpenBatch {
    builder: BatchBuilder,
    acks: Vec<oneshot::Sender<Result<u64, ClientError>>>,
}

/// An idempotent producer's numbering of one partition.
struct PartitionSequence {
    /// Sequence of the next record (as a counter that does not wrap; the wire carries its
    /// low 32 bits).
    next: Cell<u64>,
    /// Base sequences of the batches sent and not yet answered for good.
    unanswered: RefCell<BTreeSet<u64>>,
    /// Limits those to [`MAX_IN_FLIGHT_PER_PARTITION`].
    permits: Rc<Semaphore>,
}

/// What a batch's sender task needs.
struct Sending {
    client: Rc<Client>,
    topic: Rc<str>,
    partition: u32,
    bytes: Bytes,
    delivery_timeout: Duration,
    /// The partition's numbering, for an idempotent producer.
    sequence: Option<(Rc<PartitionSequence>, u64)>,
}

/// Produces records to one topic.
pub struct Producer {
    client: Rc<Client>,
    topic: Rc<str>,
    options: ProducerOptions,
    open: HashMap<u32, OpenBatch>,
    permits: Rc<Semaphore>,
    /// The id and epoch from `InitProducer`, asked for with the first batch.
    identity: Option<(u64, u16)>,
    sequences: HashMap<u32, Rc<PartitionSequence>>,
    /// Set when a numbered batch failed for good: its sequence numbers are a gap the
    /// partition would refuse every later batch for, so the next batch moves the producer
    /// to its next epoch and numbers every partition from 0 again.
    needs_new_epoch: Rc<Cell<bool>>,
}

impl Producer {
    /// A producer for `topic`.
    pub fn new(client: Rc<Client>, topic: &str, options: ProducerOptions) -> Self {
        let permits = Rc::new(Semaphore::new(options.max_in_flight.max(1) as u64));
        Self {
            client,
            topic: Rc::from(topic),
            options,
            open: HashMap::new(),
            permits,
            identity: None,
            sequences: HashMap::new(),
            needs_new_epoch: Rc::new(Cell::new(false)),
        }
    }

    /// Adds a record to `partition`'s open batch, sending the batch if it is full.
    pub async fn send(&mut self, partition: u32, record: &RecordWriter<'_>) -> Ack {
        let (tx, rx) = oneshot::channel();
        let open = self.open.entry(partition).or_insert_with(|| OpenBatch {
            builder: BatchBuilder::new(),
            acks: Vec::new(),
        });
        open.builder.push(record);
        open.acks.push(tx);
        if open.builder.size_bytes() >= self.options.batch_max_bytes
            || open.builder.len() >= self.options.batch_max_records
        {
            self.send_batch(partition).await;
        }
        rx
    }

    /// Sends every open batch.
    pub async fn flush(&mut self) {
        let partitions: Vec<u32> = self.open.keys().copied().collect();
        for p in partitions {
            self.send_batch(p).await;
        }
    }

    /// Waits until every request sent so far has been answered.
    pub async fn wait_all(&self) {
        let all = self.options.max_in_flight.max(1) as u64;
        if let Ok(permit) = self.permits.acquire_permit(all).await {
            drop(permit);
        }
    }

    /// The producer's id and epoch, asking the broker on first use.
    async fn identity_or_init(&mut self) -> Result<(u64, u16), ClientError> {
        let previous = match self.identity {
            Some(identity) if !self.needs_new_epoch.get() => return Ok(identity),
            other => other,
        };
        let started = Instant::now();
        loop {
            match self.client.init_producer(previous).await {
                Ok(identity) => {
                    if previous.is_some() {
                        // Batches still resent under the old epoch will be fenced.
                        self.sequences.clear();
                        self.needs_new_epoch.set(false);
                    }
                    self.identity = Some(identity);
                    return Ok(identity);
                }
                Err(e) if retriable(&e) && started.elapsed() < self.options.delivery_timeout => {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send_batch(&mut self, partition: u32) {
        let Some(mut open) = self.open.remove(&partition) else {
            return;
        };
        if open.builder.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut open.acks);
        let fail = |acks: Vec<oneshot::Sender<_>>, e: ClientError| {
            for ack in acks {
                let _ = ack.send(Err(e.clone()));
            }
        };
        let Ok(permit) = self.permits.acquire_static_permit(1).await else {
            return fail(acks, ClientError::Closed("producer is closed".into()));
        };
        // An idempotent producer's batch takes its sequence numbers (and one of the
        // partition's unanswered places) now: batches are numbered in the order they are sent.
        let mut producer = None;
        let mut sequence = None;
        if self.options.idempotence {
            let (producer_id, epoch) = match self.identity_or_init().await {
                Ok(identity) => identity,
                Err(e) => return fail(acks, e),
            };
            let seq = Rc::clone(self.sequences.entry(partition).or_insert_with(|| {
                Rc::new(PartitionSequence {
                    next: Cell::new(0),
                    unanswered: RefCell::new(BTreeSet::new()),
                    permits: Rc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PARTITION as u64)),
                })
            }));
            let Ok(partition_permit) = seq.permits.acquire_static_permit(1).await else {
                return fail(acks, ClientError::Closed("producer is closed".into()));
            };
            let base = seq.next.get();
            seq.next.set(base + u64::from(open.builder.len()));
            seq.unanswered.borrow_mut().insert(base);
            producer = Some(ProducerFields {
                producer_id,
                epoch,
                base_sequence: base as u32,
            });
            sequence = Some((seq, base, partition_permit));
        }
        let bytes = Bytes::from(open.builder.finish_with(BatchOptions {
            codec: self.options.compression,
            producer,
        }));
        // Queued here, in order; a task per request would race to the socket.
        let first = self
            .client
            .produce_submit(&self.topic, partition, bytes.clone())
            .await;
        let sending = Sending {
            client: Rc::clone(&self.client),
            topic: Rc::clone(&self.topic),
            partition,
            bytes,
            delivery_timeout: self.options.delivery_timeout,
            sequence: sequence.as_ref().map(|(s, base, _)| (Rc::clone(s), *base)),
        };
        let needs_new_epoch = Rc::clone(&self.needs_new_epoch);
        glommio::spawn_local(async move {
            let result = sending.deliver(first).await;
            if let Some((seq, base, partition_permit)) = sequence {
                seq.unanswered.borrow_mut().remove(&base);
                drop(partition_permit);
            }
            drop(permit);
            match result {
                Ok((base, _)) => {
                    for (i, ack) in acks.into_iter().enumerate() {
                        let _ = ack.send(Ok(base + i as u64));
                    }
                }
                Err(e) => {
                    if sending.sequence.is_some() {
                        needs_new_epoch.set(true);
                    }
                    fail(acks, e);
                }
            }
        })
        .detach();
    }
}

impl Sending {
    /// Waits for the first attempt's reply and resends while the failure may pass.
    async fn deliver(
        &self,
        first: Result<super::Reply, ClientError>,
    ) -> Result<(u64, u64), ClientError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut attempt = first;
        loop {
            let result = match attempt {
                Ok(reply) => produce_result(reply, self.partition).await,
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(offsets) => return Ok(offsets),
                Err(e) => e,
            };
            if !self.may_resend(&e) || started.elapsed() + backoff > self.delivery_timeout {
                return Err(e);
            }
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            attempt = self
                .client
                .produce_submit(&self.topic, self.partition, self.bytes.clone())
                .await;
        }
    }

    /// Whether a failed attempt is worth resending: a failure that may pass, or (for an
    /// idempotent producer) a gap that an earlier batch's resend will close.
    fn may_resend(&self, e: &ClientError) -> bool {
        if self.delivery_timeout.is_zero() {
            return false;
        }
        if retriable(e) {
            return true;
        }
        let out_of_order = e
            .api()
            .is_some_and(|a| a.code == ErrorCode::OutOfOrderSequence);
        match &self.sequence {
            Some((seq, base)) if out_of_order => seq
                .unanswered
                .borrow()
                .first()
                .is_some_and(|first| first < base),
            _ => false,
        }
    }
}

/// Failures after which the same request may succeed: the connection or the broker went
/// away, or a shard could not be reached for now.
pub fn retriable(e: &ClientError) -> bool {
    match e {
        ClientError::Io(_) | ClientError::Closed(_) => true,
        ClientError::Api(a) => matches!(
            a.code,
            ErrorCode::ShardUnavailable | ErrorCode::ShuttingDown
        ),
        _ => false,
    }
}
