//! Message payloads: a header the consumer reads (send time, producer, sequence) and filler
//! derived from the sequence, so that every byte can be checked without storing what was sent.

/// Bytes of the payload header: send time (ns), sequence, producer id.
pub const HEADER_BYTES: usize = 20;

/// A repeating 0..=255 pattern twice over, so that any 256-aligned window is a slice.
pub struct Filler {
    pattern: Vec<u8>,
}

impl Filler {
    /// A filler for values of `size` bytes.
    pub fn new(size: usize) -> Self {
        let len = size + 256;
        Self {
            pattern: (0..len).map(|i| i as u8).collect(),
        }
    }

    /// The filler bytes of message `seq` (`len` long).
    pub fn for_seq(&self, seq: u64, len: usize) -> &[u8] {
        let start = (seq % 251) as usize;
        &self.pattern[start..start + len]
    }
}

/// Writes message `seq` of `producer`, sent at `sent_ns`, into `out` (`size` bytes).
pub fn write(
    out: &mut Vec<u8>,
    filler: &Filler,
    producer: u32,
    seq: u64,
    sent_ns: u64,
    size: usize,
) {
    out.clear();
    out.extend_from_slice(&sent_ns.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&producer.to_le_bytes());
    out.extend_from_slice(filler.for_seq(seq, size - HEADER_BYTES));
}

/// What a consumer reads back from a payload.
pub struct Decoded {
    /// Send time, ns since the run's clock origin.
    pub sent_ns: u64,
    /// Sequence number within the producer.
    pub seq: u64,
    /// Producer id.
    pub producer: u32,
}

/// Decodes and checks a payload; `None` if it is damaged.
pub fn check(value: &[u8], filler: &Filler) -> Option<Decoded> {
    if value.len() < HEADER_BYTES {
        return None;
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&value[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let seq = u64_at(8);
    let producer = u32::from_le_bytes([value[16], value[17], value[18], value[19]]);
    let body = &value[HEADER_BYTES..];
    if body != filler.for_seq(seq, body.len()) {
        return None;
    }
    Some(Decoded {
        sent_ns: u64_at(0),
        seq,
        producer,
    })
}
