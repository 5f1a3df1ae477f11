//! One shard: the state a single executor owns (its copy of the topic list, the partition logs
//! it owns) and the operations on it, local or forwarded to the owning shard over the mesh.
//!
//! Nothing here is shared with another thread: shards talk only through [`ShardMessage`]s.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::join_all;
use glommio::channels::channel_mesh::Senders;
use glommio::sync::Semaphore;

use super::config::BrokerConfig;
use super::messages::{PartitionOutcome, ShardMessage, TopicChange};
use super::metadata::{partition_dir, MetadataStore, TopicConfig, TopicMap, PRODUCER_ID_BLOCK};
use super::shard_metrics::ShardMetrics;
use super::subscription_registry::SubscriptionRegistry;
use crate::clock::now_ms;
use crate::placement::owner_of;
use crate::protocol::message::ApiError;
use crate::protocol::wire::ErrorCode;
use crate::record::batch::MAGIC_V2;
use crate::record::compression::{with_shard_compressor, with_shard_decompressor};
use crate::record::{Batch, BatchLimits, Codec, RecordError};
use crate::storage::producers::SequenceError;
use crate::storage::{
    FailureProbes, FetchedData, GroupCommit, LogConfig, PartitionLog, ShardSync, StorageError,
    SyncHealth,
};

/// Maps a storage error to the protocol's error codes: the one place where this happens.
pub fn storage_to_api(error: StorageError) -> ApiError {
    let code = match &error {
        StorageError::Io { .. } => ErrorCode::StorageError,
        StorageError::ReadOnly(_) => ErrorCode::ReadOnly,
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::NotABatchBoundary { .. } => ErrorCode::InvalidArgument,
        StorageError::Corrupt(_) => ErrorCode::CorruptData,
        StorageError::Sequence(SequenceError::OutOfOrder { .. }) => ErrorCode::OutOfOrderSequence,
        StorageError::Sequence(SequenceError::Fenced { .. }) => ErrorCode::ProducerFenced,
    };
    ApiError::new(code, error.to_string())
}

/// The state one executor owns.
pub struct Shard {
    /// This shard's index (its place in the mesh).
    pub id: usize,
    /// Number of shards in the broker.
    pub count: usize,
    /// Broker settings.
    pub config: Arc<BrokerConfig>,
    /// Fault injection for tests (empty in production).
    probes: Rc<FailureProbes>,
    /// The first failed sync on this shard's data device (see `storage::sync_health`).
    sync_health: Rc<SyncHealth>,
    /// The shard-wide syncer, with `--group-commit shard`.
    shard_sync: Option<Rc<ShardSync>>,
    /// What this shard counts.
    pub metrics: ShardMetrics,
    /// This shard's copy of the topic list, updated by messages from shard 0.
    topics: RefCell<TopicMap>,
    /// Partition logs this shard owns.
    logs: RefCell<HashMap<(String, u32), Rc<PartitionLog>>>,
    /// What could not be opened at start (a partition log, or one subscription's state of a
    /// partition), by [`failure_key`], with the error its requests get: the broker serves
    /// everything else, as Kafka takes one bad log directory offline.
    failed_at_start: RefCell<HashMap<String, ApiError>>,
    /// True while the shard opens what the catalog lists (failures are then recorded in
    /// `failed_at_start` instead of stopping the start).
    starting: Cell<bool>,
    mesh: Senders<ShardMessage>,
    /// Serializes topic creation and deletion (used on shard 0 only).
    topic_changes: Rc<Semaphore>,
    /// The next producer id to hand out and the end of its saved block (shard 0 only).
    producer_ids: Cell<(u64, u64)>,
    /// Client requests being handled on this shard, for a graceful shutdown.
    in_flight: Cell<usize>,
    /// Subscription definitions, the subscription state and consumer-group offsets of the
    /// partitions this shard owns.
    pub(super) subs: SubscriptionRegistry,
}

/// Counts one client request as in flight for as long as it lives.
pub struct RequestGuard<'a> {
    shard: &'a Shard,
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.shard.in_flight.set(self.shard.in_flight.get() - 1);
    }
}

