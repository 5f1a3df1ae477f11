//! A batching, pipelining producer: records are gathered per partition into batches, each
//! full batch is sent at once, and up to `max_in_flight` produce requests are outstanding.
//! Every record gets a receiver that resolves to its offset when the broker acknowledges it.
//! Batches reach the broker in the order they were sent, so a partition stores them in that
//! order: only the waits for the replies run concurrently.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use futures::channel::oneshot;
use glommio::sync::Semaphore;

use super::{produce_result, Client, ClientError};
use crate::record::{BatchBuilder, RecordWriter};

/// Tunables of a [`Producer`].
#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// A batch is sent once it reaches this many bytes.
    pub batch_max_bytes: usize,
    /// ... or this many records.
    pub batch_max_records: u32,
    /// Produce requests outstanding at once.
    pub max_in_flight: usize,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            batch_max_bytes: 1 << 20,
            batch_max_records: 10_000,
            max_in_flight: 32,
        }
    }
}

/// The acknowledgement of one record: its offset, or why it was not stored.
pub type Ack = oneshot::Receiver<Result<u64, ClientError>>;

struct OpenBatch {
    builder: BatchBuilder,
    acks: Vec<oneshot::Sender<Result<u64, ClientError>>>,
}

/// Produces records to one topic.
pub struct Producer {
    client: Rc<Client>,
    topic: Rc<str>,
    options: ProducerOptions,
    open: HashMap<u32, OpenBatch>,
    permits: Rc<Semaphore>,
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

    async fn send_batch(&mut self, partition: u32) {
        let Some(mut open) = self.open.remove(&partition) else {
            return;
        };
        if open.builder.is_empty() {
            return;
        }
        let bytes = open.builder.finish();
        let acks = std::mem::take(&mut open.acks);
        let Ok(permit) = self.permits.acquire_static_permit(1).await else {
            let e = ClientError::Closed("producer is closed".into());
            for ack in acks {
                let _ = ack.send(Err(e.clone()));
            }
            return;
        };
        // Queued here, in order; a task per request would race to the socket.
        let reply = self
            .client
            .produce_submit(&self.topic, partition, Bytes::from(bytes))
            .await;
        glommio::spawn_local(async move {
            let result = match reply {
                Ok(reply) => produce_result(reply, partition).await,
                Err(e) => Err(e),
            };
            drop(permit);
            match result {
                Ok((base, _)) => {
                    for (i, ack) in acks.into_iter().enumerate() {
                        let _ = ack.send(Ok(base + i as u64));
                    }
                }
                Err(e) => {
                    for ack in acks {
                        let _ = ack.send(Err(e.clone()));
                    }
                }
            }
        })
        .detach();
    }
}
