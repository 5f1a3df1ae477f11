//! The shard-aware client: topics, metadata, produce and fetch.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use super::connection::{Connection, Reply};
use super::requests;
use super::ClientError;
use crate::broker::metadata::{self, TopicConfig};
use crate::protocol::message::{finish_request, parse_response, ApiError};
use crate::protocol::{wire, DEFAULT_MAX_FRAME_BYTES};

/// How the client routes requests.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Send each partition's requests to its owning shard's port (zero hops). When false,
    /// everything goes to the bootstrap address and the broker forwards.
    pub shard_aware: bool,
    /// Largest reply frame accepted.
    pub max_frame_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            shard_aware: true,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Where one partition lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The owning shard.
    pub shard: u32,
    /// That shard's own port.
    pub port: u16,
}

/// What the metadata request returned.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    /// (shard, port) of every shard.
    pub shards: Vec<(u32, u16)>,
    /// Each known topic's partitions, indexed by partition id.
    pub topics: HashMap<String, Vec<PartitionInfo>>,
}

/// What a fetch returned.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// Next offset to be written.
    pub high_watermark: u64,
    /// Earliest stored offset.
    pub log_start_offset: u64,
    /// Whole batches (see `record::BatchIter`), sharing the reply frame.
    pub batches: Bytes,
}

/// One partition's figures (see `corebus stats`).
#[derive(Clone, Debug, Default)]
pub struct PartitionStats {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Owning shard.
    pub shard: u32,
    /// Earliest stored offset.
    pub log_start_offset: u64,
    /// Next offset to be written.
    pub high_watermark: u64,
    /// Bytes stored.
    pub size_bytes: u64,
    /// Segment files.
    pub segments: u32,
    /// Records acknowledged since the broker started.
    pub messages_in: u64,
    /// Bytes acknowledged since the broker started.
    pub bytes_in: u64,
    /// Records fetched since the broker started.
    pub messages_out: u64,
    /// Bytes fetched since the broker started.
    pub bytes_out: u64,
}

/// One shard's figures.
#[derive(Clone, Debug, Default)]
pub struct ShardStats {
    /// Shard index.
    pub shard: u32,
    /// Open connections.
    pub connections: u32,
    /// Requests being handled.
    pub requests_in_flight: u32,
    /// Flushes (group commits) completed since the broker started.
    pub flushes: u64,
    /// Of those, the ones slower than 10 ms.
    pub slow_flushes: u64,
    /// The longest flush since the broker started, in microseconds.
    pub flush_max_us: u64,
    /// The longest sync of a flush since the broker started, in microseconds.
    pub sync_max_us: u64,
    /// The longest write of a flush since the broker started, in microseconds.
    pub write_max_us: u64,
}

/// What the stats request returned.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Every shard.
    pub shards: Vec<ShardStats>,
    /// Every partition.
    pub partitions: Vec<PartitionStats>,
}

/// A connection to a corebus broker, routing by partition.
pub struct Client {
    /// The connection to the address given, made again when it closed.
    bootstrap: RefCell<Rc<Connection>>,
    options: ClientOptions,
    shard_connections: RefCell<HashMap<u16, Rc<Connection>>>,
    partitions: RefCell<HashMap<String, Vec<PartitionInfo>>>,
}

fn expect_body<T>(body: Option<T>, what: &str) -> Result<T, ClientError> {
    body.ok_or_else(|| ClientError::Protocol(format!("reply carries no {what}")))
}

