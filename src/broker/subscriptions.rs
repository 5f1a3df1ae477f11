//! The shard's side of subscriptions and consumer-group offsets: which subscriptions exist (a
//! copy of the catalog, replicated by topic changes), the per-partition subscription state of
//! the partitions this shard owns, and the operations on them — local, or fanned out and
//! forwarded to the owning shards over the mesh.
//!
//! Receive: the shard holding the connection asks the owners of the topic's partitions in
//! turn for events without waiting; when none has any and the receiver wants to wait, it asks
//! every owner to watch its partitions and tries again as soon as one reports an event (a
//! release, an expired lock, new data). Events are only ever locked by their owner, inside one
//! synchronous step, so concurrent receivers never get the same event while it is locked.
//!
//! Dead letters go through the ordinary produce path (forwarded if the dead-letter topic's
//! partition lives elsewhere) and are recorded as settled only after that append is durable.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::join_all;
use futures::Future;

use super::figures::SubscriptionFigures;
use super::messages::{SettleOutcome, ShardMessage, TopicChange};
use super::metadata::Catalog;
use super::shard::{failure_key, shard_gone, storage_to_api, Shard};
use crate::clock::now_ms;
use crate::groups::GroupOffsets;
use crate::placement::owner_of;
use crate::protocol::message::ApiError;
use crate::protocol::wire::ErrorCode;
use crate::record::{BatchBuilder, RecordIter, RecordWriter, V2_HEADER_LEN};
use crate::storage::disk_trace;
use crate::subscription::partition::{PartitionLimits, SettleAction, Settled};
use crate::subscription::{
    headers, DeadLetter, Delivered, LockToken, SubscriptionConfig, SubscriptionPartition,
};

/// Dead letters handled in one append.
const DEAD_LETTER_BATCH: usize = 500;
/// How long to wait before trying a failed dead-letter append again.
const DEAD_LETTER_RETRY_MS: i64 = 1_000;

/// What one round of dead-lettering did: the state-log sequence number that makes its
/// settles durable, and the error and events left over when an append failed.
struct DeadLetterRound {
    seq: u64,
    unfinished: Option<(ApiError, Vec<DeadLetter>)>,
}

impl DeadLetterRound {
    /// Folds in one append of the events `items[k]`, `k` in `in_batch`: its sequence number,
    /// or its error with those events and `later` left unfinished. True if it succeeded.
    fn record(
        &mut self,
        sent: Result<u64, ApiError>,
        in_batch: &[usize],
        later: &[DeadLetter],
        items: &[DeadLetter],
    ) -> bool {
        match sent {
            Ok(seq) => {
                self.seq = seq;
                true
            }
            Err(e) => {
                let rest = in_batch
                    .iter()
                    .map(|&k| items[k])
                    .chain(later.iter().copied());
                self.unfinished = Some((e, rest.collect()));
                false
            }
        }
    }
}

fn unknown_subscription(topic: &str, name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownSubscription,
        format!("subscription '{name}' does not exist on topic '{topic}'"),
    )
}

fn unknown_topic(topic: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownTopic,
        format!("topic '{topic}' does not exist"),
    )
}

fn rotate<T: Clone>(items: &[T], by: usize) -> Vec<T> {
    if items.is_empty() {
        return Vec::new();
    }
    let at = by % items.len();
    items[at..].iter().chain(&items[..at]).cloned().collect()
}

