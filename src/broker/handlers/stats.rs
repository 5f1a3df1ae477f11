//! Stats: every shard's and partition's figures, gathered over the mesh.

use flatbuffers::FlatBufferBuilder;

use crate::broker::shard::Shard;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::finish_response;
use crate::protocol::wire;

pub(super) async fn handle(shard: &Shard, id: u64) -> OutFrame {
    let figures = shard.all_figures().await;
    let mut fbb = FlatBufferBuilder::with_capacity(4096);
    let shards: Vec<_> = figures
        .iter()
        .map(|f| {
            wire::ShardStats::create(
                &mut fbb,
                &wire::ShardStatsArgs {
                    shard: f.shard,
                    connections: f.connections,
                    requests_in_flight: f.requests_in_flight,
                    flushes: f.flushes,
                    slow_flushes: f.slow_flushes,
                    flush_max_us: f.flush_max_us,
                    sync_max_us: f.sync_max_us,
                    write_max_us: f.write_max_us,
                },
            )
        })
        .collect();
    let shards = fbb.create_vector(&shards);
    let mut partitions = Vec::new();
    for p in figures.iter().flat_map(|f| &f.partitions) {
        let topic = fbb.create_string(&p.topic);
        partitions.push(wire::PartitionStats::create(
            &mut fbb,
            &wire::PartitionStatsArgs {
                topic: Some(topic),
                partition: p.partition,
                shard: p.shard,
                log_start_offset: p.log_start_offset,
                high_watermark: p.high_watermark,
                size_bytes: p.size_bytes,
                segments: p.segments,
                messages_in: p.messages_in,
                bytes_in: p.bytes_in,
                messages_out: p.messages_out,
                bytes_out: p.bytes_out,
            },
        ));
    }
    let partitions = fbb.create_vector(&partitions);
    let body = wire::StatsResponse::create(
        &mut fbb,
        &wire::StatsResponseArgs {
            shards: Some(shards),
            partitions: Some(partitions),
        },
    );
    finish_response(
        fbb,
        id,
        wire::ResponseBody::StatsResponse,
        body.as_union_value(),
    )
}