impl Client {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str, options: ClientOptions) -> Result<Self, ClientError> {
        let resolved: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| ClientError::Io(format!("resolving {addr}: {e}")))?
            .next()
            .ok_or_else(|| ClientError::Io(format!("{addr} resolves to no address")))?;
        let bootstrap = Connection::connect(resolved, options.max_frame_bytes).await?;
        Ok(Self {
            bootstrap: RefCell::new(bootstrap),
            options,
            shard_connections: RefCell::new(HashMap::new()),
            partitions: RefCell::new(HashMap::new()),
        })
    }

    /// The bootstrap connection as it is now (possibly closed; see
    /// [`Client::bootstrap_connection`]).
    pub fn bootstrap(&self) -> Rc<Connection> {
        Rc::clone(&self.bootstrap.borrow())
    }

    /// The bootstrap connection, connected again first if it closed (the broker restarted).
    pub async fn bootstrap_connection(&self) -> Result<Rc<Connection>, ClientError> {
        let current = self.bootstrap();
        if !current.is_closed() {
            return Ok(current);
        }
        let conn = Connection::connect(current.addr(), self.options.max_frame_bytes).await?;
        let mut slot = self.bootstrap.borrow_mut();
        if slot.is_closed() {
            *slot = Rc::clone(&conn);
        }
        Ok(Rc::clone(&slot))
    }

    /// Asks for an idempotent producer identity: a new one, or `previous` at its next epoch
    /// (which fences batches of the older one).
    pub async fn init_producer(
        &self,
        previous: Option<(u64, u16)>,
    ) -> Result<(u64, u16), ClientError> {
        let frame = self
            .bootstrap_connection()
            .await?
            .call(|id| requests::init_producer(id, previous))
            .await?;
        let response = parse_response(&frame)?;
        if let Some(e) = ApiError::from_wire(response.error()) {
            return Err(ClientError::Api(e));
        }
        let body = expect_body(response.body_as_init_producer_response(), "producer id")?;
        Ok((body.producer_id(), body.producer_epoch()))
    }

    /// Creates a topic with the broker's default retention.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<(), ClientError> {
        self.create_topic_with(name, TopicConfig::with_partitions(partitions))
            .await
    }

    /// Creates a topic with its own settings: retention by age and by size per partition,
    /// and compression.
    pub async fn create_topic_with(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<(), ClientError> {
        self.bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(128);
                let name = fbb.create_string(name);
                let body = wire::CreateTopicRequest::create(
                    &mut fbb,
                    &wire::CreateTopicRequestArgs {
                        name: Some(name),
                        partitions: config.partitions,
                        retention_ms: metadata::to_wire(config.retention_ms),
                        retention_bytes: metadata::to_wire(config.retention_bytes),
                        compression: metadata::compression_to_wire(config.compression),
                    },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::CreateTopicRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        Ok(())
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        self.bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(128);
                let name = fbb.create_string(name);
                let body = wire::DeleteTopicRequest::create(
                    &mut fbb,
                    &wire::DeleteTopicRequestArgs { name: Some(name) },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::DeleteTopicRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        self.partitions.borrow_mut().remove(name);
        Ok(())
    }

    /// Lists (topic, partition count).
    pub async fn list_topics(&self) -> Result<Vec<(String, u32)>, ClientError> {
        let frame = self
            .bootstrap_connection()
            .await?
            .call(requests::list_topics)
            .await?;
        let response = parse_response(&frame)?;
        let body = expect_body(response.body_as_list_topics_response(), "topic list")?;
        Ok(body
            .topics()
            .iter()
            .flatten()
            .map(|t| (t.name().unwrap_or_default().to_string(), t.partitions()))
            .collect())
    }

    /// Every shard's and partition's figures.
    pub async fn stats(&self) -> Result<Stats, ClientError> {
        let frame = self
            .bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(64);
                let body = wire::StatsRequest::create(&mut fbb, &wire::StatsRequestArgs {});
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::StatsRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        let response = parse_response(&frame)?;
        let body = expect_body(response.body_as_stats_response(), "stats")?;
        Ok(Stats {
            shards: body
                .shards()
                .iter()
                .flatten()
                .map(|s| ShardStats {
                    shard: s.shard(),
                    connections: s.connections(),
                    requests_in_flight: s.requests_in_flight(),
                    flushes: s.flushes(),
                    slow_flushes: s.slow_flushes(),
                    flush_max_us: s.flush_max_us(),
                    sync_max_us: s.sync_max_us(),
                    write_max_us: s.write_max_us(),
                })
                .collect(),
            partitions: body
                .partitions()
                .iter()
                .flatten()
                .map(|p| PartitionStats {
                    topic: p.topic().unwrap_or_default().to_string(),
                    partition: p.partition(),
                    shard: p.shard(),
                    log_start_offset: p.log_start_offset(),
                    high_watermark: p.high_watermark(),
                    size_bytes: p.size_bytes(),
                    segments: p.segments(),
                    messages_in: p.messages_in(),
                    bytes_in: p.bytes_in(),
                    messages_out: p.messages_out(),
                    bytes_out: p.bytes_out(),
                })
                .collect(),
        })
    }

    /// Fetches metadata for `topics` (all topics if empty) and caches partition routes.
    pub async fn metadata(&self, topics: &[&str]) -> Result<Metadata, ClientError> {
        let frame = self
            .bootstrap_connection()
            .await?
            .call(|id| {
                let mut fbb = FlatBufferBuilder::with_capacity(256);
                let names: Vec<_> = topics.iter().map(|t| fbb.create_string(t)).collect();
                let names = fbb.create_vector(&names);
                let body = wire::MetadataRequest::create(
                    &mut fbb,
                    &wire::MetadataRequestArgs {
                        topics: Some(names),
                    },
                );
                finish_request(
                    fbb,
                    id,
                    wire::RequestBody::MetadataRequest,
                    body.as_union_value(),
                )
            })
            .await?;
        let response = parse_response(&frame)?;
        let body = expect_body(response.body_as_metadata_response(), "metadata")?;
        let mut meta = Metadata {
            shards: body
                .shards()
                .iter()
                .flatten()
                .map(|s| (s.shard(), s.port()))
                .collect(),
            topics: HashMap::new(),
        };
        for topic in body.topics().iter().flatten() {
            let name = topic.name().unwrap_or_default().to_string();
            if let Some(e) = ApiError::from_wire(topic.error()) {
                if topics.len() == 1 {
                    return Err(ClientError::Api(e));
                }
                continue;
            }
            let mut parts: Vec<_> = topic.partitions().iter().flatten().collect();
            parts.sort_by_key(|p| p.partition());
            let infos: Vec<_> = parts
                .iter()
                .map(|p| PartitionInfo {
                    shard: p.shard(),
                    port: p.port(),
                })
                .collect();
            self.partitions
                .borrow_mut()
                .insert(name.clone(), infos.clone());
            meta.topics.insert(name, infos);
        }
        Ok(meta)
    }

    /// Number of partitions of `topic` (from cached metadata, fetched on first use).
    pub async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        if let Some(parts) = self.partitions.borrow().get(topic) {
            return Ok(parts.len() as u32);
        }
        let meta = self.metadata(&[topic]).await?;
        Ok(meta.topics.get(topic).map_or(0, |p| p.len() as u32))
    }

    /// The routes of `topic`'s partitions (from cached metadata, fetched on first use).
    pub async fn partition_routes(&self, topic: &str) -> Result<Vec<PartitionInfo>, ClientError> {
        self.partition_count(topic).await?;
        Ok(self
            .partitions
            .borrow()
            .get(topic)
            .cloned()
            .unwrap_or_default())
    }

    /// The connection to use for `(topic, partition)`.
    pub async fn connection_for(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Rc<Connection>, ClientError> {
        if !self.options.shard_aware {
            return self.bootstrap_connection().await;
        }
        let routes = self.partition_routes(topic).await?;
        let Some(route) = routes.get(partition as usize) else {
            // Unknown partition: let the broker say so.
            return self.bootstrap_connection().await;
        };
        if let Some(conn) = self.shard_connections.borrow().get(&route.port) {
            if !conn.is_closed() {
                return Ok(Rc::clone(conn));
            }
        }
        let addr = SocketAddr::new(self.bootstrap().addr().ip(), route.port);
        let conn = Connection::connect(addr, self.options.max_frame_bytes).await?;
        // Callers that connected at the same time all use the first connection made, so that
        // requests queued one after another stay in order on one socket.
        let mut connections = self.shard_connections.borrow_mut();
        if let Some(first) = connections.get(&route.port) {
            if !first.is_closed() {
                return Ok(Rc::clone(first));
            }
        }
        connections.insert(route.port, Rc::clone(&conn));
        Ok(conn)
    }

    /// Produces concatenated record `batches` to one partition; returns the offsets of the
    /// first and last record once the broker acknowledged them. The bytes are sent from where
    /// they are, not copied into the request.
    pub async fn produce(
        &self,
        topic: &str,
        partition: u32,
        batches: Bytes,
    ) -> Result<(u64, u64), ClientError> {
        let conn = self.connection_for(topic, partition).await?;
        produce_on(&conn, topic, partition, batches).await
    }

    /// Queues a produce to one partition and returns its reply to wait for (see
    /// [`produce_result`]). Produces queued one after another reach the broker in that order.
    pub async fn produce_submit(
        &self,
        topic: &str,
        partition: u32,
        batches: Bytes,
    ) -> Result<Reply, ClientError> {
        let conn = self.connection_for(topic, partition).await?;
        conn.submit(|id| requests::produce(id, topic, partition, batches))
            .await
    }

    /// Fetches from one partition, starting with the batch that holds `offset`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<Fetched, ClientError> {
        let reply = self
            .fetch_submit(topic, partition, offset, max_bytes, max_wait_ms)
            .await?;
        fetch_result(reply, offset).await
    }

    /// Queues a fetch and returns its reply to wait for (see [`fetch_result`]): a reader can
    /// have the next fetch on the wire while it processes the last one.
    pub async fn fetch_submit(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<Reply, ClientError> {
        let conn = self.connection_for(topic, partition).await?;
        fetch_submit_on(&conn, topic, partition, offset, max_bytes, max_wait_ms).await
    }
}

/// Produces to one partition over a given connection.
pub async fn produce_on(
    conn: &Connection,
    topic: &str,
    partition: u32,
    batches: Bytes,
) -> Result<(u64, u64), ClientError> {
    let reply = conn
        .submit(|id| requests::produce(id, topic, partition, batches))
        .await?;
    produce_result(reply, partition).await
}

/// Waits for a queued produce's reply: the offsets of its first and last record.
pub async fn produce_result(reply: Reply, partition: u32) -> Result<(u64, u64), ClientError> {
    let frame = reply.wait().await?;
    let response = parse_response(&frame)?;
    let body = expect_body(response.body_as_produce_response(), "produce result")?;
    let result = body
        .partitions()
        .iter()
        .flatten()
        .find(|p| p.partition() == partition)
        .ok_or_else(|| ClientError::Protocol(format!("no result for partition {partition}")))?;
    if let Some(e) = ApiError::from_wire(result.error()) {
        return Err(ClientError::Api(e));
    }
    Ok((result.base_offset(), result.last_offset()))
}

/// Fetches from one partition over a given connection.
pub async fn fetch_on(
    conn: &Connection,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
    max_wait_ms: u32,
) -> Result<Fetched, ClientError> {
    let reply = fetch_submit_on(conn, topic, partition, offset, max_bytes, max_wait_ms).await?;
    fetch_result(reply, offset).await
}

/// Queues a fetch on a given connection; see [`fetch_result`].
async fn fetch_submit_on(
    conn: &Connection,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
    max_wait_ms: u32,
) -> Result<Reply, ClientError> {
    conn.submit(|id| requests::fetch(id, topic, partition, offset, max_bytes, max_wait_ms))
        .await
}

/// Waits for a queued fetch's reply (`offset` is the one it asked for).
pub async fn fetch_result(reply: Reply, offset: u64) -> Result<Fetched, ClientError> {
    let frame = reply.wait().await?;
    let response = parse_response(&frame)?;
    let body = expect_body(response.body_as_fetch_response(), "fetch result")?;
    if let Some(e) = ApiError::from_wire(body.error()) {
        if e.code == wire::ErrorCode::OffsetOutOfRange {
            return Err(ClientError::OffsetOutOfRange {
                requested: offset,
                log_start_offset: body.log_start_offset(),
                high_watermark: body.high_watermark(),
            });
        }
        return Err(ClientError::Api(e));
    }
    let batches = body.batches().map(|v| v.bytes()).unwrap_or_default();
    let batches = if batches.is_empty() {
        Bytes::new()
    } else {
        frame.slice_ref(batches)
    };
    Ok(Fetched {
        high_watermark: body.high_watermark(),
        log_start_offset: body.log_start_offset(),
        batches,
    })
}
