//! The life of a shard's network side in one place: bind the public and the shard port,
//! accept within the connection limits, serve each connection (pipelined requests, replies in
//! any order) within its limits, and stop on shutdown.
//!
//! Limits, all in `BrokerConfig`:
//! - `max_connections_per_shard` / `max_connections`: connections past them are closed at once.
//! - `max_frame_bytes`: checked on the length prefix, before anything is allocated for it.
//! - `max_inflight_per_connection` and `max_buffered_bytes_per_connection`: when a connection
//!   has that many requests or bytes in flight, the broker stops reading from it until one
//!   finishes (back-pressure through TCP instead of buffering). A request is in flight from
//!   its arrival until its reply is written to the socket, and its bytes are its frame plus
//!   the most its reply may hold (a fetch's `max_bytes`, a receive's byte cap): a client that
//!   pipelines fetches and reads no replies holds at most that budget of the broker's memory.
//! - `frame_timeout_ms`: a frame must arrive whole within it (slow senders are cut off), and a
//!   reply must be taken by the client within it (clients that stop reading are cut off).
//! - `idle_timeout_ms`: a connection with nothing in flight and nothing received is closed.

use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Semaphore, StaticPermit};

use super::config::BrokerConfig;
use super::handlers;
use super::shard::Shard;
use crate::protocol::frame::{FrameError, FrameReader, FrameWriter, OutFrame};
use crate::protocol::message::{error_response, parse_request, peek_envelope, ApiError};
use crate::protocol::wire::{ErrorCode, RequestBody};

