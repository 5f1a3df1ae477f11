//! Metadata: the shards and their ports, and which shard owns each partition.

use flatbuffers::FlatBufferBuilder;

use crate::broker::shard::Shard;
use crate::placement::owner_of;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{finish_response, ApiError};
use crate::protocol::wire;

pub(super) fn handle(shard: &Shard, id: u64, req: wire::MetadataRequest<'_>) -> OutFrame {
    let all = shard.topics();
    let wanted: Vec<String> = match req.topics() {
        Some(list) if !list.is_empty() => list.iter().map(str::to_string).collect(),
        _ => all.keys().cloned().collect(),
    };
    let mut fbb = FlatBufferBuilder::with_capacity(1024);
    let shards: Vec<_> = (0..shard.count)
        .map(|s| {
            wire::ShardInfo::create(
                &mut fbb,
                &wire::ShardInfoArgs {
                    shard: s as u32,
                    port: shard.config.shard_port(s),
                },
            )
        })
        .collect();
    let shards = fbb.create_vector(&shards);
    let mut topics = Vec::with_capacity(wanted.len());
    for name in &wanted {
        let (partitions, error) = match all.get(name) {
            Some(config) => {
                let count = config.partitions;
                let parts: Vec<_> = (0..count)
                    .map(|p| {
                        let owner = owner_of(name, p, shard.count);
                        wire::PartitionMetadata::create(
                            &mut fbb,
                            &wire::PartitionMetadataArgs {
                                partition: p,
                                shard: owner as u32,
                                port: shard.config.shard_port(owner),
                            },
                        )
                    })
                    .collect();
                (Some(fbb.create_vector(&parts)), None)
            }
            None => {
                let err = ApiError::new(
                    wire::ErrorCode::UnknownTopic,
                    format!("topic '{name}' does not exist"),
                );
                (None, Some(err.to_wire(&mut fbb)))
            }
        };
        let name = fbb.create_string(name);
        topics.push(wire::TopicMetadata::create(
            &mut fbb,
            &wire::TopicMetadataArgs {
                name: Some(name),
                partitions,
                error,
            },
        ));
    }
    let topics = fbb.create_vector(&topics);
    let body = wire::MetadataResponse::create(
        &mut fbb,
        &wire::MetadataResponseArgs {
            shards: Some(shards),
            topics: Some(topics),
        },
    );
    finish_response(
        fbb,
        id,
        wire::ResponseBody::MetadataResponse,
        body.as_union_value(),
    )
}
