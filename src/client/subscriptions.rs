//! The client side of subscriptions (create, list, delete, receive, ack, release, reject,
//! renew) and consumer-group offsets (commit, fetch).
//!
//! Receives go to the bootstrap shard, which gathers events from every partition's owner.
//! Settles are shard-aware: a lock token names its partition, so each token goes straight to
//! the shard that owns it.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use super::connection::Connection;
use super::{Client, ClientError};
use crate::protocol::message::{finish_request, parse_response, ApiError};
use crate::protocol::wire;
use crate::record::{Record, RecordError, RecordIter};
use crate::subscription::partition::SettleAction;
use crate::subscription::{wire as sub_wire, LockToken, SubscriptionConfig};

fn expect_body<T>(body: Option<T>, what: &str) -> Result<T, ClientError> {
    body.ok_or_else(|| ClientError::Protocol(format!("reply carries no {what}")))
}

/// A subscription's figures, summed over its partitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Events locked now.
    pub locked: u64,
    /// Events waiting for delivery, plus events not looked at yet.
    pub backlog: u64,
    /// Events acknowledged.
    pub acked: u64,
    /// Events moved to the dead-letter topic.
    pub dead_lettered: u64,
    /// Events dropped for want of a dead-letter topic.
    pub dropped: u64,
    /// Offsets lost before they were settled (retention, or a range failing its checksum).
    pub lost: u64,
}

/// One subscription as listed.
#[derive(Clone, Debug)]
pub struct SubscriptionInfo {
    /// Its name.
    pub name: String,
    /// Its definition.
    pub config: SubscriptionConfig,
    /// Its figures, when asked for.
    pub stats: Option<SubscriptionStats>,
}

/// An event received under a lock.
#[derive(Clone, Debug)]
pub struct ReceivedEvent {
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// 1 on the first delivery, one more on each redelivery.
    pub delivery_count: u32,
    /// Settles this delivery.
    pub lock_token: String,
    /// When the lock ends (broker clock, ms since the epoch).
    pub locked_until_ms: i64,
    /// The record bytes (length prefix included), sharing the reply frame.
    pub record_bytes: Bytes,
}

impl ReceivedEvent {
    /// The decoded record.
    pub fn record(&self) -> Result<Record<'_>, RecordError> {
        RecordIter::new(&self.record_bytes)
            .next()
            .unwrap_or(Err(RecordError::BadRecord("empty record")))
    }
}

/// The outcome of settling one token: the lock's new end for a renew.
pub type SettleResult = Result<Option<i64>, ApiError>;

fn settle_frame(
    id: u64,
    topic: &str,
    name: &str,
    action: SettleAction,
    tokens: &[&str],
) -> crate::protocol::frame::OutFrame {
    let mut fbb = FlatBufferBuilder::with_capacity(256 + 48 * tokens.len());
    let list: Vec<_> = tokens.iter().map(|t| fbb.create_string(t)).collect();
    let list = fbb.create_vector(&list);
    let topic = fbb.create_string(topic);
    let name = fbb.create_string(name);
    let (action, delay) = match action {
        SettleAction::Ack => (wire::SettleAction::Ack, 0),
        SettleAction::Release(d) => (wire::SettleAction::Release, d),
        SettleAction::Reject => (wire::SettleAction::Reject, 0),
        SettleAction::Renew => (wire::SettleAction::Renew, 0),
    };
    let body = wire::SettleRequest::create(
        &mut fbb,
        &wire::SettleRequestArgs {
            topic: Some(topic),
            subscription: Some(name),
            action,
            lock_tokens: Some(list),
            release_delay_ms: delay,
        },
    );
    finish_request(
        fbb,
        id,
        wire::RequestBody::SettleRequest,
        body.as_union_value(),
    )
}

async fn settle_on(
    conn: &Connection,
    topic: &str,
    name: &str,
    action: SettleAction,
    tokens: &[&str],
) -> Result<Vec<SettleResult>, ClientError> {
    let frame = conn
        .call(|id| settle_frame(id, topic, name, action, tokens))
        .await?;
    let response = parse_response(&frame)?;
    let body = expect_body(response.body_as_settle_response(), "settle results")?;
    let results: Vec<SettleResult> = body
        .results()
        .iter()
        .flatten()
        .map(|r| match ApiError::from_wire(r.error()) {
            Some(e) => Err(e),
            None => Ok((r.locked_until_ms() != 0).then_some(r.locked_until_ms())),
        })
        .collect();
    if results.len() != tokens.len() {
        return Err(ClientError::Protocol(format!(
            "{} settle results for {} tokens",
            results.len(),
            tokens.len()
        )));
    }
    Ok(results)
}

type OffsetResults<T> = Vec<(u32, Result<T, ApiError>)>;

