//! The metrics endpoint: a minimal HTTP/1.1 server on shard 0 that answers `GET /metrics` with
//! every shard's samples in the Prometheus text format. Scrapes gather samples over the mesh
//! as ordinary messages, so they never block a shard's data path.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::shard::Shard;

/// Largest HTTP request head accepted.
const MAX_REQUEST_BYTES: usize = 8192;
/// Time a scraper has to send its whole request, and to take each part of the reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Metrics connections open at once; more are closed as soon as they are accepted (a
/// scraper opens one at a time).
const MAX_CONNECTIONS: usize = 64;

/// Serves the metrics endpoint until the task is dropped.
pub async fn serve_metrics(shard: Rc<Shard>, listener: TcpListener) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        match listener.accept().await {
            Ok(stream) if open.get() >= MAX_CONNECTIONS => drop(stream),
            Ok(stream) => {
                let shard = Rc::clone(&shard);
                let open = Rc::clone(&open);
                open.set(open.get() + 1);
                glommio::spawn_local(async move {
                    answer(&shard, stream).await;
                    open.set(open.get() - 1);
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(shard: &Shard, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let started = Instant::now();
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        // The whole head within the timeout, not each read: a trickle does not keep it open.
        if started.elapsed() >= REQUEST_TIMEOUT {
            return;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST_BYTES {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
            return;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        let _ = respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
        return;
    }
    if path != "/metrics" {
        let _ = respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await;
        return;
    }
    let body = crate::metrics::render(&shard.all_samples().await);
    let _ = respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body).await;
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await
}
