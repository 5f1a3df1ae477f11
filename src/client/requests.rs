//! Builders of request frames, one per request kind the client sends often. Pure functions:
//! the client uses them with a fresh correlation id, and tests use them to speak the protocol
//! on raw sockets.

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use crate::protocol::frame::OutFrame;
use crate::protocol::message::{
    builder_with_tail_vector, finish_request, finish_request_with_tail,
};
use crate::protocol::wire;

/// A produce of concatenated `batches` to one partition. The batches are not copied into the
/// request: they follow its other bytes on the wire (see `OutFrame::with_trailing_vector`).
pub fn produce(id: u64, topic: &str, partition: u32, batches: Bytes) -> OutFrame {
    let (mut fbb, data) = builder_with_tail_vector(256 + topic.len());
    let part = wire::PartitionProduce::create(
        &mut fbb,
        &wire::PartitionProduceArgs {
            partition,
            batches: Some(data),
        },
    );
    let parts = fbb.create_vector(&[part]);
    let topic = fbb.create_string(topic);
    let body = wire::ProduceRequest::create(
        &mut fbb,
        &wire::ProduceRequestArgs {
            topic: Some(topic),
            partitions: Some(parts),
        },
    );
    finish_request_with_tail(
        fbb,
        id,
        wire::RequestBody::ProduceRequest,
        body.as_union_value(),
        batches,
    )
}

/// A fetch from one partition.
pub fn fetch(
    id: u64,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
    max_wait_ms: u32,
) -> OutFrame {
    let mut fbb = FlatBufferBuilder::with_capacity(128 + topic.len());
    let topic = fbb.create_string(topic);
    let body = wire::FetchRequest::create(
        &mut fbb,
        &wire::FetchRequestArgs {
            topic: Some(topic),
            partition,
            offset,
            max_bytes,
            max_wait_ms,
        },
    );
    finish_request(
        fbb,
        id,
        wire::RequestBody::FetchRequest,
        body.as_union_value(),
    )
}

/// A list of topics.
pub fn list_topics(id: u64) -> OutFrame {
    let mut fbb = FlatBufferBuilder::with_capacity(64);
    let body = wire::ListTopicsRequest::create(&mut fbb, &wire::ListTopicsRequestArgs {});
    finish_request(
        fbb,
        id,
        wire::RequestBody::ListTopicsRequest,
        body.as_union_value(),
    )
}

/// `InitProducer`: a new idempotent producer identity, or `previous` at its next epoch.
pub fn init_producer(id: u64, previous: Option<(u64, u16)>) -> OutFrame {
    let mut fbb = FlatBufferBuilder::with_capacity(64);
    let (producer_id, producer_epoch) =
        previous.map_or((-1, -1), |(p, e)| (p as i64, i32::from(e)));
    let body = wire::InitProducerRequest::create(
        &mut fbb,
        &wire::InitProducerRequestArgs {
            producer_id,
            producer_epoch,
        },
    );
    finish_request(
        fbb,
        id,
        wire::RequestBody::InitProducerRequest,
        body.as_union_value(),
    )
}