impl Shard {
    /// Loads the topic list and opens (recovering) every partition log this shard owns.
    pub async fn start(
        config: Arc<BrokerConfig>,
        mesh: Senders<ShardMessage>,
    ) -> Result<Rc<Self>, String> {
        let id = mesh.peer_id();
        let count = mesh.nr_consumers().max(1);
        let store = MetadataStore::new(&config.data_dir);
        let catalog = store.load()?;
        // Ids of a block that was saved but not all handed out are skipped: the next id
        // given is past every id this broker could have given before.
        let producer_block_end = store.load_producer_id_block_end()?;
        if id == 0 {
            remove_unknown_topic_dirs(&config, &catalog.topics);
        }
        let probes = Rc::new(FailureProbes::from_env()?);
        if !probes.is_empty() && id == 0 {
            tracing::warn!("failure probes are armed (COREBUS_FAILURE_PROBES): test use only");
        }
        let metrics = ShardMetrics::default();
        let shard_sync = match config.group_commit {
            GroupCommit::Partition => None,
            GroupCommit::SharedFlush => {
                let syncer = ShardSync::disk_flush(&config.data_dir, Rc::clone(&metrics.storage))
                    .await
                    .map_err(|e| e.to_string())?;
                if syncer.is_none() && id == 0 {
                    tracing::warn!(
                        "--group-commit shared-flush: {} is not on ext4 or XFS, so every flush \
                         fdatasyncs its own file",
                        config.data_dir.display()
                    );
                }
                syncer
            }
            GroupCommit::Syncfs => {
                let storage_metrics = Rc::clone(&metrics.storage);
                let syncer = ShardSync::syncfs(&config.data_dir, storage_metrics)
                    .await
                    .map_err(|e| e.to_string())?;
                if syncer.is_none() && id == 0 {
                    tracing::warn!(
                        "--group-commit syncfs: {} is not on ext4 or XFS, where a syncfs can \
                         be followed by a known disk flush, so every flush fdatasyncs its own file",
                        config.data_dir.display()
                    );
                }
                syncer
            }
        };
        let shard = Rc::new(Self {
            id,
            count,
            probes,
            sync_health: Rc::new(SyncHealth::default()),
            shard_sync,
            metrics,
            config,
            topics: RefCell::new(TopicMap::new()),
            logs: RefCell::new(HashMap::new()),
            failed_at_start: RefCell::new(HashMap::new()),
            starting: Cell::new(true),
            mesh,
            topic_changes: Rc::new(Semaphore::new(1)),
            producer_ids: Cell::new((producer_block_end, producer_block_end)),
            in_flight: Cell::new(0),
            subs: SubscriptionRegistry::default(),
        });
        // The shards share the data device: the first failed sync this shard sees is told to
        // every other shard.
        let weak = Rc::downgrade(&shard);
        shard.sync_health.on_first_failure(Box::new(move |what| {
            if let Some(shard) = weak.upgrade() {
                let what = what.to_string();
                glommio::spawn_local(async move { shard.tell_device_failed(what).await }).detach();
            }
        }));
        for (name, config) in catalog.topics {
            shard
                .apply_topic_change(TopicChange::Created { name, config })
                .await
                .map_err(|e| e.to_string())?;
        }
        for ((topic, name), config) in catalog.subscriptions {
            shard
                .apply_topic_change(TopicChange::SubscriptionCreated {
                    topic,
                    name,
                    config,
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        shard.starting.set(false);
        Ok(shard)
    }

    /// Records what could not be opened at start; outside the start, the caller fails instead.
    /// True when recorded.
    pub(super) fn record_start_failure(&self, key: String, error: &ApiError) -> bool {
        if !self.starting.get() {
            return false;
        }
        tracing::error!(
            "{key} could not be opened and is offline until a restart: {}; the broker serves \
             everything else",
            error.message
        );
        self.metrics
            .failed_at_start
            .set(self.metrics.failed_at_start.get() + 1);
        let offline = ApiError::new(
            error.code,
            format!(
                "{key} is offline: it failed to open at start: {}",
                error.message
            ),
        );
        self.failed_at_start.borrow_mut().insert(key, offline);
        true
    }

    /// The error for requests to something that failed to open at start, if it did.
    pub(super) fn failed_at_start(&self, key: &str) -> Option<ApiError> {
        self.failed_at_start.borrow().get(key).cloned()
    }

    /// Marks a client request in flight until the guard is dropped.
    pub fn track_request(&self) -> RequestGuard<'_> {
        self.in_flight.set(self.in_flight.get() + 1);
        RequestGuard { shard: self }
    }

    /// Client requests being handled now.
    pub fn requests_in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// The shard's record of failed syncs on the data device.
    pub(super) fn sync_health(&self) -> Rc<SyncHealth> {
        Rc::clone(&self.sync_health)
    }

    /// Partition count of `topic`, if it exists.
    pub fn topic_partitions(&self, topic: &str) -> Option<u32> {
        self.topics.borrow().get(topic).map(|c| c.partitions)
    }

    /// The codec `topic` stores batches in; `None`: as producers send them.
    fn topic_compression(&self, topic: &str) -> Option<Codec> {
        self.topics.borrow().get(topic).and_then(|c| c.compression)
    }

    /// The storage settings of a topic's logs: the broker's, with the topic's overrides.
    fn log_config(&self, topic: &TopicConfig) -> LogConfig {
        let mut config = self.config.log_config(
            self.shard_sync.clone(),
            Rc::clone(&self.probes),
            Rc::clone(&self.sync_health),
            Rc::clone(&self.metrics.storage),
        );
        if topic.retention_ms.is_some() {
            config.retention_ms = topic.retention_ms;
        }
        if topic.retention_bytes.is_some() {
            config.retention_bytes = topic.retention_bytes;
        }
        config
    }

    /// Every log this shard owns, with its (topic, partition).
    pub fn logs_by_name(&self) -> Vec<((String, u32), Rc<PartitionLog>)> {
        self.logs
            .borrow()
            .iter()
            .map(|(k, v)| (k.clone(), Rc::clone(v)))
            .collect()
    }

    /// Every log this shard owns.
    pub fn logs(&self) -> Vec<Rc<PartitionLog>> {
        self.logs.borrow().values().cloned().collect()
    }

    /// The log of a partition this shard owns, if it does.
    pub fn owned_log(&self, topic: &str, partition: u32) -> Option<Rc<PartitionLog>> {
        self.logs
            .borrow()
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    /// A snapshot of the topic list.
    pub fn topics(&self) -> TopicMap {
        self.topics.borrow().clone()
    }

    /// Sends a message to another shard. Fails only if that shard has stopped.
    pub async fn send_to(&self, shard: usize, msg: ShardMessage) -> Result<(), ApiError> {
        self.mesh.send_to(shard, msg).await.map_err(|_| {
            ApiError::new(
                ErrorCode::ShardUnavailable,
                format!("shard {shard} is not reachable"),
            )
        })
    }

    /// Tells every other shard that a sync on the data device failed here.
    async fn tell_device_failed(&self, what: String) {
        for other in (0..self.count).filter(|&s| s != self.id) {
            let msg = ShardMessage::DeviceFailed {
                from: self.id,
                what: what.clone(),
            };
            if let Err(e) = self.send_to(other, msg).await {
                tracing::warn!("telling shard {other} of the failed sync: {}", e.message);
            }
        }
    }

    /// Sends a request to another shard and waits for its reply; `make` builds the message
    /// around the reply channel.
    pub async fn ask<T>(
        &self,
        shard: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> ShardMessage,
    ) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send_to(shard, make(reply)).await?;
        rx.await.map_err(|_| shard_gone(shard))
    }

    fn log(&self, topic: &str, partition: u32) -> Result<Rc<PartitionLog>, ApiError> {
        let Some(partitions) = self.topic_partitions(topic) else {
            return Err(unknown_topic(topic));
        };
        if partition >= partitions {
            return Err(ApiError::new(
                ErrorCode::UnknownPartition,
                format!("topic '{topic}' has {partitions} partitions; {partition} does not exist"),
            ));
        }
        self.logs
            .borrow()
            .get(&(topic.to_string(), partition))
            .cloned()
            .ok_or_else(|| {
                if let Some(e) = self.failed_at_start(&failure_key(topic, partition, None)) {
                    return e;
                }
                ApiError::new(
                    ErrorCode::Internal,
                    format!("shard {} does not own {topic}/{partition}", self.id),
                )
            })
    }

    // ------------------------------------------------------------------ produce

    /// Validates and appends batches to partitions this shard owns, then waits until each is
    /// durable. Partitions are processed concurrently; each partition's batches are all-or-none.
    pub async fn produce_local(
        &self,
        topic: &str,
        parts: Vec<(u32, Bytes)>,
    ) -> Vec<PartitionOutcome> {
        let appends = parts.into_iter().map(|(partition, bytes)| async move {
            (
                partition,
                self.produce_partition(topic, partition, bytes).await,
            )
        });
        join_all(appends).await
    }

    async fn produce_partition(
        &self,
        topic: &str,
        partition: u32,
        bytes: Bytes,
    ) -> Result<(u64, u64), ApiError> {
        let log = self.log(topic, partition)?;
        let limits = BatchLimits {
            max_records: self.config.max_batch_records,
            max_records_bytes: self.config.max_frame_bytes,
        };
        let mut batches = split_batches(&bytes, limits, self.config.max_batch_bytes)?;
        if let Some(codec) = self.topic_compression(topic) {
            recompress_all(&mut batches, codec)?;
        }
        let ticket = log
            .append(&batches, now_ms())
            .await
            .map_err(storage_to_api)?;
        ticket.durable().await.map_err(storage_to_api)
    }

    /// Produces to any partitions: local ones here, the rest forwarded to their owners.
    pub async fn produce(&self, topic: &str, parts: Vec<(u32, Bytes)>) -> Vec<PartitionOutcome> {
        let partitions = self.topic_partitions(topic);
        let mut by_shard: HashMap<usize, Vec<(u32, Bytes)>> = HashMap::new();
        let mut outcomes = Vec::with_capacity(parts.len());
        for (partition, bytes) in parts {
            match partitions {
                None => outcomes.push((partition, Err(unknown_topic(topic)))),
                Some(n) if partition >= n => outcomes.push((
                    partition,
                    Err(ApiError::new(
                        ErrorCode::UnknownPartition,
                        format!("topic '{topic}' has {n} partitions; {partition} does not exist"),
                    )),
                )),
                Some(_) => by_shard
                    .entry(owner_of(topic, partition, self.count))
                    .or_default()
                    .push((partition, bytes)),
            }
        }
        let groups = by_shard.into_iter().map(|(shard, parts)| async move {
            if shard == self.id {
                return self.produce_local(topic, parts).await;
            }
            let ids: Vec<u32> = parts.iter().map(|(p, _)| *p).collect();
            let result = self
                .ask(shard, |reply| ShardMessage::Produce {
                    topic: topic.to_string(),
                    parts,
                    reply,
                })
                .await;
            match result {
                Ok(outcomes) => outcomes,
                Err(e) => ids.into_iter().map(|p| (p, Err(e.clone()))).collect(),
            }
        });
        for group in join_all(groups).await {
            outcomes.extend(group);
        }
        outcomes
    }

    // ------------------------------------------------------------------ producer ids

    /// Hands out an idempotent producer identity: a new id at epoch 0, or `previous` at its
    /// next epoch. Ids come from shard 0, in blocks saved before use.
    pub async fn init_producer(
        &self,
        previous: Option<(u64, u16)>,
    ) -> Result<(u64, u16), ApiError> {
        if self.id != 0 {
            return self
                .ask(0, |reply| ShardMessage::InitProducer { previous, reply })
                .await?;
        }
        let _permit = self
            .topic_changes
            .acquire_permit(1)
            .await
            .map_err(|_| ApiError::new(ErrorCode::ShuttingDown, "broker is shutting down"))?;
        let (next, end) = self.producer_ids.get();
        if let Some((id, epoch)) = previous {
            if id >= next {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("producer id {id} was never handed out by this broker"),
                ));
            }
            let epoch = epoch.checked_add(1).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("producer {id} is at its last epoch; ask for a new id"),
                )
            })?;
            return Ok((id, epoch));
        }
        if next == end {
            let new_end = end + PRODUCER_ID_BLOCK;
            let store = MetadataStore::new(&self.config.data_dir);
            glommio::executor()
                .spawn_blocking(move || store.save_producer_id_block_end(new_end))
                .await
                .map_err(|e| ApiError::new(ErrorCode::StorageError, e))?;
            self.producer_ids.set((next, new_end));
        }
        let (next, end) = self.producer_ids.get();
        self.producer_ids.set((next + 1, end));
        Ok((next, 0))
    }

    // ------------------------------------------------------------------ fetch

    /// Reads from a partition this shard owns.
    pub async fn fetch_local(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<FetchedData, ApiError> {
        let log = self.log(topic, partition)?;
        let max_bytes = (max_bytes as usize).clamp(1, self.config.max_fetch_bytes);
        let wait = Duration::from_millis(u64::from(max_wait_ms.min(self.config.max_fetch_wait_ms)));
        match log.fetch(offset, max_bytes, wait).await {
            Err(StorageError::OffsetOutOfRange {
                log_start_offset,
                high_watermark,
                ..
            }) => Ok(FetchedData {
                high_watermark,
                log_start_offset,
                batches: Default::default(),
                out_of_range: true,
            }),
            other => other.map_err(storage_to_api),
        }
    }

    /// Reads from any partition, forwarding to its owner if needed.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<FetchedData, ApiError> {
        let Some(partitions) = self.topic_partitions(topic) else {
            return Err(unknown_topic(topic));
        };
        if partition >= partitions {
            return Err(ApiError::new(
                ErrorCode::UnknownPartition,
                format!("topic '{topic}' has {partitions} partitions; {partition} does not exist"),
            ));
        }
        let owner = owner_of(topic, partition, self.count);
        if owner == self.id {
            return self
                .fetch_local(topic, partition, offset, max_bytes, max_wait_ms)
                .await;
        }
        let (reply, rx) = oneshot::channel();
        let msg = ShardMessage::Fetch {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes,
            max_wait_ms,
            reply,
        };
        self.send_to(owner, msg).await?;
        rx.await.map_err(|_| shard_gone(owner))?
    }

    // ------------------------------------------------------------------ topics

    /// Creates or deletes a topic broker-wide. Runs on shard 0, which saves the new list and
    /// then applies the change on every shard before answering.
    pub async fn change_topic(&self, change: TopicChange) -> Result<(), ApiError> {
        if self.id != 0 {
            let (reply, rx) = oneshot::channel();
            self.send_to(0, ShardMessage::ChangeTopic { change, reply })
                .await?;
            return rx.await.map_err(|_| shard_gone(0))?;
        }
        let _permit = self
            .topic_changes
            .acquire_permit(1)
            .await
            .map_err(|_| ApiError::new(ErrorCode::ShuttingDown, "broker is shutting down"))?;
        let mut catalog = self.catalog();
        match &change {
            TopicChange::Created { name, config } => {
                if catalog.topics.contains_key(name) {
                    return Err(ApiError::new(
                        ErrorCode::TopicAlreadyExists,
                        format!("topic '{name}' already exists"),
                    ));
                }
                let partitions: u64 = catalog
                    .topics
                    .values()
                    .map(|t| u64::from(t.partitions))
                    .sum();
                if catalog.topics.len() >= self.config.max_topics {
                    return Err(ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "the broker holds its maximum of {} topics",
                            self.config.max_topics
                        ),
                    ));
                }
                if partitions + u64::from(config.partitions) > self.config.max_partitions_total {
                    return Err(ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "{} more partitions would exceed the broker's maximum of {} (it has {partitions})",
                            config.partitions, self.config.max_partitions_total
                        ),
                    ));
                }
                catalog.topics.insert(name.clone(), *config);
            }
            TopicChange::Deleted { name } => {
                if catalog.topics.remove(name).is_none() {
                    return Err(unknown_topic(name));
                }
                catalog.subscriptions.retain(|(t, _), _| t != name);
            }
            TopicChange::SubscriptionCreated { .. } | TopicChange::SubscriptionDeleted { .. } => {
                self.check_subscription_change(&mut catalog, &change)?;
            }
        }
        let store = MetadataStore::new(&self.config.data_dir);
        glommio::executor()
            .spawn_blocking(move || store.save(&catalog))
            .await
            .map_err(|e| ApiError::new(ErrorCode::StorageError, e))?;
        let applies = (0..self.count).map(|shard| {
            let change = change.clone();
            async move {
                if shard == self.id {
                    return self.apply_topic_change(change).await;
                }
                let (reply, rx) = oneshot::channel();
                self.send_to(shard, ShardMessage::ApplyTopic { change, reply })
                    .await?;
                rx.await.map_err(|_| shard_gone(shard))?
            }
        });
        for result in join_all(applies).await {
            result?;
        }
        if let TopicChange::Deleted { name } = &change {
            let dir = self.config.data_dir.join("topics").join(name);
            let _ = crate::storage::disk_trace::remove_dir_all(&dir);
        }
        Ok(())
    }

    /// Applies a topic change to this shard's state: opens or closes the logs it owns, and
    /// the subscription state of those partitions.
    pub async fn apply_topic_change(&self, change: TopicChange) -> Result<(), ApiError> {
        match change {
            TopicChange::Created { name, config } => {
                let log_config = Rc::new(self.log_config(&config));
                for partition in 0..config.partitions {
                    if owner_of(&name, partition, self.count) != self.id {
                        continue;
                    }
                    let dir = partition_dir(&self.config.data_dir, &name, partition);
                    let log = match PartitionLog::open(&dir, Rc::clone(&log_config)).await {
                        Ok(log) => log,
                        Err(e) => {
                            let e = storage_to_api(e);
                            let e = ApiError::new(
                                e.code,
                                format!("opening {name}/{partition}: {}", e.message),
                            );
                            if self.record_start_failure(failure_key(&name, partition, None), &e) {
                                continue;
                            }
                            return Err(e);
                        }
                    };
                    self.logs
                        .borrow_mut()
                        .insert((name.clone(), partition), log);
                }
                self.topics.borrow_mut().insert(name, config);
            }
            TopicChange::Deleted { name } => {
                self.topics.borrow_mut().remove(&name);
                self.drop_topic_subscriptions(&name);
                let owned: Vec<_> = {
                    let mut logs = self.logs.borrow_mut();
                    let keys: Vec<_> = logs.keys().filter(|(t, _)| *t == name).cloned().collect();
                    keys.into_iter().filter_map(|k| logs.remove(&k)).collect()
                };
                for log in owned {
                    log.close().await;
                    let _ = crate::storage::disk_trace::remove_dir_all(log.dir());
                }
            }
            TopicChange::SubscriptionCreated {
                topic,
                name,
                config,
            } => {
                self.apply_subscription_created(&topic, &name, config)
                    .await?;
            }
            TopicChange::SubscriptionDeleted { topic, name } => {
                self.apply_subscription_deleted(&topic, &name).await;
            }
        }
        Ok(())
    }

    /// Background upkeep of the logs this shard owns, until the task is dropped: checkpoints
    /// of the durable point (so that recovery after a crash scans little) and retention.
    pub async fn run_maintenance(self: Rc<Self>) {
        let checkpoint_every = Duration::from_millis(self.config.checkpoint_interval_ms.max(10));
        let retention_every = Duration::from_millis(self.config.retention_check_ms.max(10));
        let mut next_retention = std::time::Instant::now() + retention_every;
        loop {
            glommio::timer::sleep(checkpoint_every.min(retention_every)).await;
            for log in self.logs() {
                if let Err(e) = log.checkpoint().await {
                    tracing::error!("checkpoint of {} failed: {e}", log.dir().display());
                }
            }
            if std::time::Instant::now() >= next_retention {
                next_retention = std::time::Instant::now() + retention_every;
                let now = now_ms();
                for log in self.logs() {
                    let deleted = log.enforce_retention(now).await;
                    if deleted > 0 {
                        tracing::info!(
                            "retention deleted {deleted} segment(s) of {}; log starts at offset {}",
                            log.dir().display(),
                            log.log_start_offset()
                        );
                    }
                }
            }
        }
    }

    /// Stops accepting appends on every owned log and waits for their flushes.
    pub async fn close_logs(&self) {
        let logs: Vec<_> = self.logs.borrow().values().cloned().collect();
        join_all(logs.iter().map(|log| log.close())).await;
    }
}