type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Builds the dead-letter copy of a stored record: the same event, with headers saying why,
/// from where and after how many deliveries.
fn dead_letter_record(
    builder: &mut BatchBuilder,
    raw: &[u8],
    sp: &SubscriptionPartition,
    dl: &DeadLetter,
    now: i64,
) -> bool {
    let Some(Ok(record)) = RecordIter::new(raw).next() else {
        return false;
    };
    let values = [
        (headers::REASON, dl.reason.as_str().to_string()),
        (headers::SUBSCRIPTION, sp.name.clone()),
        (headers::DELIVERY_COUNT, dl.delivery_count.to_string()),
        (headers::TOPIC, sp.topic.clone()),
        (headers::PARTITION, sp.partition.to_string()),
        (headers::OFFSET, dl.offset.to_string()),
        (headers::TIME, now.to_string()),
    ];
    let mut all: Vec<(&[u8], &[u8])> = record
        .headers()
        .filter(|(k, _)| !values.iter().any(|(n, _)| n.as_bytes() == *k))
        .collect();
    all.extend(values.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (id, source, event_type, subject) = (
        lossy(record.id),
        lossy(record.source),
        lossy(record.event_type),
        lossy(record.subject),
    );
    builder.push(&RecordWriter {
        timestamp_ms: record.timestamp_ms,
        key: record.key,
        value: record.value,
        id: &id,
        source: &source,
        event_type: &event_type,
        subject: &subject,
        headers: &all,
    });
    true
}

impl Shard {
    fn limits(&self) -> PartitionLimits {
        PartitionLimits {
            max_unsettled: self.config.max_unsettled_per_partition,
            durability: self.config.durability,
            sync_health: self.sync_health(),
        }
    }

    /// The definition of a subscription, if it exists.
    pub fn subscription(&self, topic: &str, name: &str) -> Option<SubscriptionConfig> {
        self.subs
            .definitions
            .borrow()
            .get(&(topic.to_string(), name.to_string()))
            .cloned()
    }

    /// The subscriptions of a topic, by name.
    pub fn subscriptions_of(&self, topic: &str) -> Vec<(String, SubscriptionConfig)> {
        self.subs
            .definitions
            .borrow()
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, n), c)| (n.clone(), c.clone()))
            .collect()
    }

    /// The catalog as this shard knows it (topics and subscriptions).
    pub(super) fn catalog(&self) -> Catalog {
        Catalog {
            topics: self.topics(),
            subscriptions: self.subs.definitions.borrow().clone(),
        }
    }

    fn sub_partition(
        &self,
        topic: &str,
        name: &str,
        partition: u32,
    ) -> Option<Rc<SubscriptionPartition>> {
        self.subs
            .partitions
            .borrow()
            .get(&(topic.to_string(), name.to_string(), partition))
            .cloned()
    }

    /// Checks a subscription change against the catalog and applies it there (shard 0,
    /// before saving).
    pub(super) fn check_subscription_change(
        &self,
        catalog: &mut Catalog,
        change: &TopicChange,
    ) -> Result<(), ApiError> {
        match change {
            TopicChange::SubscriptionCreated {
                topic,
                name,
                config,
            } => {
                if !catalog.topics.contains_key(topic) {
                    return Err(unknown_topic(topic));
                }
                let key = (topic.clone(), name.clone());
                if catalog.subscriptions.contains_key(&key) {
                    return Err(ApiError::new(
                        ErrorCode::SubscriptionAlreadyExists,
                        format!("subscription '{name}' already exists on topic '{topic}'"),
                    ));
                }
                let count = catalog
                    .subscriptions
                    .keys()
                    .filter(|(t, _)| t == topic)
                    .count();
                if count >= self.config.max_subscriptions_per_topic {
                    return Err(ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "topic '{topic}' has {count} subscriptions, the most allowed (--max-subscriptions-per-topic)"
                        ),
                    ));
                }
                if let Some(dl) = &config.dead_letter_topic {
                    if dl == topic {
                        return Err(ApiError::new(
                            ErrorCode::InvalidArgument,
                            "a topic cannot be its own dead-letter topic",
                        ));
                    }
                    if !catalog.topics.contains_key(dl) {
                        return Err(ApiError::new(
                            ErrorCode::UnknownTopic,
                            format!("dead-letter topic '{dl}' does not exist"),
                        ));
                    }
                }
                catalog.subscriptions.insert(key, config.clone());
            }
            TopicChange::SubscriptionDeleted { topic, name } => {
                if catalog
                    .subscriptions
                    .remove(&(topic.clone(), name.clone()))
                    .is_none()
                {
                    return Err(unknown_subscription(topic, name));
                }
            }
            TopicChange::Created { .. } | TopicChange::Deleted { .. } => {}
        }
        Ok(())
    }

    /// Applies a subscription creation on this shard: opens (or creates) its state for every
    /// partition this shard owns.
    pub(super) async fn apply_subscription_created(
        &self,
        topic: &str,
        name: &str,
        config: SubscriptionConfig,
    ) -> Result<(), ApiError> {
        let config = Rc::new(config);
        self.subs
            .definitions
            .borrow_mut()
            .insert((topic.to_string(), name.to_string()), (*config).clone());
        let partitions = self.topic_partitions(topic).unwrap_or(0);
        for partition in 0..partitions {
            let Some(log) = self.owned_log(topic, partition) else {
                continue;
            };
            let dir = log.dir().to_path_buf();
            let opened = SubscriptionPartition::open(
                &dir,
                topic,
                name,
                partition,
                Rc::clone(&config),
                log,
                self.limits(),
            )
            .await;
            let sp = match opened {
                Ok(sp) => sp,
                Err(e) => {
                    let e = storage_to_api(e);
                    let e = ApiError::new(
                        e.code,
                        format!(
                            "opening subscription {name} of {topic}/{partition}: {}",
                            e.message
                        ),
                    );
                    if self.record_start_failure(failure_key(topic, partition, Some(name)), &e) {
                        continue;
                    }
                    return Err(e);
                }
            };
            self.subs
                .partitions
                .borrow_mut()
                .insert((topic.to_string(), name.to_string(), partition), sp);
        }
        Ok(())
    }

    /// Applies a subscription deletion on this shard: its state files are removed.
    pub(super) async fn apply_subscription_deleted(&self, topic: &str, name: &str) {
        self.subs
            .definitions
            .borrow_mut()
            .remove(&(topic.to_string(), name.to_string()));
        let removed: Vec<_> = {
            let mut parts = self.subs.partitions.borrow_mut();
            let keys: Vec<_> = parts
                .keys()
                .filter(|(t, n, _)| t == topic && n == name)
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| parts.remove(&k)).collect()
        };
        for sp in removed {
            sp.remove().await;
        }
    }

    /// Forgets the subscriptions and group offsets of a deleted topic (their files go with
    /// the topic's directory).
    pub(super) fn drop_topic_subscriptions(&self, topic: &str) {
        self.subs
            .definitions
            .borrow_mut()
            .retain(|(t, _), _| t != topic);
        let removed: Vec<_> = {
            let mut parts = self.subs.partitions.borrow_mut();
            let keys: Vec<_> = parts
                .keys()
                .filter(|(t, _, _)| t == topic)
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| parts.remove(&k)).collect()
        };
        for sp in removed {
            sp.close();
        }
        self.subs.groups.borrow_mut().retain(|(t, _), _| t != topic);
    }

    fn next_rotation(&self) -> usize {
        let r = self.subs.rotation.get();
        self.subs.rotation.set(r.wrapping_add(1));
        r
    }

    /// The owners of a topic's partitions: (shard, its partitions), starting at a rotating
    /// place.
    fn owners(&self, topic: &str, partitions: u32) -> Vec<(usize, Vec<u32>)> {
        let mut by_shard: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for p in 0..partitions {
            by_shard
                .entry(owner_of(topic, p, self.count))
                .or_default()
                .push(p);
        }
        let list: Vec<_> = by_shard.into_iter().collect();
        rotate(&list, self.next_rotation())
    }

    // ------------------------------------------------------------------ receive

    /// Receives up to `max_events` events of a subscription from any of its partitions,
    /// waiting up to `max_wait_ms` for the first one.
    pub async fn receive(
        &self,
        topic: &str,
        name: &str,
        max_events: u32,
        max_wait_ms: u32,
    ) -> Result<Vec<Delivered>, ApiError> {
        let Some(partitions) = self.topic_partitions(topic) else {
            return Err(unknown_topic(topic));
        };
        if self.subscription(topic, name).is_none() {
            return Err(unknown_subscription(topic, name));
        }
        let max = max_events.clamp(1, self.config.max_receive_events) as usize;
        let max_bytes = self.config.max_receive_bytes;
        let wait = Duration::from_millis(u64::from(max_wait_ms.min(self.config.max_fetch_wait_ms)));
        let deadline = Instant::now() + wait;
        let owners = self.owners(topic, partitions);
        loop {
            let mut out: Vec<Delivered> = Vec::new();
            let mut bytes = 0usize;
            let mut failure = None;
            for (shard, parts) in &owners {
                if out.len() >= max || bytes >= max_bytes {
                    break;
                }
                let got = self
                    .receive_on(
                        *shard,
                        topic,
                        name,
                        parts.clone(),
                        max - out.len(),
                        max_bytes - bytes,
                    )
                    .await;
                match got {
                    Ok(events) => {
                        bytes += events.iter().map(|e| e.record.len()).sum::<usize>();
                        out.extend(events);
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
            // Events already locked are handed out even if another owner failed.
            if !out.is_empty() {
                return Ok(out);
            }
            if let Some(e) = failure {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(out);
            }
            self.wait_any(topic, name, &owners, deadline - now).await;
        }
    }

    async fn receive_on(
        &self,
        shard: usize,
        topic: &str,
        name: &str,
        partitions: Vec<u32>,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivered>, ApiError> {
        if shard == self.id {
            return self
                .receive_local(topic, name, &partitions, max_events, max_bytes)
                .await;
        }
        let (reply, rx) = oneshot::channel();
        let msg = ShardMessage::Receive {
            topic: topic.to_string(),
            subscription: name.to_string(),
            partitions,
            max_events,
            max_bytes,
            reply,
        };
        self.send_to(shard, msg).await?;
        rx.await.map_err(|_| shard_gone(shard))?
    }

    /// Locks up to `max_events` events on partitions this shard owns, without waiting, and
    /// returns them once their locks are durable.
    pub async fn receive_local(
        &self,
        topic: &str,
        name: &str,
        partitions: &[u32],
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivered>, ApiError> {
        let sps: Vec<_> = rotate(partitions, self.next_rotation())
            .into_iter()
            .filter_map(|p| self.sub_partition(topic, name, p))
            .collect();
        if sps.is_empty() && self.subscription(topic, name).is_none() {
            return Err(unknown_subscription(topic, name));
        }
        let mut out: Vec<Delivered> = Vec::new();
        let mut bytes = 0usize;
        let mut touched = Vec::new();
        // Partitions whose state failed to open at start: reported when nothing else is.
        let mut failure = partitions.iter().find_map(|&p| {
            self.failed_at_start(&failure_key(topic, p, Some(name)))
                .or_else(|| self.failed_at_start(&failure_key(topic, p, None)))
        });
        for sp in sps {
            if out.len() >= max_events || bytes >= max_bytes {
                break;
            }
            match sp.receive(max_events - out.len(), max_bytes - bytes).await {
                Ok(events) => {
                    if !events.is_empty() {
                        touched.push((Rc::clone(&sp), sp.last_seq()));
                    }
                    bytes += events.iter().map(|e| e.record.len()).sum::<usize>();
                    out.extend(events);
                }
                Err(e) => {
                    tracing::warn!(
                        "receive from {topic}/{} for subscription {name} failed: {e}",
                        sp.partition
                    );
                    failure.get_or_insert(storage_to_api(e));
                }
            }
        }
        if out.is_empty() {
            if let Some(e) = failure {
                return Err(e);
            }
        }
        // The locks (and delivery counts) must be durable before anyone sees the events.
        let waits = touched.iter().map(|(sp, seq)| sp.durable(*seq));
        for result in join_all(waits).await {
            result.map_err(storage_to_api)?;
        }
        Ok(out)
    }

    /// Waits until one owner has an event to deliver or `wait` passes.
    async fn wait_any(
        &self,
        topic: &str,
        name: &str,
        owners: &[(usize, Vec<u32>)],
        wait: Duration,
    ) {
        let mut waits: Vec<LocalFuture<'_, bool>> = Vec::with_capacity(owners.len());
        for (shard, parts) in owners {
            if *shard == self.id {
                waits.push(Box::pin(self.wait_local(topic, name, parts, wait)));
                continue;
            }
            let (reply, rx) = oneshot::channel();
            let msg = ShardMessage::WaitDeliverable {
                topic: topic.to_string(),
                subscription: name.to_string(),
                partitions: parts.clone(),
                wait_ms: wait.as_millis() as u64,
                reply,
            };
            let shard = *shard;
            waits.push(Box::pin(async move {
                if self.send_to(shard, msg).await.is_err() {
                    glommio::timer::sleep(wait).await;
                    return false;
                }
                rx.await.unwrap_or(false)
            }));
        }
        while !waits.is_empty() {
            let (ready, _, rest) = futures::future::select_all(waits).await;
            if ready {
                return; // dropping the rest hangs up on the other owners
            }
            waits = rest;
        }
    }

    /// Waits until one of `partitions` (owned here) has an event to deliver (true) or `wait`
    /// passes (false).
    pub async fn wait_local(
        &self,
        topic: &str,
        name: &str,
        partitions: &[u32],
        wait: Duration,
    ) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let sps: Vec<_> = partitions
                .iter()
                .filter_map(|&p| self.sub_partition(topic, name, p))
                .collect();
            if sps.is_empty() {
                return false;
            }
            let now_wall = now_ms();
            if sps.iter().any(|sp| sp.deliverable(now_wall)) {
                return true;
            }
            if sps.iter().any(|sp| sp.is_closed()) {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let mut slice = deadline - now;
            if let Some(due) = sps.iter().filter_map(|sp| sp.next_due_ms()).min() {
                let until_due = Duration::from_millis(due.saturating_sub(now_wall).max(1) as u64);
                slice = slice.min(until_due);
            }
            let mut signals: Vec<LocalFuture<'_, ()>> = Vec::new();
            for sp in &sps {
                let waiter = sp.waiter();
                signals.push(Box::pin(async move {
                    let _ = waiter.await;
                }));
                let sp = Rc::clone(sp);
                signals.push(Box::pin(async move { sp.wait_for_data(slice).await }));
            }
            signals.push(Box::pin(glommio::timer::sleep(slice)));
            let _ = futures::future::select_all(signals).await;
        }
    }

    // ------------------------------------------------------------------ settle

    /// Acks, releases, rejects or renews events by their lock tokens; one outcome per token,
    /// in order.
    pub async fn settle(
        &self,
        topic: &str,
        name: &str,
        action: SettleAction,
        tokens: Vec<LockToken>,
    ) -> Result<Vec<SettleOutcome>, ApiError> {
        let Some(partitions) = self.topic_partitions(topic) else {
            return Err(unknown_topic(topic));
        };
        if self.subscription(topic, name).is_none() {
            return Err(unknown_subscription(topic, name));
        }
        let mut results: Vec<Option<SettleOutcome>> = vec![None; tokens.len()];
        let mut by_shard: BTreeMap<usize, Vec<(usize, LockToken)>> = BTreeMap::new();
        for (i, token) in tokens.into_iter().enumerate() {
            if token.partition >= partitions {
                results[i] = Some(Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "lock token {token} names partition {} of a topic with {partitions}",
                        token.partition
                    ),
                )));
                continue;
            }
            by_shard
                .entry(owner_of(topic, token.partition, self.count))
                .or_default()
                .push((i, token));
        }
        let groups = by_shard.into_iter().map(|(shard, tokens)| async move {
            if shard == self.id {
                return self.settle_local(topic, name, action, tokens).await;
            }
            let ids: Vec<usize> = tokens.iter().map(|(i, _)| *i).collect();
            let (reply, rx) = oneshot::channel();
            let msg = ShardMessage::Settle {
                topic: topic.to_string(),
                subscription: name.to_string(),
                action,
                tokens,
                reply,
            };
            let outcome = match self.send_to(shard, msg).await {
                Ok(()) => rx.await.map_err(|_| shard_gone(shard)),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(list) => list,
                Err(e) => ids.into_iter().map(|i| (i, Err(e.clone()))).collect(),
            }
        });
        for list in join_all(groups).await {
            for (i, outcome) in list {
                if let Some(slot) = results.get_mut(i) {
                    *slot = Some(outcome);
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ApiError::new(ErrorCode::Internal, "no outcome"))))
            .collect())
    }

    /// Settles tokens of partitions this shard owns. Every outcome is durable before it is
    /// returned: acks, releases and renewals in the state log, rejections in the dead-letter
    /// topic and then the state log.
    pub async fn settle_local(
        &self,
        topic: &str,
        name: &str,
        action: SettleAction,
        tokens: Vec<(usize, LockToken)>,
    ) -> Vec<(usize, SettleOutcome)> {
        let mut results = Vec::with_capacity(tokens.len());
        // (token index, partition, state-log sequence, new lock end, event offset)
        type Recorded = (usize, Rc<SubscriptionPartition>, u64, Option<i64>, u64);
        let mut recorded: Vec<Recorded> = Vec::new();
        type Rejected = (Rc<SubscriptionPartition>, Vec<(usize, DeadLetter)>);
        let mut rejected: BTreeMap<u32, Rejected> = BTreeMap::new();
        for (i, token) in tokens {
            let Some(sp) = self.sub_partition(topic, name, token.partition) else {
                results.push((i, Err(unknown_subscription(topic, name))));
                continue;
            };
            match sp.settle(token, action) {
                Ok(Settled::Recorded {
                    seq,
                    locked_until_ms,
                }) => recorded.push((i, sp, seq, locked_until_ms, token.offset)),
                Ok(Settled::DeadLetter(dl)) => rejected
                    .entry(token.partition)
                    .or_insert_with(|| (Rc::clone(&sp), Vec::new()))
                    .1
                    .push((i, dl)),
                Err(e) => results.push((
                    i,
                    Err(ApiError::new(
                        ErrorCode::LockLost,
                        format!("lock token {token}: {e}"),
                    )),
                )),
            }
        }
        // One wait per partition, for its highest record.
        let mut highest: BTreeMap<u32, (Rc<SubscriptionPartition>, u64)> = BTreeMap::new();
        for (_, sp, seq, _, _) in &recorded {
            let entry = highest
                .entry(sp.partition)
                .or_insert_with(|| (Rc::clone(sp), *seq));
            entry.1 = entry.1.max(*seq);
        }
        let waits = highest
            .into_values()
            .map(|(sp, seq)| async move { (sp.partition, sp.durable(seq).await) });
        let durable: BTreeMap<u32, Result<(), ApiError>> = join_all(waits)
            .await
            .into_iter()
            .map(|(p, r)| (p, r.map_err(storage_to_api)))
            .collect();
        for (i, sp, _, until, offset) in recorded {
            let outcome = match durable.get(&sp.partition) {
                Some(Err(e)) => Err(e.clone()),
                _ => Ok(until),
            };
            if outcome.is_ok() && action == SettleAction::Ack {
                disk_trace::instant(|| disk_trace::Op::Note {
                    text: format!("settled {topic} {name} {} {offset}", sp.partition),
                });
            }
            results.push((i, outcome));
        }
        for (_, (sp, items)) in rejected {
            let dls: Vec<DeadLetter> = items.iter().map(|(_, dl)| *dl).collect();
            let round = self.dead_letter(&sp, dls).await;
            let durable = sp.durable(round.seq).await.map_err(storage_to_api);
            let unfinished = round.unfinished.map(|(e, rest)| {
                let offsets: Vec<u64> = rest.iter().map(|dl| dl.offset).collect();
                // Still on its way: the sweeper tries again.
                sp.requeue_dead_letters(rest);
                (e, offsets)
            });
            for (i, dl) in items {
                let outcome = match &unfinished {
                    Some((e, offsets)) if offsets.contains(&dl.offset) => Err(e.clone()),
                    _ => durable.clone(),
                };
                results.push((i, outcome.map(|()| None)));
            }
        }
        results
    }

    // ------------------------------------------------------------------ dead letters

    /// Appends events to the subscription's dead-letter topic (or drops them without one)
    /// and records them as settled, in batches of at most `--max-batch-bytes`. An event whose
    /// dead letter would not fit in a batch even alone is dropped, logged and counted with the
    /// subscription's dropped events. The round's state-log sequence number is the one to
    /// wait for; an append that fails leaves its events and every later one unfinished.
    async fn dead_letter(
        &self,
        sp: &Rc<SubscriptionPartition>,
        mut items: Vec<DeadLetter>,
    ) -> DeadLetterRound {
        items.sort_by_key(|d| d.offset);
        items.dedup_by_key(|d| d.offset);
        let mut round = DeadLetterRound {
            seq: sp.last_seq(),
            unfinished: None,
        };
        let offsets: Vec<u64> = items.iter().map(|d| d.offset).collect();
        let records = match sp.read_records(&offsets).await {
            Ok(records) => records,
            Err(e) => {
                round.unfinished = Some((storage_to_api(e), items));
                return round;
            }
        };
        let target = sp
            .config
            .dead_letter_topic
            .as_ref()
            .and_then(|t| self.topic_partitions(t).map(|n| (t.clone(), n)));
        let Some((dl_topic, dl_partitions)) = target else {
            for dl in &items {
                if let Some(t) = &sp.config.dead_letter_topic {
                    tracing::warn!(
                        "{}/{} subscription {}: dead-letter topic '{t}' is gone; event {} dropped",
                        sp.topic,
                        sp.partition,
                        sp.name,
                        dl.offset
                    );
                }
                round.seq = sp.settle_dead_letter(dl.offset, false);
            }
            return round;
        };
        let partition = sp.partition % dl_partitions.max(1);
        let limit = self.config.max_batch_bytes;
        let now = now_ms();
        let drop = |dl: &DeadLetter, why: &str| {
            tracing::warn!(
                "{}/{} subscription {}: event {} {why}; dropped",
                sp.topic,
                sp.partition,
                sp.name,
                dl.offset
            );
            sp.settle_dead_letter(dl.offset, false)
        };
        let (mut batch, mut scratch) = (BatchBuilder::new(), BatchBuilder::new());
        // Indexes into `items` of the events in `batch`.
        let mut in_batch: Vec<usize> = Vec::new();
        for (i, dl) in items.iter().enumerate() {
            let Some(raw) = records.get(&dl.offset) else {
                round.seq = drop(dl, "is gone from the log");
                continue;
            };
            // Measured alone first: whether it fits decides where it goes.
            if !dead_letter_record(&mut scratch, raw, sp, dl, now) {
                round.seq = drop(dl, "can not be read as a record");
                continue;
            }
            let alone = scratch.size_bytes();
            let record_bytes = alone - V2_HEADER_LEN;
            scratch.finish();
            if alone > limit {
                let why =
                    format!("makes a dead letter of {alone} bytes, over --max-batch-bytes {limit}");
                round.seq = drop(dl, &why);
                continue;
            }
            if !in_batch.is_empty() && batch.size_bytes() + record_bytes > limit {
                let sent = self
                    .append_dead_letters(sp, &dl_topic, partition, &mut batch, &in_batch, &items)
                    .await;
                if !round.record(sent, &in_batch, &items[i..], &items) {
                    return round;
                }
                in_batch.clear();
            }
            dead_letter_record(&mut batch, raw, sp, dl, now);
            in_batch.push(i);
        }
        if !in_batch.is_empty() {
            let sent = self
                .append_dead_letters(sp, &dl_topic, partition, &mut batch, &in_batch, &items)
                .await;
            round.record(sent, &in_batch, &[], &items);
        }
        round
    }

    /// Appends one finished batch of dead letters (the events `items[k]` for `k` in
    /// `in_batch`) and records them as settled: the state-log sequence number, or the error.
    async fn append_dead_letters(
        &self,
        sp: &Rc<SubscriptionPartition>,
        dl_topic: &str,
        partition: u32,
        batch: &mut BatchBuilder,
        in_batch: &[usize],
        items: &[DeadLetter],
    ) -> Result<u64, ApiError> {
        let bytes = Bytes::from(batch.finish());
        let outcome = self.produce(dl_topic, vec![(partition, bytes)]).await;
        let dead_lettered = match outcome.into_iter().next() {
            Some((_, Ok(_))) => true,
            // The topic was deleted meanwhile: nowhere to put them.
            Some((_, Err(e))) if e.code == ErrorCode::UnknownTopic => false,
            Some((_, Err(e))) => return Err(e),
            None => {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    "dead-letter produce returned no outcome",
                ))
            }
        };
        let mut seq = sp.last_seq();
        for &k in in_batch {
            seq = sp.settle_dead_letter(items[k].offset, dead_lettered);
        }
        Ok(seq)
    }

    async fn process_dead_letters(self: Rc<Self>, sp: Rc<SubscriptionPartition>) {
        loop {
            let items = sp.take_dead_letters(DEAD_LETTER_BATCH);
            if items.is_empty() {
                break;
            }
            let round = self.dead_letter(&sp, items).await;
            // What was not appended goes back first, whatever the wait below brings.
            let failed = round.unfinished.map(|(e, rest)| {
                tracing::warn!(
                    "{}/{} subscription {}: dead-lettering {} events failed ({e}); retrying",
                    sp.topic,
                    sp.partition,
                    sp.name,
                    rest.len()
                );
                sp.requeue_dead_letters(rest);
                sp.dead_letter_retry_ms.set(now_ms() + DEAD_LETTER_RETRY_MS);
            });
            if let Err(e) = sp.durable(round.seq).await {
                tracing::warn!(
                    "{}/{} subscription {}: recording dead letters failed: {e}",
                    sp.topic,
                    sp.partition,
                    sp.name
                );
                break;
            }
            if failed.is_some() {
                break;
            }
        }
        sp.dead_lettering.set(false);
    }

    /// Background upkeep of the subscriptions this shard owns, until the task is dropped:
    /// expired locks and ended delays are applied (waking waiting receivers), and events due
    /// for dead-lettering are sent on.
    pub async fn run_subscription_sweeper(self: Rc<Self>) {
        let every = Duration::from_millis(self.config.subscription_sweep_ms.max(1));
        loop {
            glommio::timer::sleep(every).await;
            let now = now_ms();
            let sps: Vec<_> = self.subs.partitions.borrow().values().cloned().collect();
            for sp in sps {
                if sp.is_closed() {
                    continue;
                }
                sp.tick(now);
                if sp.has_dead_letters()
                    && !sp.dead_lettering.get()
                    && sp.dead_letter_retry_ms.get() <= now
                {
                    sp.dead_lettering.set(true);
                    let shard = Rc::clone(&self);
                    glommio::spawn_local(shard.process_dead_letters(sp)).detach();
                }
            }
        }
    }

    // ------------------------------------------------------------------ stats

    /// The figures of a subscription over the partitions this shard owns.
    pub fn stats_local(&self, topic: &str, name: &str) -> SubscriptionFigures {
        let mut sum = SubscriptionFigures::default();
        let sps: Vec<_> = self
            .subs
            .partitions
            .borrow()
            .iter()
            .filter(|((t, n, _), _)| t == topic && n == name)
            .map(|(_, sp)| Rc::clone(sp))
            .collect();
        for sp in sps {
            let (locked, backlog, counters) = sp.stats();
            sum += SubscriptionFigures {
                locked,
                backlog,
                acked: counters.acked,
                dead_lettered: counters.dead_lettered,
                dropped: counters.dropped,
                lost: counters.lost,
            };
        }
        sum
    }

    /// The figures of a subscription over all its partitions.
    pub async fn subscription_stats(&self, topic: &str, name: &str) -> SubscriptionFigures {
        let asks = (0..self.count).map(|shard| async move {
            if shard == self.id {
                return self.stats_local(topic, name);
            }
            let (reply, rx) = oneshot::channel();
            let msg = ShardMessage::SubscriptionStats {
                topic: topic.to_string(),
                subscription: name.to_string(),
                reply,
            };
            if self.send_to(shard, msg).await.is_err() {
                return SubscriptionFigures::default();
            }
            rx.await.unwrap_or_default()
        });
        let mut sum = SubscriptionFigures::default();
        for figures in join_all(asks).await {
            sum += figures;
        }
        sum
    }

    // ------------------------------------------------------------------ group offsets

    async fn group_offsets(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Rc<GroupOffsets>, ApiError> {
        let key = (topic.to_string(), partition);
        if let Some(g) = self.subs.groups.borrow().get(&key) {
            return Ok(Rc::clone(g));
        }
        let _permit = self
            .subs
            .groups_opening
            .acquire_permit(1)
            .await
            .map_err(|_| ApiError::new(ErrorCode::ShuttingDown, "broker is shutting down"))?;
        if let Some(g) = self.subs.groups.borrow().get(&key) {
            return Ok(Rc::clone(g));
        }
        let Some(log) = self.owned_log(topic, partition) else {
            if let Some(e) = self.failed_at_start(&failure_key(topic, partition, None)) {
                return Err(e);
            }
            return Err(ApiError::new(
                ErrorCode::UnknownPartition,
                format!("{topic}/{partition} is not a partition this shard owns"),
            ));
        };
        let dir = log.dir().to_path_buf();
        let groups = GroupOffsets::open(&dir, self.config.durability, self.sync_health())
            .await
            .map_err(storage_to_api)?;
        if self.topic_partitions(topic).is_none() {
            return Err(unknown_topic(topic)); // deleted meanwhile
        }
        self.subs
            .groups
            .borrow_mut()
            .insert(key, Rc::clone(&groups));
        Ok(groups)
    }

    fn check_partition(&self, topic: &str, partition: u32) -> Result<(), ApiError> {
        match self.topic_partitions(topic) {
            None => Err(unknown_topic(topic)),
            Some(n) if partition >= n => Err(ApiError::new(
                ErrorCode::UnknownPartition,
                format!("topic '{topic}' has {n} partitions; {partition} does not exist"),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Commits offsets of partitions this shard owns, durably.
    pub async fn commit_offsets_local(
        &self,
        group: &str,
        topic: &str,
        offsets: Vec<(u32, u64)>,
    ) -> Vec<(u32, Result<(), ApiError>)> {
        let commits = offsets.into_iter().map(|(partition, offset)| async move {
            let result = async {
                self.check_partition(topic, partition)?;
                let groups = self.group_offsets(topic, partition).await?;
                let max = self.config.max_groups_per_partition;
                if !groups.admits(group, max) {
                    return Err(ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "{topic}/{partition} already has offsets of {max} consumer groups \
                             (--max-groups-per-partition)"
                        ),
                    ));
                }
                groups.commit(group, offset).await.map_err(storage_to_api)
            }
            .await;
            (partition, result)
        });
        join_all(commits).await
    }

    /// Reads committed offsets of partitions this shard owns.
    pub async fn fetch_offsets_local(
        &self,
        group: &str,
        topic: &str,
        partitions: Vec<u32>,
    ) -> Vec<(u32, Result<Option<u64>, ApiError>)> {
        let mut out = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let result = async {
                self.check_partition(topic, partition)?;
                let groups = self.group_offsets(topic, partition).await?;
                Ok(groups.get(group))
            }
            .await;
            out.push((partition, result));
        }
        out
    }

    /// Commits offsets of any partitions, forwarding to their owners.
    pub async fn commit_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: Vec<(u32, u64)>,
    ) -> Vec<(u32, Result<(), ApiError>)> {
        let mut by_shard: BTreeMap<usize, Vec<(u32, u64)>> = BTreeMap::new();
        for (p, o) in offsets {
            by_shard
                .entry(owner_of(topic, p, self.count))
                .or_default()
                .push((p, o));
        }
        let groups = by_shard.into_iter().map(|(shard, offsets)| async move {
            if shard == self.id {
                return self.commit_offsets_local(group, topic, offsets).await;
            }
            let ids: Vec<u32> = offsets.iter().map(|(p, _)| *p).collect();
            let outcome = self
                .ask(shard, |reply| ShardMessage::CommitOffsets {
                    group: group.to_string(),
                    topic: topic.to_string(),
                    offsets,
                    reply,
                })
                .await;
            match outcome {
                Ok(list) => list,
                Err(e) => ids.into_iter().map(|p| (p, Err(e.clone()))).collect(),
            }
        });
        join_all(groups).await.into_iter().flatten().collect()
    }

    /// Reads committed offsets of any partitions, forwarding to their owners.
    pub async fn fetch_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: Vec<u32>,
    ) -> Vec<(u32, Result<Option<u64>, ApiError>)> {
        let mut by_shard: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for p in partitions {
            by_shard
                .entry(owner_of(topic, p, self.count))
                .or_default()
                .push(p);
        }
        let groups = by_shard.into_iter().map(|(shard, partitions)| async move {
            if shard == self.id {
                return self.fetch_offsets_local(group, topic, partitions).await;
            }
            let ids = partitions.clone();
            let outcome = self
                .ask(shard, |reply| ShardMessage::FetchOffsets {
                    group: group.to_string(),
                    topic: topic.to_string(),
                    partitions,
                    reply,
                })
                .await;
            match outcome {
                Ok(list) => list,
                Err(e) => ids.into_iter().map(|p| (p, Err(e.clone()))).collect(),
            }
        });
        join_all(groups).await.into_iter().flatten().collect()
    }
}
