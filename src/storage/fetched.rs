//! What a fetch returns: whole stored batches as a list of shared byte pieces, so that batches
//! served from the in-memory tail reach the socket without being copied into one buffer.

use bytes::{Bytes, BytesMut};

/// Whole stored batches: byte pieces that, concatenated in order, are the batches as stored
/// (each batch is one or more pieces). Cloning shares the bytes.
#[derive(Debug, Default, Clone)]
pub struct BatchBytes {
    pieces: Vec<Bytes>,
    len: usize,
}

impl BatchBytes {
    /// Pieces with room for `pieces` of them.
    pub fn with_capacity(pieces: usize) -> Self {
        Self {
            pieces: Vec::with_capacity(pieces),
            len: 0,
        }
    }

    /// Appends a piece (empty pieces are dropped).
    pub fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len += piece.len();
            self.pieces.push(piece);
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if there are no batches.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// The pieces, taken.
    pub fn into_pieces(self) -> Vec<Bytes> {
        self.pieces
    }

    /// The batches as one contiguous buffer: shared if they are one piece, else copied.
    pub fn contiguous(&self) -> Bytes {
        match self.pieces.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut out = BytesMut::with_capacity(self.len);
                for piece in many {
                    out.extend_from_slice(piece);
                }
                out.freeze()
            }
        }
    }
}

impl From<Bytes> for BatchBytes {
    fn from(bytes: Bytes) -> Self {
        let mut out = Self::with_capacity(1);
        out.push(bytes);
        out
    }
}

/// What a fetch returns: whole batches and the log's bounds at that moment.
#[derive(Debug, Default)]
pub struct FetchedData {
    /// Next offset to be written; all offsets below are acknowledged.
    pub high_watermark: u64,
    /// Earliest stored offset.
    pub log_start_offset: u64,
    /// Whole stored batches.
    pub batches: BatchBytes,
    /// Set when the requested offset was outside `[log_start_offset, high_watermark]`.
    pub out_of_range: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_shares_one_piece_and_joins_several() {
        let one = BatchBytes::from(Bytes::from_static(b"abc"));
        assert_eq!(one.contiguous().as_ptr(), one.pieces()[0].as_ptr());
        let mut many = BatchBytes::with_capacity(3);
        for piece in [&b"ab"[..], b"", b"cde"] {
            many.push(Bytes::copy_from_slice(piece));
        }
        assert_eq!(many.pieces().len(), 2, "empty pieces are dropped");
        assert_eq!(many.len(), 5);
        assert_eq!(&many.contiguous()[..], b"abcde");
        assert!(BatchBytes::default().contiguous().is_empty());
    }
}