/// Splits the bytes of one partition's produce into whole, validated batches.
fn split_batches(
    bytes: &Bytes,
    limits: BatchLimits,
    max_batch_bytes: usize,
) -> Result<Vec<Bytes>, ApiError> {
    let mut batches = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let header =
            crate::record::BatchHeader::parse(&bytes[at..]).map_err(|e| corrupt_batch(at, e))?;
        if header.batch_len() as usize > max_batch_bytes {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "batch of {} bytes exceeds the maximum of {max_batch_bytes} bytes",
                    header.batch_len()
                ),
            ));
        }
        let batch = with_shard_decompressor(|d| {
            Batch::validate(&bytes[at..], limits, d).map(|b| b.as_bytes().len())
        });
        let len = batch.map_err(|e| corrupt_batch(at, e))?;
        batches.push(bytes.slice(at..at + len));
        at += len;
    }
    if batches.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "produce carries no record batch",
        ));
    }
    let idempotent =
        |b: &Bytes| crate::record::BatchHeader::parse(b).is_ok_and(|h| h.producer().is_some());
    if batches.len() > 1 && batches.iter().any(idempotent) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "an idempotent producer's batch must be the only batch of its partition in a produce",
        ));
    }
    Ok(batches)
}

/// Rewrites the batches that are not in `codec` (the topic setting `compression`), on this
/// shard with its reused (de)compressor.
fn recompress_all(batches: &mut [Bytes], codec: Codec) -> Result<(), ApiError> {
    for bytes in batches.iter_mut() {
        let batch = Batch::trusted(bytes).map_err(|e| corrupt_batch(0, e))?;
        if batch.header().magic() == MAGIC_V2 && batch.header().codec() == Some(codec) {
            continue;
        }
        let rewritten = with_shard_decompressor(|d| {
            with_shard_compressor(|c| crate::record::batch::recompress(&batch, codec, d, c))
        })
        .map_err(|e| corrupt_batch(0, e))?;
        *bytes = Bytes::from(rewritten);
    }
    Ok(())
}

