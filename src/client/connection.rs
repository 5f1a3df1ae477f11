//! One client connection: pipelined requests matched to replies by correlation id.
//!
//! A writer task sends frames in the order `call`s hand them over; a reader task routes each
//! reply to the `call` waiting for its correlation id. Replies may come in any order.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;

use bytes::Bytes;
use futures::channel::oneshot;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use glommio::task::JoinHandle;

use super::ClientError;
use crate::protocol::frame::{FrameReader, FrameWriter, OutFrame};
use crate::protocol::message::{parse_response, ApiError};

/// Requests a connection queues for its writer before `call` waits.
const OUTBOX_CAPACITY: usize = 1024;

type Waiters = Rc<RefCell<HashMap<u64, oneshot::Sender<Result<Bytes, ClientError>>>>>;

/// A connection to one broker port.
pub struct Connection {
    addr: SocketAddr,
    outbox: LocalSender<OutFrame>,
    waiters: Waiters,
    next_id: Cell<u64>,
    closed: Rc<Cell<bool>>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl Connection {
    /// Connects to `addr`.
    pub async fn connect(
        addr: SocketAddr,
        max_frame_bytes: usize,
    ) -> Result<Rc<Self>, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::Io(format!("connecting to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        // SAFETY: dup returns a fresh descriptor (or -1, checked) that only we own.
        let fd = unsafe { libc::dup(stream.as_raw_fd()) };
        if fd < 0 {
            return Err(ClientError::Io(format!(
                "dup of the connection to {addr}: {}",
                std::io::Error::last_os_error()
            )));
        }
        let write_half = unsafe { TcpStream::from_raw_fd(fd) };
        let (outbox, rx) = local_channel::new_bounded(OUTBOX_CAPACITY);
        let waiters: Waiters = Rc::new(RefCell::new(HashMap::new()));
        let closed = Rc::new(Cell::new(false));
        let reader = glommio::spawn_local(read_loop(
            FrameReader::new(stream, max_frame_bytes),
            Rc::clone(&waiters),
            Rc::clone(&closed),
            addr,
        ))
        .detach();
        let writer = glommio::spawn_local(write_loop(write_half, rx)).detach();
        Ok(Rc::new(Self {
            addr,
            outbox,
            waiters,
            next_id: Cell::new(1),
            closed,
            reader: Some(reader),
            writer: Some(writer),
        }))
    }

    /// The address this connection goes to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// True once the broker closed the connection or it failed.
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Queues the request that `build` makes for a fresh correlation id and returns the
    /// reply to wait for. Requests go on the wire in the order they are queued, so a caller
    /// that queues in order gets its requests applied in order.
    pub async fn submit(&self, build: impl FnOnce(u64) -> OutFrame) -> Result<Reply, ClientError> {
        let closed = || ClientError::Closed(format!("connection to {} is closed", self.addr));
        if self.closed.get() {
            return Err(closed());
        }
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1).max(1));
        let (tx, rx) = oneshot::channel();
        self.waiters.borrow_mut().insert(id, tx);
        if self.outbox.send(build(id)).await.is_err() {
            self.waiters.borrow_mut().remove(&id);
            return Err(closed());
        }
        Ok(Reply {
            rx,
            addr: self.addr,
        })
    }

    /// Sends the request that `build` makes for a fresh correlation id and waits for its
    /// reply frame (verified; its envelope error, if any, is returned as `ClientError::Api`).
    pub async fn call(&self, build: impl FnOnce(u64) -> OutFrame) -> Result<Bytes, ClientError> {
        self.submit(build).await?.wait().await
    }
}

/// A queued request's reply.
pub struct Reply {
    rx: oneshot::Receiver<Result<Bytes, ClientError>>,
    addr: SocketAddr,
}

impl Reply {
    /// Waits for the reply frame.
    pub async fn wait(self) -> Result<Bytes, ClientError> {
        match self.rx.await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Closed(format!(
                "connection to {} closed before the reply",
                self.addr
            ))),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.cancel();
        }
        if let Some(writer) = self.writer.take() {
            writer.cancel();
        }
    }
}

async fn write_loop(stream: TcpStream, outbox: LocalReceiver<OutFrame>) {
    let mut writer = FrameWriter::new(stream);
    while let Some(frame) = outbox.recv().await {
        if writer.write_frame(&frame).await.is_err() {
            return;
        }
    }
}

async fn read_loop(
    mut reader: FrameReader<TcpStream>,
    waiters: Waiters,
    closed: Rc<Cell<bool>>,
    addr: SocketAddr,
) {
    let why = loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break format!("{addr} closed the connection"),
            Err(e) => break format!("reading from {addr}: {e}"),
        };
        let (id, error) = match parse_response(&frame) {
            Ok(response) => (
                response.correlation_id(),
                ApiError::from_wire(response.error()),
            ),
            Err(e) => break format!("bad reply from {addr}: {e}"),
        };
        if id == 0 {
            // A frame-level error from the broker: it concerns the whole connection.
            let e = error.map_or_else(
                || "reply with correlation id 0".to_string(),
                |e| e.to_string(),
            );
            break format!("{addr} refused a frame: {e}");
        }
        let Some(waiter) = waiters.borrow_mut().remove(&id) else {
            continue; // the caller gave up waiting
        };
        let _ = waiter.send(match error {
            Some(e) => Err(ClientError::Api(e)),
            None => Ok(frame),
        });
    };
    closed.set(true);
    for (_, waiter) in waiters.borrow_mut().drain() {
        let _ = waiter.send(Err(ClientError::Closed(why.clone())));
    }
}
