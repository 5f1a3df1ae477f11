//! Receive: lock up to N events of a subscription for the caller, long-polling for the first.

use flatbuffers::FlatBufferBuilder;

use crate::broker::shard::Shard;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{finish_response, ApiError};
use crate::protocol::wire;

pub(super) async fn handle(
    shard: &Shard,
    id: u64,
    req: wire::ReceiveRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let (topic, name) = (req.topic(), req.subscription());
    let events = shard
        .receive(topic, name, req.max_events(), req.max_wait_ms())
        .await?;
    let bytes: usize = events.iter().map(|e| e.record.len() + 96).sum();
    let mut fbb = FlatBufferBuilder::with_capacity(256 + bytes);
    let list: Vec<_> = events
        .iter()
        .map(|e| {
            let token = fbb.create_string(&e.token.to_string());
            let record = fbb.create_vector(&e.record);
            wire::ReceivedEvent::create(
                &mut fbb,
                &wire::ReceivedEventArgs {
                    partition: e.token.partition,
                    offset: e.token.offset,
                    delivery_count: e.delivery_count,
                    lock_token: Some(token),
                    locked_until_ms: e.locked_until_ms,
                    record: Some(record),
                },
            )
        })
        .collect();
    let list = fbb.create_vector(&list);
    let topic = fbb.create_string(topic);
    let name = fbb.create_string(name);
    let body = wire::ReceiveResponse::create(
        &mut fbb,
        &wire::ReceiveResponseArgs {
            topic: Some(topic),
            subscription: Some(name),
            events: Some(list),
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::ReceiveResponse,
        body.as_union_value(),
    ))
}
