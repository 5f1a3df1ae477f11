//! The frame decoder: `FrameReader` over arbitrary bytes, delivered in read chunks of a size
//! the input chooses, with a small maximum frame size; every frame then goes through the
//! verified request parser.
//!
//! Input: one byte of read chunk size (0 means "as much as asked"), then the stream.

#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll};

use corebus::protocol::frame::{FrameError, FrameReader};
use corebus::protocol::message::parse_request;
use corebus_fuzz::walk_request;
use futures_lite::io::{AsyncRead, Cursor};
use libfuzzer_sys::fuzz_target;

const MAX_FRAME_BYTES: usize = 64 * 1024;

/// A reader that hands out at most `chunk` bytes per read, like a socket.
struct Chunked {
    inner: Cursor<Vec<u8>>,
    chunk: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.chunk);
        Pin::new(&mut self.inner).poll_read(cx, &mut buf[..n])
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = if chunk == 0 {
        usize::MAX
    } else {
        usize::from(chunk)
    };
    let reader = Chunked {
        inner: Cursor::new(stream.to_vec()),
        chunk,
    };
    let mut frames = FrameReader::new(reader, MAX_FRAME_BYTES);
    let mut consumed = 0usize;
    futures_lite::future::block_on(async {
        loop {
            match frames.next_frame().await {
                Ok(Some(frame)) => {
                    assert!(frame.len() >= 4);
                    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
                    assert_eq!(len as usize + 4, frame.len(), "frame length prefix");
                    assert!(
                        frame.len() <= MAX_FRAME_BYTES + 4,
                        "oversized frame delivered"
                    );
                    assert_eq!(
                        &frame[..],
                        &stream[consumed..consumed + frame.len()],
                        "a frame is not the next bytes of the stream"
                    );
                    consumed += frame.len();
                    if let Ok(request) = parse_request(&frame) {
                        walk_request(&request);
                    }
                }
                Ok(None) => {
                    assert_eq!(consumed, stream.len(), "clean end before the stream's end");
                    assert!(frames.partial_frame_age().is_none());
                    break;
                }
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(len > max);
                    let prefix = &stream[consumed..consumed + 4];
                    assert_eq!(u32::from_le_bytes(prefix.try_into().unwrap()) as usize, len);
                    break;
                }
                Err(FrameError::UnexpectedEof) => {
                    assert!(consumed < stream.len(), "EOF error on a clean end");
                    break;
                }
                Err(FrameError::Io(e)) => panic!("a cursor cannot fail: {e}"),
                Err(FrameError::TooSlow(_)) => panic!("no frame deadline is set here"),
            }
        }
    });
});