fn corrupt_batch(at: usize, e: RecordError) -> ApiError {
    ApiError::new(
        ErrorCode::CorruptBatch,
        format!("batch at byte {at} of the request: {e}"),
    )
}

fn unknown_topic(topic: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownTopic,
        format!("topic '{topic}' does not exist"),
    )
}

pub(crate) fn shard_gone(shard: usize) -> ApiError {
    ApiError::new(
        ErrorCode::ShardUnavailable,
        format!("shard {shard} dropped the request"),
    )
}

/// Names what failed to open at start: a partition, or one subscription's state of it.
pub(super) fn failure_key(topic: &str, partition: u32, subscription: Option<&str>) -> String {
    match subscription {
        None => format!("partition {topic}/{partition}"),
        Some(name) => format!("subscription {name} of {topic}/{partition}"),
    }
}

/// Removes the data of topics that are no longer in the metadata (a delete that crashed
/// half-way). Runs on shard 0 at start, before any log is opened.
fn remove_unknown_topic_dirs(config: &BrokerConfig, topics: &TopicMap) {
    let Ok(entries) = std::fs::read_dir(config.data_dir.join("topics")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !topics.contains_key(&name) {
            tracing::info!("removing data of deleted topic '{name}'");
            let _ = crate::storage::disk_trace::remove_dir_all(&entry.path());
        }
    }
}
