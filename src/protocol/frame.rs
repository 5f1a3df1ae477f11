//! Frames: a little-endian `u32` length, then that many bytes of FlatBuffers.
//!
//! [`FrameReader`] turns a byte stream into whole frames, checking the length prefix against
//! the configured maximum before it allocates anything for the frame.

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
/// are the length prefix and the message, then optionally a `tail` of shared byte pieces that
/// complete the message's last byte vector (see [`OutFrame::with_trailing_vector`]). Moving it
/// to the writer copies nothing.
pub struct OutFrame {
    buf: Vec<u8>,
    head: usize,
    tail: Vec<Bytes>,
}

impl OutFrame {
    /// Takes the finished (size-prefixed) buffer out of a builder.
    pub fn from_builder(builder: flatbuffers::FlatBufferBuilder<'_>) -> Self {
        let (buf, head) = builder.collapse();
        Self {
            buf,
            head,
            tail: Vec::new(),
        }
    }

    /// A frame whose builder created an empty `[ubyte]` vector as its very first object, so
    /// that the vector's length is the builder's last four bytes: the vector is made to hold
    /// the pieces of `tail`, which go on the wire right after the builder's bytes.
    /// A reader sees the message of a builder that had copied `tail` in (only the padding
    /// after the vector differs); here it is never copied (fetched batches go from the log's
    /// memory to the socket). `None` if the frame would exceed 4 GiB, or if the builder's last
    /// four bytes are not zero (then it cannot end with an empty vector; build it with
    /// `protocol::message::builder_with_tail_vector`).
    pub fn with_trailing_vector(
        builder: flatbuffers::FlatBufferBuilder<'_>,
        tail: Vec<Bytes>,
    ) -> Option<Self> {
        let tail_len: usize = tail.iter().map(Bytes::len).sum();
        let mut frame = Self::from_builder(builder);
        let bytes = &mut frame.buf[frame.head..];
        let n = bytes.len();
        if n < 8 || bytes[n - 4..] != [0, 0, 0, 0] {
            return None;
        }
        let prefix = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let tail_len_u32 = u32::try_from(tail_len).ok()?;
        let prefix = prefix.checked_add(tail_len_u32)?;
        bytes[..4].copy_from_slice(&prefix.to_le_bytes());
        bytes[n - 4..].copy_from_slice(&tail_len_u32.to_le_bytes());
        frame.tail = tail;
        Some(frame)
    }

    /// A frame that announces `u32::MAX` bytes: what a request too large for any frame turns
    /// into, so that the peer refuses it by its length prefix.
    pub fn too_large() -> Self {
        Self {
            buf: u32::MAX.to_le_bytes().to_vec(),
            head: 0,
            tail: Vec::new(),
        }
    }

    /// The builder's bytes: the whole frame when it has no tail.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    /// The whole frame copied into one buffer (for tests and tools, not the data path).
    pub fn to_vec(&self) -> Vec<u8> {
        let tail: usize = self.tail.iter().map(Bytes::len).sum();
        let mut out = Vec::with_capacity(self.as_bytes().len() + tail);
        out.extend_from_slice(self.as_bytes());
        for piece in &self.tail {
            out.extend_from_slice(piece);
        }
        out
    }
}

/// Pieces at least this long are sent from where they are rather than gathered.
const DIRECT_PIECE_BYTES: usize = 32 * 1024;
/// Most bytes gathered before they are sent.
const GATHER_BYTES: usize = 64 * 1024;

/// Writes frames to a stream. A frame's small pieces (its head, small batches of its tail)
/// are gathered into one reused buffer and sent together; large pieces are sent straight from
/// the memory that holds them, so that a fetch from the log's memory is not copied in user
/// space.
pub struct FrameWriter<W> {
    inner: W,
    gathered: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Writes to `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            gathered: Vec::new(),
        }
    }

    /// Writes one whole frame.
    pub async fn write_frame(&mut self, frame: &OutFrame) -> std::io::Result<()> {
        if frame.tail.is_empty() {
            return self.inner.write_all(frame.as_bytes()).await;
        }
        self.put(frame.as_bytes()).await?;
        for piece in &frame.tail {
            self.put(piece).await?;
        }
        self.send_gathered().await
    }

    async fn put(&mut self, piece: &[u8]) -> std::io::Result<()> {
        if piece.len() >= DIRECT_PIECE_BYTES {
            self.send_gathered().await?;
            return self.inner.write_all(piece).await;
        }
        if self.gathered.len() + piece.len() > GATHER_BYTES {
            self.send_gathered().await?;
        }
        self.gathered.extend_from_slice(piece);
        Ok(())
    }

    async fn send_gathered(&mut self) -> std::io::Result<()> {
        if !self.gathered.is_empty() {
            self.inner.write_all(&self.gathered).await?;
            self.gathered.clear();
        }
        Ok(())
    }

    /// The stream written to.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
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

    /// Small pieces are gathered and large ones sent as they are, in order: the stream
    /// holds exactly the frames' bytes.
    #[test]
    fn a_writer_sends_heads_and_tails_in_order() {
        let frames: Vec<OutFrame> = [vec![], vec![10, 70_000, 20], vec![60_000, 60_000]]
            .into_iter()
            .enumerate()
            .map(|(i, sizes)| {
                let mut fbb = flatbuffers::FlatBufferBuilder::new();
                fbb.create_vector::<u8>(&[]);
                let root = fbb.create_string("x");
                fbb.finish_size_prefixed(root, None);
                let tail: Vec<Bytes> = sizes
                    .iter()
                    .map(|&n| Bytes::from(vec![i as u8 + 1; n]))
                    .collect();
                OutFrame::with_trailing_vector(fbb, tail).expect("ends with an empty vector")
            })
            .collect();
        let mut writer = FrameWriter::new(futures_lite::io::Cursor::new(Vec::new()));
        let mut expected = Vec::new();
        for frame in &frames {
            run(writer.write_frame(frame)).expect("written");
            expected.extend_from_slice(&frame.to_vec());
        }
        assert_eq!(writer.get_mut().get_ref(), &expected);
        let mut reader = FrameReader::new(futures_lite::io::Cursor::new(expected), 1 << 20);
        for frame in &frames {
            let read = run(reader.next_frame()).expect("reads").expect("a frame");
            assert_eq!(read.len(), frame.to_vec().len());
        }
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
