//! CreateSubscription, DeleteSubscription and ListSubscriptions: subscription definitions are
//! topic metadata, changed through shard 0 like topics.

use flatbuffers::FlatBufferBuilder;

use crate::broker::messages::TopicChange;
use crate::broker::shard::Shard;
use crate::names::validate_name;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{finish_response, ApiError};
use crate::protocol::wire;
use crate::subscription::wire as sub_wire;

fn invalid(message: String) -> ApiError {
    ApiError::new(wire::ErrorCode::InvalidArgument, message)
}

pub(super) async fn create(
    shard: &Shard,
    id: u64,
    req: wire::CreateSubscriptionRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let (topic, name, config) = sub_wire::from_wire(&req.subscription()).map_err(invalid)?;
    validate_name("subscription", &name).map_err(invalid)?;
    config.validate().map_err(invalid)?;
    shard
        .change_topic(TopicChange::SubscriptionCreated {
            topic: topic.clone(),
            name: name.clone(),
            config: config.clone(),
        })
        .await?;
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let sub = sub_wire::to_wire(&mut fbb, &topic, &name, &config);
    let body = wire::CreateSubscriptionResponse::create(
        &mut fbb,
        &wire::CreateSubscriptionResponseArgs {
            subscription: Some(sub),
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::CreateSubscriptionResponse,
        body.as_union_value(),
    ))
}

pub(super) async fn delete(
    shard: &Shard,
    id: u64,
    req: wire::DeleteSubscriptionRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let (topic, name) = (req.topic(), req.name());
    shard
        .change_topic(TopicChange::SubscriptionDeleted {
            topic: topic.to_string(),
            name: name.to_string(),
        })
        .await?;
    let mut fbb = FlatBufferBuilder::with_capacity(128);
    let topic = fbb.create_string(topic);
    let name = fbb.create_string(name);
    let body = wire::DeleteSubscriptionResponse::create(
        &mut fbb,
        &wire::DeleteSubscriptionResponseArgs {
            topic: Some(topic),
            name: Some(name),
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::DeleteSubscriptionResponse,
        body.as_union_value(),
    ))
}

pub(super) async fn list(
    shard: &Shard,
    id: u64,
    req: wire::ListSubscriptionsRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let topic = req.topic();
    if shard.topic_partitions(topic).is_none() {
        return Err(ApiError::new(
            wire::ErrorCode::UnknownTopic,
            format!("topic '{topic}' does not exist"),
        ));
    }
    let subs = shard.subscriptions_of(topic);
    let mut figures = Vec::with_capacity(subs.len());
    for (name, _) in &subs {
        figures.push(if req.with_stats() {
            Some(shard.subscription_stats(topic, name).await)
        } else {
            None
        });
    }
    let mut fbb = FlatBufferBuilder::with_capacity(256 + 256 * subs.len());
    let infos: Vec<_> = subs
        .iter()
        .zip(figures)
        .map(|((name, config), figures)| {
            let sub = sub_wire::to_wire(&mut fbb, topic, name, config);
            let stats = figures.map(|f| {
                wire::SubscriptionStats::create(
                    &mut fbb,
                    &wire::SubscriptionStatsArgs {
                        locked: f.locked,
                        backlog: f.backlog,
                        acked: f.acked,
                        dead_lettered: f.dead_lettered,
                        dropped: f.dropped,
                        lost: f.lost,
                    },
                )
            });
            wire::SubscriptionInfo::create(
                &mut fbb,
                &wire::SubscriptionInfoArgs {
                    subscription: Some(sub),
                    stats,
                },
            )
        })
        .collect();
    let infos = fbb.create_vector(&infos);
    let body = wire::ListSubscriptionsResponse::create(
        &mut fbb,
        &wire::ListSubscriptionsResponseArgs {
            subscriptions: Some(infos),
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::ListSubscriptionsResponse,
        body.as_union_value(),
    ))
}