/// Binds this shard's two listeners: the shared public port and its own port.
pub fn bind(shard: &Shard) -> Result<Vec<TcpListener>, String> {
    let public = shard.config.listen;
    let own = SocketAddr::new(public.ip(), shard.config.shard_port(shard.id));
    let mut listeners = Vec::new();
    for addr in [public, own] {
        let listener = TcpListener::bind(addr)
            .map_err(|e| format!("shard {}: binding {addr}: {e}", shard.id))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Open connections over all shards. The broker-wide count is one atomic touched only when a
/// connection opens or closes, never per request; each shard counts its own in its metrics.
#[derive(Clone)]
pub struct ConnectionCounts {
    total: Arc<AtomicUsize>,
}

impl ConnectionCounts {
    /// Counts sharing the broker-wide `total`.
    pub fn new(total: Arc<AtomicUsize>) -> Self {
        Self { total }
    }

    /// Takes a place for a new connection, or `None` if a limit is reached.
    fn admit(&self, shard: &Rc<Shard>) -> Option<ConnectionSlot> {
        let open = &shard.metrics.connections;
        if open.get() >= shard.config.max_connections_per_shard {
            return None;
        }
        if self.total.fetch_add(1, Ordering::Relaxed) >= shard.config.max_connections {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        open.set(open.get() + 1);
        Some(ConnectionSlot {
            total: Arc::clone(&self.total),
            shard: Rc::clone(shard),
        })
    }
}

/// A connection's place in the counts, given back on drop.
struct ConnectionSlot {
    total: Arc<AtomicUsize>,
    shard: Rc<Shard>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let open = &self.shard.metrics.connections;
        open.set(open.get().saturating_sub(1));
        self.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections on `listener` until the task is dropped; each connection is served
/// by its own task.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, counts: ConnectionCounts) {
    let mut backoff = Duration::from_millis(1);
    let mut refused = 0u64;
    loop {
        match listener.accept().await {
            Ok(stream) => {
                backoff = Duration::from_millis(1);
                let Some(slot) = counts.admit(&shard) else {
                    refused += 1;
                    shard.metrics.connections_refused.set(refused);
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            "shard {}: connection limit reached; {refused} connection(s) refused so far",
                            shard.id
                        );
                    }
                    drop(stream);
                    continue;
                };
                let shard = Rc::clone(&shard);
                glommio::spawn_local(async move {
                    serve_connection(shard, stream).await;
                    drop(slot);
                })
                .detach();
            }
            Err(e) => {
                // Out of file descriptors or a transient error: back off, never spin.
                tracing::warn!("shard {}: accept failed: {e}", shard.id);
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Serves one connection: reads frames, runs each request as its own task, and writes the
/// replies in completion order through a single writer task.
async fn serve_connection(shard: Rc<Shard>, stream: TcpStream) {
    let config = &shard.config;
    let _ = stream.set_nodelay(true);
    let idle = Duration::from_millis(config.idle_timeout_ms);
    let frame_deadline = Duration::from_millis(config.frame_timeout_ms);
    // Reads wake up at least this often so that the deadlines are checked.
    let _ = stream.set_read_timeout(Some(idle.min(frame_deadline)));
    // A second descriptor for the same socket lets the writer run beside the reader without
    // a lock between them.
    // SAFETY: dup returns a fresh descriptor (or -1, checked) that only we own.
    let write_fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if write_fd < 0 {
        tracing::warn!(
            "shard {}: dup of a connection failed: {}",
            shard.id,
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: `write_fd` is a fresh descriptor that nothing else owns.
    let write_half = unsafe { TcpStream::from_raw_fd(write_fd) };
    let _ = write_half.set_write_timeout(Some(frame_deadline));
    let inflight = config.max_inflight_per_connection;
    let (replies, outbox) = local_channel::new_bounded::<Outgoing>(inflight);
    let replies = Rc::new(replies);
    let writer = glommio::spawn_local(write_loop(write_half, outbox));
    let requests = Rc::new(Semaphore::new(inflight as u64));
    let budget = config.max_buffered_bytes_per_connection as u64;
    let bytes = Rc::new(Semaphore::new(budget));
    let mut reader = FrameReader::new(stream, config.max_frame_bytes);
    reader.set_frame_deadline(frame_deadline);
    let mut last_frame = Instant::now();
    loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(FrameError::UnexpectedEof) | Err(FrameError::TooSlow(_)) => break,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                if reader
                    .partial_frame_age()
                    .is_some_and(|age| age >= frame_deadline)
                {
                    break; // a slow sender: the frame did not arrive in time
                }
                let nothing_in_flight = requests.available() == inflight as u64;
                if nothing_in_flight && last_frame.elapsed() >= idle {
                    break;
                }
                continue;
            }
            Err(FrameError::Io(_)) => break,
            Err(e @ FrameError::TooLarge { .. }) => {
                let err = ApiError::new(ErrorCode::TooLarge, e.to_string());
                let _ = replies.send((error_response(0, &err), None)).await;
                break;
            }
        };
        last_frame = Instant::now();
        let Ok(request_permit) = requests.acquire_static_permit(1).await else {
            break;
        };
        let reserve = (frame.len() as u64 + reply_bound(&frame, config)).min(budget);
        let Ok(byte_permit) = bytes.acquire_static_permit(reserve).await else {
            break;
        };
        let shard = Rc::clone(&shard);
        let replies = Rc::clone(&replies);
        glommio::spawn_local(async move {
            let _request = shard.track_request();
            let reply = handlers::dispatch(&shard, frame).await;
            // The permits travel with the reply: released once it is written (or dropped).
            let _ = replies
                .send((reply, Some((request_permit, byte_permit))))
                .await;
        })
        .detach();
    }
    drop(replies);
    let _ = writer.await;
}

/// A reply on its way to the socket, with the connection's request and byte permits that its
/// request took (none for a connection-level error).
type Outgoing = (OutFrame, Option<(StaticPermit, StaticPermit)>);

/// The most a reply to `frame` may hold beyond a small envelope: a fetch's `max_bytes` (capped
/// by `--max-fetch-bytes`), a receive's byte cap; 0 for every other request (their replies are
/// small) and for frames that fail verification. A fetch reply may exceed it by the one whole
/// batch it always returns.
fn reply_bound(frame: &[u8], config: &BrokerConfig) -> u64 {
    const FETCH: u8 = RequestBody::FetchRequest.0;
    const RECEIVE: u8 = RequestBody::ReceiveRequest.0;
    match peek_envelope(frame).map(|p| p.body_type) {
        Some(FETCH) => parse_request(frame)
            .ok()
            .and_then(|r| r.body_as_fetch_request())
            .map_or(0, |f| {
                (f.max_bytes() as u64).clamp(1, config.max_fetch_bytes as u64)
            }),
        Some(RECEIVE) => config.max_receive_bytes as u64,
        _ => 0,
    }
}

/// Writes replies as they come, releasing each one's permits once it is written; ends when
/// every sender is gone or the peer stops reading (then the socket is shut down, which also
/// ends the reader).
async fn write_loop(stream: TcpStream, outbox: LocalReceiver<Outgoing>) {
    let mut writer = FrameWriter::new(stream);
    while let Some((frame, permits)) = outbox.recv().await {
        let written = writer.write_frame(&frame).await;
        drop(permits);
        if written.is_err() {
            let _ = writer.get_mut().shutdown(Shutdown::Both).await;
            // Replies still queued hold permits the reader may be waiting for: dropping them
            // lets it run on into the closed socket and end, and the requests still running
            // find their replies dropped as they come.
            while outbox.recv().await.is_some() {}
            return;
        }
    }
    let _ = writer.get_mut().flush().await;
}