fn read_offsets(
    list: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<wire::PartitionOffset<'_>>>>,
) -> OffsetResults<Option<u64>> {
    list.iter()
        .flatten()
        .map(|p| {
            let result = match ApiError::from_wire(p.error()) {
                Some(e) => Err(e),
                None => Ok(u64::try_from(p.offset()).ok()),
            };
            (p.partition(), result)
        })
        .collect()
}

impl Client {
    /// Creates a subscription; returns its definition as stored (defaults filled in).
    pub async fn create_subscription(
        &self,
        topic: &str,
        name: &str,
        config: &SubscriptionConfig,
    ) -> Result<SubscriptionConfig, ClientError> {
        let frame = self
            .bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(512);
                let sub = sub_wire::to_wire(&mut fbb, topic, name, config);
                let body = wire::CreateSubscriptionRequest::create(
                    &mut fbb,
                    &wire::CreateSubscriptionRequestArgs {
                        subscription: Some(sub),
                    },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::CreateSubscriptionRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        let response = parse_response(&frame)?;
        let body = expect_body(
            response.body_as_create_subscription_response(),
            "subscription",
        )?;
        let sub = expect_body(body.subscription(), "subscription")?;
        let (_, _, stored) = sub_wire::from_wire(&sub).map_err(ClientError::Protocol)?;
        Ok(stored)
    }

    /// Deletes a subscription and its state.
    pub async fn delete_subscription(&self, topic: &str, name: &str) -> Result<(), ClientError> {
        self.bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(128);
                let topic = fbb.create_string(topic);
                let name = fbb.create_string(name);
                let body = wire::DeleteSubscriptionRequest::create(
                    &mut fbb,
                    &wire::DeleteSubscriptionRequestArgs {
                        topic: Some(topic),
                        name: Some(name),
                    },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::DeleteSubscriptionRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        Ok(())
    }

    /// Lists a topic's subscriptions, with their figures if `with_stats`.
    pub async fn list_subscriptions(
        &self,
        topic: &str,
        with_stats: bool,
    ) -> Result<Vec<SubscriptionInfo>, ClientError> {
        let frame = self
            .bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(128);
                let topic = fbb.create_string(topic);
                let body = wire::ListSubscriptionsRequest::create(
                    &mut fbb,
                    &wire::ListSubscriptionsRequestArgs {
                        topic: Some(topic),
                        with_stats,
                    },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::ListSubscriptionsRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        let response = parse_response(&frame)?;
        let body = expect_body(
            response.body_as_list_subscriptions_response(),
            "subscriptions",
        )?;
        let mut out = Vec::new();
        for info in body.subscriptions().iter().flatten() {
            let sub = expect_body(info.subscription(), "subscription")?;
            let (_, name, config) = sub_wire::from_wire(&sub).map_err(ClientError::Protocol)?;
            let stats = info.stats().map(|s| SubscriptionStats {
                locked: s.locked(),
                backlog: s.backlog(),
                acked: s.acked(),
                dead_lettered: s.dead_lettered(),
                dropped: s.dropped(),
                lost: s.lost(),
            });
            out.push(SubscriptionInfo {
                name,
                config,
                stats,
            });
        }
        Ok(out)
    }

    /// Receives up to `max_events` events, each locked for the subscription's lock duration,
    /// waiting up to `wait` for the first.
    pub async fn receive(
        &self,
        topic: &str,
        name: &str,
        max_events: u32,
        wait: Duration,
    ) -> Result<Vec<ReceivedEvent>, ClientError> {
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        let frame = self
            .bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(128);
                let topic = fbb.create_string(topic);
                let name = fbb.create_string(name);
                let body = wire::ReceiveRequest::create(
                    &mut fbb,
                    &wire::ReceiveRequestArgs {
                        topic: Some(topic),
                        subscription: Some(name),
                        max_events,
                        max_wait_ms: wait_ms,
                    },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::ReceiveRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        let response = parse_response(&frame)?;
        let body = expect_body(response.body_as_receive_response(), "events")?;
        let mut out = Vec::new();
        for e in body.events().iter().flatten() {
            let record = e.record().map(|v| v.bytes()).unwrap_or_default();
            out.push(ReceivedEvent {
                partition: e.partition(),
                offset: e.offset(),
                delivery_count: e.delivery_count(),
                lock_token: e.lock_token().unwrap_or_default().to_string(),
                locked_until_ms: e.locked_until_ms(),
                record_bytes: if record.is_empty() {
                    Bytes::new()
                } else {
                    frame.slice_ref(record)
                },
            });
        }
        Ok(out)
    }

    /// Applies `action` to the events that `tokens` name; one result per token, in order.
    /// Each token goes to the shard that owns its partition.
    pub async fn settle(
        &self,
        topic: &str,
        name: &str,
        action: SettleAction,
        tokens: &[String],
    ) -> Result<Vec<SettleResult>, ClientError> {
        // Group the tokens by the connection of their partition's owner; a token that does not
        // parse goes to the bootstrap shard, which says what is wrong with it.
        let mut groups: Vec<(Rc<Connection>, Vec<usize>)> = Vec::new();
        let mut by_partition: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
        for (i, t) in tokens.iter().enumerate() {
            let partition = t.parse::<LockToken>().ok().map(|t| t.partition);
            by_partition.entry(partition).or_default().push(i);
        }
        for (partition, indexes) in by_partition {
            let conn = match partition {
                Some(p) => self.connection_for(topic, p).await?,
                None => self.bootstrap_connection().await?,
            };
            match groups.iter_mut().find(|(c, _)| Rc::ptr_eq(c, &conn)) {
                Some((_, list)) => list.extend(indexes),
                None => groups.push((conn, indexes)),
            }
        }
        let calls = groups.iter().map(|(conn, indexes)| {
            let texts: Vec<&str> = indexes.iter().map(|&i| tokens[i].as_str()).collect();
            async move { settle_on(conn, topic, name, action, &texts).await }
        });
        let answers = futures::future::join_all(calls).await;
        let mut results: Vec<Option<SettleResult>> = vec![None; tokens.len()];
        for ((_, indexes), answer) in groups.iter().zip(answers) {
            let answer = answer?;
            for (&i, r) in indexes.iter().zip(answer) {
                results[i] = Some(r);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(ApiError::new(wire::ErrorCode::Internal, "no result")))
            })
            .collect())
    }

    /// Acknowledges events: they are never delivered again.
    pub async fn ack(
        &self,
        topic: &str,
        name: &str,
        tokens: &[String],
    ) -> Result<Vec<SettleResult>, ClientError> {
        self.settle(topic, name, SettleAction::Ack, tokens).await
    }

    /// Releases events: delivered again after `delay`.
    pub async fn release(
        &self,
        topic: &str,
        name: &str,
        tokens: &[String],
        delay: Duration,
    ) -> Result<Vec<SettleResult>, ClientError> {
        let delay = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        self.settle(topic, name, SettleAction::Release(delay), tokens)
            .await
    }

    /// Rejects events: they go to the dead-letter topic now.
    pub async fn reject(
        &self,
        topic: &str,
        name: &str,
        tokens: &[String],
    ) -> Result<Vec<SettleResult>, ClientError> {
        self.settle(topic, name, SettleAction::Reject, tokens).await
    }

    /// Extends the locks by the lock duration from now; each result holds the new end.
    pub async fn renew(
        &self,
        topic: &str,
        name: &str,
        tokens: &[String],
    ) -> Result<Vec<SettleResult>, ClientError> {
        self.settle(topic, name, SettleAction::Renew, tokens).await
    }

    /// Commits a consumer group's offsets (the next offset to read, per partition), durably.
    pub async fn commit_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
    ) -> Result<Vec<(u32, Result<(), ApiError>)>, ClientError> {
        let frame = self
            .bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(128 + 32 * offsets.len());
                let list: Vec<_> = offsets
                    .iter()
                    .map(|&(partition, offset)| {
                        wire::PartitionOffset::create(
                            &mut fbb,
                            &wire::PartitionOffsetArgs {
                                partition,
                                offset: i64::try_from(offset).unwrap_or(i64::MAX),
                                error: None,
                            },
                        )
                    })
                    .collect();
                let list = fbb.create_vector(&list);
                let group = fbb.create_string(group);
                let topic = fbb.create_string(topic);
                let body = wire::CommitOffsetsRequest::create(
                    &mut fbb,
                    &wire::CommitOffsetsRequestArgs {
                        group: Some(group),
                        topic: Some(topic),
                        offsets: Some(list),
                    },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::CommitOffsetsRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        let response = parse_response(&frame)?;
        let body = expect_body(response.body_as_commit_offsets_response(), "offsets")?;
        Ok(read_offsets(body.offsets())
            .into_iter()
            .map(|(p, r)| (p, r.map(|_| ())))
            .collect())
    }

    /// Reads a consumer group's committed offsets (`None`: nothing committed) of `partitions`
    /// (all of the topic's when empty).
    pub async fn fetch_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
    ) -> Result<Vec<(u32, Result<Option<u64>, ApiError>)>, ClientError> {
        let frame = self
            .bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(128 + 4 * partitions.len());
                let list = fbb.create_vector(partitions);
                let group = fbb.create_string(group);
                let topic = fbb.create_string(topic);
                let body = wire::FetchOffsetsRequest::create(
                    &mut fbb,
                    &wire::FetchOffsetsRequestArgs {
                        group: Some(group),
                        topic: Some(topic),
                        partitions: Some(list),
                    },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::FetchOffsetsRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        let response = parse_response(&frame)?;
        let body = expect_body(response.body_as_fetch_offsets_response(), "offsets")?;
        Ok(read_offsets(body.offsets()))
    }
}
