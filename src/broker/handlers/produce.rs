//! Produce: append record batches to one or more partitions of a topic; each partition is
//! acknowledged once its batches are durable per the broker's durability mode.

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use crate::broker::shard::Shard;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{finish_response, ApiError};
use crate::protocol::wire;

/// A partition's batches out of the received frame. They stay inside it (no copy until the
/// storage flush) when they are most of it; a smaller share is copied out, since the log's
/// cache keeps what it is given and counts only the batches' bytes: a tiny cached batch would
/// otherwise keep a whole request of up to `--max-frame-bytes` in memory.
fn keep_batches(frame: &Bytes, batches: &[u8]) -> Bytes {
    if batches.len() * 2 >= frame.len() {
        frame.slice_ref(batches)
    } else {
        Bytes::copy_from_slice(batches)
    }
}

pub(super) async fn handle(
    shard: &Shard,
    id: u64,
    req: wire::ProduceRequest<'_>,
    frame: &Bytes,
) -> Result<OutFrame, ApiError> {
    let topic = req.topic();
    let mut parts = Vec::new();
    for p in req.partitions().iter().flatten() {
        let batches = p.batches().map(|v| v.bytes()).unwrap_or_default();
        parts.push((p.partition(), keep_batches(frame, batches)));
    }
    if parts.is_empty() {
        return Err(ApiError::new(
            wire::ErrorCode::InvalidRequest,
            "produce names no partition",
        ));
    }
    let outcomes = shard.produce(topic, parts).await;
    let mut fbb = FlatBufferBuilder::with_capacity(128 + 64 * outcomes.len());
    let results: Vec<_> = outcomes
        .iter()
        .map(|(partition, outcome)| {
            let (base_offset, last_offset, error) = match outcome {
                Ok((base, last)) => (*base, *last, None),
                Err(e) => {
                    shard.metrics.count_error(e.code);
                    (0, 0, Some(e.to_wire(&mut fbb)))
                }
            };
            wire::PartitionProduceResult::create(
                &mut fbb,
                &wire::PartitionProduceResultArgs {
                    partition: *partition,
                    base_offset,
                    last_offset,
                    error,
                },
            )
        })
        .collect();
    let results = fbb.create_vector(&results);
    let topic = fbb.create_string(topic);
    let body = wire::ProduceResponse::create(
        &mut fbb,
        &wire::ProduceResponseArgs {
            topic: Some(topic),
            partitions: Some(results),
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::ProduceResponse,
        body.as_union_value(),
    ))
}
