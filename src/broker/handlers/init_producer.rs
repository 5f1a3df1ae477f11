//! InitProducer: hands out an idempotent producer identity (id and epoch) from shard 0.

use flatbuffers::FlatBufferBuilder;

use crate::broker::shard::Shard;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{finish_response, ApiError};
use crate::protocol::wire;

pub(super) async fn handle(
    shard: &Shard,
    id: u64,
    req: wire::InitProducerRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let previous = match (req.producer_id(), req.producer_epoch()) {
        (-1, _) => None,
        (producer_id, epoch) if producer_id >= 0 && (0..=i32::from(u16::MAX)).contains(&epoch) => {
            Some((producer_id as u64, epoch as u16))
        }
        (producer_id, epoch) => {
            return Err(ApiError::new(
                wire::ErrorCode::InvalidArgument,
                format!("no producer id {producer_id} at epoch {epoch}: give -1 for a new id, or an id and its epoch"),
            ))
        }
    };
    let (producer_id, producer_epoch) = shard.init_producer(previous).await?;
    let mut fbb = FlatBufferBuilder::with_capacity(64);
    let body = wire::InitProducerResponse::create(
        &mut fbb,
        &wire::InitProducerResponseArgs {
            producer_id,
            producer_epoch,
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::InitProducerResponse,
        body.as_union_value(),
    ))
}
