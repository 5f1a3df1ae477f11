//! Frames: a little-endian `u32` length, then that many bytes of FlatBuffers.
//!
//! [`FrameReader`] turns a byte stream into whole frames, checking the length prefix against
//! the configured maximum before it allocates anything for the frame.

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt};

/// Bytes asked of the socket per read when the buffer has less spare room.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The length prefix announces more than the maximum frame size.
    TooLarge {
        /// The announced length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The peer closed the connection in the middle of a frame.
    UnexpectedEof,
    /// The peer took longer than the frame deadline to send a whole frame.
    TooSlow(std::time::Duration),
    /// The socket failed.
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the maximum of {max} bytes")
            }
            Self::UnexpectedEof => write!(f, "connection closed in the middle of a frame"),
            Self::TooSlow(d) => write!(f, "a frame took more than {d:?} to arrive"),
            Self::Io(e) => write!(f, "socket read failed: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Reads whole frames from a byte stream. Each frame comes back as [`Bytes`] that shares the
/// read buffer, so record batches inside it can be kept without copying.
///
/// `buf[..filled]` holds the bytes received and not yet returned; `buf[filled..]` is spare
/// room that is already initialized (zeroed once when the buffer grows), so that a read costs
/// what it receives: a peer that trickles a large frame a byte at a time cannot make every
/// read zero the whole buffer again.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    filled: usize,
    max_frame_bytes: usize,
    /// When the first byte of the frame now being read arrived.
    partial_since: Option<std::time::Instant>,
    /// How long one frame may take to arrive, if limited.
    frame_deadline: Option<std::time::Duration>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `inner`; frames longer than `max_frame_bytes` are refused.
    pub fn new(inner: R, max_frame_bytes: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            filled: 0,
            max_frame_bytes,
            partial_since: None,
            frame_deadline: None,
        }
    }

    /// Limits how long one frame may take to arrive once its first byte came (against slow
    /// senders). Checked after every read.
    pub fn set_frame_deadline(&mut self, deadline: std::time::Duration) {
        self.frame_deadline = Some(deadline);
    }

    /// The next whole frame, length prefix included (FlatBuffers alignment is relative to the
    /// start of the prefix: a frame is a "size-prefixed" buffer), or `None` at a clean end of
    /// stream.
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            let mut need = 4;
            if self.filled >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > self.max_frame_bytes {
                    return Err(FrameError::TooLarge {
                        len,
                        max: self.max_frame_bytes,
                    });
                }
                if self.filled >= 4 + len {
                    self.filled -= 4 + len;
                    let frame = self.buf.split_to(4 + len).freeze();
                    self.partial_since = (self.filled > 0).then(std::time::Instant::now);
                    return Ok(Some(frame));
                }
                need = 4 + len;
            }
            // Grow the room when little is left: by a chunk, or by up to what is held for a
            // large frame still coming (doubling), so that memory follows the bytes received
            // rather than the length announced. Only the growth is zeroed.
            if self.buf.len() - self.filled < READ_CHUNK_BYTES / 4 {
                let rest = need.saturating_sub(self.filled);
                let grow = READ_CHUNK_BYTES.max(self.filled.min(rest));
                self.buf.resize(self.filled + grow, 0);
            }
            let was_empty = self.filled == 0;
            let n = match self.inner.read(&mut self.buf[self.filled..]).await {
                Ok(n) => n,
                Err(e) => return Err(FrameError::Io(e)),
            };
            self.filled += n;
            if n > 0 && was_empty {
                self.partial_since = Some(std::time::Instant::now());
            }
            if let (Some(deadline), Some(age)) = (self.frame_deadline, self.partial_frame_age()) {
                if age > deadline && !self.holds_whole_frame() {
                    return Err(FrameError::TooSlow(deadline));
                }
            }
            if n == 0 {
                return if self.filled == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::UnexpectedEof)
                };
            }
        }
    }

    fn holds_whole_frame(&self) -> bool {
        self.filled >= 4
            && self.filled
                >= 4 + u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize
    }

    /// How long the frame now being read has been arriving; `None` between frames.
    pub fn partial_frame_age(&self) -> Option<std::time::Duration> {
        if self.filled == 0 {
            return None;
        }
        self.partial_since.map(|t| t.elapsed())
    }
}

/// A finished frame ready to write: a FlatBuffers builder's buffer whose bytes from `head`
/// are the length prefix and the message. Moving it to the writer copies nothing.
pub struct OutFrame {
    buf: Vec<u8>,
    head: usize,
}

impl OutFrame {
    /// Takes the finished (size-prefixed) buffer out of a builder.
    pub fn from_builder(builder: flatbuffers::FlatBufferBuilder<'_>) -> Self {
        let (buf, head) = builder.collapse();
        Self { buf, head }
    }
    /// The bytes to put on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.head..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        futures_lite::future::block_on(f)
    }

    #[test]
    fn splits_a_stream_into_frames() {
        let mut wire = Vec::new();
        for payload in [&b"one"[..], b"", b"three"] {
            wire.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            wire.extend_from_slice(payload);
        }
        let mut reader = FrameReader::new(futures_lite::io::Cursor::new(wire), 1024);
        run(async {
            assert_eq!(&reader.next_frame().await.unwrap().unwrap()[4..], b"one");
            assert_eq!(&reader.next_frame().await.unwrap().unwrap()[4..], b"");
            assert_eq!(&reader.next_frame().await.unwrap().unwrap()[4..], b"three");
            assert!(reader.next_frame().await.unwrap().is_none());
        });
    }

    #[test]
    fn refuses_oversized_length_before_reading_it() {
        let wire = u32::MAX.to_le_bytes().to_vec();
        let mut reader = FrameReader::new(futures_lite::io::Cursor::new(wire), 1024);
        let err = run(reader.next_frame()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, max: 1024 } if len == u32::MAX as usize));
    }

    /// A reader that hands out one byte per read, like a peer trickling a frame.
    struct OneByte(futures_lite::io::Cursor<Vec<u8>>);

    impl AsyncRead for OneByte {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(1);
            std::pin::Pin::new(&mut self.0).poll_read(cx, &mut buf[..n])
        }
    }

    /// Regression (found through the frame_decoder fuzz target's low speed): every read
    /// zeroed the whole spare buffer (256 KiB and up; the announced length for a large frame)
    /// before reading into it, so a peer trickling a large frame a byte at a time cost a
    /// memset of the frame's size per byte. Now a read costs what it receives.
    #[test]
    fn a_trickled_frame_costs_what_it_receives() {
        // A frame of 8 MiB announced, then 32 KiB of it one byte per read, then a hang-up.
        let mut wire = (8u32 << 20).to_le_bytes().to_vec();
        wire.extend_from_slice(&[7u8; 32 * 1024]);
        let mut reader = FrameReader::new(OneByte(futures_lite::io::Cursor::new(wire)), 16 << 20);
        let result = run(reader.next_frame());
        assert!(matches!(result, Err(FrameError::UnexpectedEof)));
        // Memory follows the bytes received (32 KiB), not the 8 MiB announced; and only the
        // growth is zeroed, so each one-byte read no longer zeroes the whole buffer.
        assert!(
            reader.buf.len() < 1 << 20,
            "buffer grew to {}",
            reader.buf.len()
        );
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut wire = 10u32.to_le_bytes().to_vec();
        wire.extend_from_slice(b"abc");
        let mut reader = FrameReader::new(futures_lite::io::Cursor::new(wire), 1024);
        assert!(matches!(
            run(reader.next_frame()),
            Err(FrameError::UnexpectedEof)
        ));
    }
}
