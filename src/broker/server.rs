//! The life of a shard's network side in one place: bind the public and the shard port,
//! accept, serve each connection (pipelined requests, replies in any order), and stop on
//! shutdown.
//!
//! Limits live here: frames over `max_frame_bytes` are refused before allocation, and a
//! connection with `max_inflight_per_connection` requests in flight is not read from until
//! one finishes (back-pressure instead of buffering).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;

use super::handlers;
use super::shard::Shard;
use crate::protocol::frame::{FrameError, FrameReader, OutFrame};
use crate::protocol::message::{error_response, ApiError};
use crate::protocol::wire::ErrorCode;

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

/// Accepts connections on `listener` until the task is dropped; each connection is served
/// by its own task.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let mut backoff = Duration::from_millis(1);
    loop {
        match listener.accept().await {
            Ok(stream) => {
                backoff = Duration::from_millis(1);
                let shard = Rc::clone(&shard);
                glommio::spawn_local(async move { serve_connection(shard, stream).await }).detach();
            }
            Err(e) => {
                // Out of file descriptors or a transient error: back off, never spin.
                eprintln!("corebus: shard {}: accept failed: {e}", shard.id);
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Serves one connection: reads frames, runs each request as its own task, and writes the
/// replies in completion order through a single writer task.
async fn serve_connection(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // A second descriptor for the same socket lets the writer run beside the reader without
    // a lock between them.
    let write_fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if write_fd < 0 {
        eprintln!(
            "corebus: shard {}: dup of a connection failed: {}",
            shard.id,
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: `write_fd` is a fresh descriptor that nothing else owns.
    let write_half = unsafe { TcpStream::from_raw_fd(write_fd) };
    let inflight = shard.config.max_inflight_per_connection;
    let (replies, outbox) = local_channel::new_bounded::<OutFrame>(inflight);
    let replies = Rc::new(replies);
    let writer = glommio::spawn_local(write_loop(write_half, outbox));
    let permits = Rc::new(Semaphore::new(inflight as u64));
    let mut reader = FrameReader::new(stream, shard.config.max_frame_bytes);
    loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(FrameError::UnexpectedEof) | Err(FrameError::Io(_)) => break,
            Err(e @ FrameError::TooLarge { .. }) => {
                let err = ApiError::new(ErrorCode::TooLarge, e.to_string());
                let _ = replies.send(error_response(0, &err)).await;
                break;
            }
        };
        let Ok(permit) = permits.acquire_static_permit(1).await else {
            break;
        };
        let shard = Rc::clone(&shard);
        let replies = Rc::clone(&replies);
        glommio::spawn_local(async move {
            let _request = shard.track_request();
            let reply = handlers::dispatch(&shard, frame).await;
            let _ = replies.send(reply).await;
            drop(permit);
        })
        .detach();
    }
    drop(replies);
    let _ = writer.await;
}

/// Writes replies as they come; ends when every sender is gone or the peer stops reading.
async fn write_loop(mut stream: TcpStream, outbox: LocalReceiver<OutFrame>) {
    while let Some(frame) = outbox.recv().await {
        if stream.write_all(frame.as_bytes()).await.is_err() {
            return;
        }
    }
    let _ = stream.flush().await;
}
