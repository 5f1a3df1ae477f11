//! CommitOffsets and FetchOffsets: Kafka-style consumer-group offsets, kept by the shard that
//! owns each partition.

use flatbuffers::FlatBufferBuilder;

use crate::broker::shard::Shard;
use crate::groups::validate_group;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{finish_response, ApiError};
use crate::protocol::wire;

type Outcome<T> = (u32, Result<T, ApiError>);

fn offsets_vector<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    list: Vec<Outcome<Option<u64>>>,
) -> flatbuffers::WIPOffset<
    flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<wire::PartitionOffset<'a>>>,
> {
    let items: Vec<_> = list
        .into_iter()
        .map(|(partition, result)| {
            let (offset, error) = match result {
                Ok(o) => (o.map_or(-1, |o| i64::try_from(o).unwrap_or(i64::MAX)), None),
                Err(e) => (-1, Some(e.to_wire(fbb))),
            };
            wire::PartitionOffset::create(
                fbb,
                &wire::PartitionOffsetArgs {
                    partition,
                    offset,
                    error,
                },
            )
        })
        .collect();
    fbb.create_vector(&items)
}

fn check_group(group: &str) -> Result<(), ApiError> {
    validate_group(group).map_err(|e| ApiError::new(wire::ErrorCode::InvalidArgument, e))
}

pub(super) async fn commit(
    shard: &Shard,
    id: u64,
    req: wire::CommitOffsetsRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let (group, topic) = (req.group(), req.topic());
    check_group(group)?;
    // As FetchOffsets: an unknown topic fails the request as a whole (protocol.md section 5).
    if shard.topic_partitions(topic).is_none() {
        return Err(unknown_topic(topic));
    }
    let mut offsets = Vec::new();
    let mut refused = Vec::new();
    for p in req.offsets().iter().flatten() {
        match u64::try_from(p.offset()) {
            Ok(o) => offsets.push((p.partition(), o)),
            Err(_) => refused.push((
                p.partition(),
                Err(ApiError::new(
                    wire::ErrorCode::InvalidArgument,
                    format!("offset {} is negative", p.offset()),
                )),
            )),
        }
    }
    let asked: std::collections::HashMap<u32, u64> = offsets.iter().copied().collect();
    let mut results: Vec<Outcome<Option<u64>>> = shard
        .commit_offsets(group, topic, offsets)
        .await
        .into_iter()
        .map(|(p, result)| (p, result.map(|()| asked.get(&p).copied())))
        .collect();
    results.extend(refused);
    let mut fbb = FlatBufferBuilder::with_capacity(128 + 48 * results.len());
    let list = offsets_vector(&mut fbb, results);
    let body = wire::CommitOffsetsResponse::create(
        &mut fbb,
        &wire::CommitOffsetsResponseArgs {
            offsets: Some(list),
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::CommitOffsetsResponse,
        body.as_union_value(),
    ))
}

pub(super) async fn fetch(
    shard: &Shard,
    id: u64,
    req: wire::FetchOffsetsRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let (group, topic) = (req.group(), req.topic());
    check_group(group)?;
    let Some(count) = shard.topic_partitions(topic) else {
        return Err(unknown_topic(topic));
    };
    let partitions: Vec<u32> = match req.partitions() {
        Some(v) if !v.is_empty() => v.iter().collect(),
        _ => (0..count).collect(),
    };
    let results = shard.fetch_offsets(group, topic, partitions).await;
    let mut fbb = FlatBufferBuilder::with_capacity(128 + 48 * results.len());
    let list = offsets_vector(&mut fbb, results);
    let body = wire::FetchOffsetsResponse::create(
        &mut fbb,
        &wire::FetchOffsetsResponseArgs {
            offsets: Some(list),
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::FetchOffsetsResponse,
        body.as_union_value(),
    ))
}

fn unknown_topic(topic: &str) -> ApiError {
    ApiError::new(
        wire::ErrorCode::UnknownTopic,
        format!("topic '{topic}' does not exist"),
    )
}
