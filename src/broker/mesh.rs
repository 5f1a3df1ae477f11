//! The loop that serves the messages (`broker::messages`) other shards address to this one.

use std::rc::Rc;

use futures::StreamExt;
use glommio::channels::channel_mesh::Receivers;

use super::messages::ShardMessage;
use super::shard::Shard;

/// Serves messages from every other shard until they all hang up. Each message runs as its
/// own task so that a long poll does not hold up the channel.
pub async fn serve_mesh(shard: Rc<Shard>, mut receivers: Receivers<ShardMessage>) {
    let streams = receivers.streams();
    let loops = streams.into_iter().map(|(_, mut stream)| {
        let shard = Rc::clone(&shard);
        async move {
            while let Some(msg) = stream.next().await {
                let shard = Rc::clone(&shard);
                glommio::spawn_local(async move { handle(&shard, msg).await }).detach();
            }
        }
    });
    futures::future::join_all(loops).await;
}

async fn handle(shard: &Shard, msg: ShardMessage) {
    match msg {
        ShardMessage::Produce {
            topic,
            parts,
            reply,
        } => {
            let _ = reply.send(shard.produce_local(&topic, parts).await);
        }
        ShardMessage::Fetch {
            topic,
            partition,
            offset,
            max_bytes,
            max_wait_ms,
            reply,
        } => {
            let result = shard
                .fetch_local(&topic, partition, offset, max_bytes, max_wait_ms)
                .await;
            let _ = reply.send(result);
        }
        ShardMessage::ChangeTopic { change, reply } => {
            let _ = reply.send(shard.change_topic(change).await);
        }
        ShardMessage::InitProducer { previous, reply } => {
            let _ = reply.send(shard.init_producer(previous).await);
        }
        ShardMessage::Samples { reply } => {
            let _ = reply.send(shard.samples());
        }
        ShardMessage::Figures { reply } => {
            let _ = reply.send(shard.figures());
        }
        ShardMessage::ApplyTopic { change, reply } => {
            let _ = reply.send(shard.apply_topic_change(change).await);
        }
        ShardMessage::Receive {
            topic,
            subscription,
            partitions,
            max_events,
            max_bytes,
            reply,
        } => {
            let result = shard
                .receive_local(&topic, &subscription, &partitions, max_events, max_bytes)
                .await;
            let _ = reply.send(result);
        }
        ShardMessage::WaitDeliverable {
            topic,
            subscription,
            partitions,
            wait_ms,
            mut reply,
        } => {
            let outcome = {
                let cancelled = reply.cancellation();
                let wait = shard.wait_local(
                    &topic,
                    &subscription,
                    &partitions,
                    std::time::Duration::from_millis(wait_ms),
                );
                futures_lite::future::or(async { Some(wait.await) }, async {
                    cancelled.await;
                    None
                })
                .await
            };
            if let Some(ready) = outcome {
                let _ = reply.send(ready);
            }
        }
        ShardMessage::Settle {
            topic,
            subscription,
            action,
            tokens,
            reply,
        } => {
            let _ = reply.send(
                shard
                    .settle_local(&topic, &subscription, action, tokens)
                    .await,
            );
        }
        ShardMessage::SubscriptionStats {
            topic,
            subscription,
            reply,
        } => {
            let _ = reply.send(shard.stats_local(&topic, &subscription));
        }
        ShardMessage::CommitOffsets {
            group,
            topic,
            offsets,
            reply,
        } => {
            let _ = reply.send(shard.commit_offsets_local(&group, &topic, offsets).await);
        }
        ShardMessage::FetchOffsets {
            group,
            topic,
            partitions,
            reply,
        } => {
            let _ = reply.send(shard.fetch_offsets_local(&group, &topic, partitions).await);
        }
        ShardMessage::DeviceFailed { from, what } => shard.sync_health().poison_from(from, &what),
    }
}
