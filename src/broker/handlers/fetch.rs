//! Fetch: whole batches of one partition from an offset, with a long poll at the log's end.
//! The batches are shared with the log's memory and sent after the response's other bytes.

use crate::broker::shard::Shard;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{builder_with_tail_vector, finish_response_with_tail, ApiError};
use crate::protocol::wire;

pub(super) async fn handle(
    shard: &Shard,
    id: u64,
    req: wire::FetchRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let topic = req.topic();
    let data = shard
        .fetch(
            topic,
            req.partition(),
            req.offset(),
            req.max_bytes(),
            req.max_wait_ms(),
        )
        .await?;
    // The batches are not copied into the response: they follow it on the wire.
    let (mut fbb, batches) = builder_with_tail_vector(256 + topic.len());
    let topic_name = topic;
    let topic = fbb.create_string(topic);
    let error = data.out_of_range.then(|| {
        ApiError::new(
            wire::ErrorCode::OffsetOutOfRange,
            format!(
                "offset {} is out of range for {topic_name}/{}: the log holds [{}, {})",
                req.offset(),
                req.partition(),
                data.log_start_offset,
                data.high_watermark
            ),
        )
        .to_wire(&mut fbb)
    });
    let body = wire::FetchResponse::create(
        &mut fbb,
        &wire::FetchResponseArgs {
            topic: Some(topic),
            partition: req.partition(),
            high_watermark: data.high_watermark,
            log_start_offset: data.log_start_offset,
            batches: Some(batches),
            error,
        },
    );
    finish_response_with_tail(
        fbb,
        id,
        wire::ResponseBody::FetchResponse,
        body.as_union_value(),
        data.batches.into_pieces(),
    )
}
