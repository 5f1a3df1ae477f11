//! CreateTopic, DeleteTopic and ListTopics.

use flatbuffers::FlatBufferBuilder;

use crate::broker::messages::TopicChange;
use crate::broker::metadata::{
    compression_from_wire, compression_to_wire, optional, to_wire, TopicConfig,
};
use crate::broker::shard::Shard;
use crate::names::validate_topic_name;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{finish_response, ApiError};
use crate::protocol::wire;

pub(super) async fn create(
    shard: &Shard,
    id: u64,
    req: wire::CreateTopicRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let name = req.name();
    let partitions = req.partitions();
    validate_topic_name(name).map_err(|e| ApiError::new(wire::ErrorCode::InvalidArgument, e))?;
    let max = shard.config.max_partitions_per_topic;
    if partitions == 0 || partitions > max {
        return Err(ApiError::new(
            wire::ErrorCode::InvalidArgument,
            format!("partitions must be 1..={max}, got {partitions}"),
        ));
    }
    let compression = compression_from_wire(req.compression())
        .map_err(|e| ApiError::new(wire::ErrorCode::InvalidArgument, e))?;
    shard
        .change_topic(TopicChange::Created {
            name: name.to_string(),
            config: TopicConfig {
                partitions,
                retention_ms: optional(req.retention_ms()),
                retention_bytes: optional(req.retention_bytes()),
                compression,
            },
        })
        .await?;
    let mut fbb = FlatBufferBuilder::with_capacity(128 + name.len());
    let name = fbb.create_string(name);
    let body = wire::CreateTopicResponse::create(
        &mut fbb,
        &wire::CreateTopicResponseArgs {
            name: Some(name),
            partitions,
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::CreateTopicResponse,
        body.as_union_value(),
    ))
}

pub(super) async fn delete(
    shard: &Shard,
    id: u64,
    req: wire::DeleteTopicRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let name = req.name();
    shard
        .change_topic(TopicChange::Deleted {
            name: name.to_string(),
        })
        .await?;
    let mut fbb = FlatBufferBuilder::with_capacity(128 + name.len());
    let name = fbb.create_string(name);
    let body = wire::DeleteTopicResponse::create(
        &mut fbb,
        &wire::DeleteTopicResponseArgs { name: Some(name) },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::DeleteTopicResponse,
        body.as_union_value(),
    ))
}

pub(super) fn list(shard: &Shard, id: u64) -> OutFrame {
    let topics = shard.topics();
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let infos: Vec<_> = topics
        .iter()
        .map(|(name, config)| {
            let name = fbb.create_string(name);
            wire::TopicInfo::create(
                &mut fbb,
                &wire::TopicInfoArgs {
                    name: Some(name),
                    partitions: config.partitions,
                    retention_ms: to_wire(config.retention_ms),
                    retention_bytes: to_wire(config.retention_bytes),
                    compression: compression_to_wire(config.compression),
                },
            )
        })
        .collect();
    let infos = fbb.create_vector(&infos);
    let body = wire::ListTopicsResponse::create(
        &mut fbb,
        &wire::ListTopicsResponseArgs {
            topics: Some(infos),
        },
    );
    finish_response(
        fbb,
        id,
        wire::ResponseBody::ListTopicsResponse,
        body.as_union_value(),
    )
}
