//! Message payloads: a header the consumer reads (send time, producer, sequence) and filler
//! derived from the sequence, so that every byte can be checked without storing what was sent.
//!
//! Two kinds (`--payload`): `random`, a binary header and a byte pattern that compresses
//! poorly (it shifts with each message), and `json`, a JSON event (an order, with ids,
//! amounts, a status and free text drawn from fixed vocabularies by a seeded generator) whose
//! header fields are fixed-width numbers at the start: about as compressible as real JSON
//! event streams.

/// The messages' contents (`--payload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadKind {
    /// Header + a byte pattern.
    Random,
    /// Header + a JSON event.
    Json,
}

/// Bytes of the payload header: send time (ns), sequence, producer id.
pub const HEADER_BYTES: usize = 20;

/// A repeating 0..=255 pattern twice over, so that any 256-aligned window is a slice.
pub struct Filler {
    pattern: Vec<u8>,
    kind: PayloadKind,
}

impl Filler {
    /// A filler for values of `size` bytes of `kind`.
    pub fn new(size: usize, kind: PayloadKind) -> Self {
        let len = size + 256;
        Self {
            pattern: (0..len).map(|i| i as u8).collect(),
            kind,
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
    if filler.kind == PayloadKind::Json {
        return write_json(out, producer, seq, sent_ns, size);
    }
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
    if filler.kind == PayloadKind::Json {
        return check_json(value);
    }
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

/// Smallest `--message-size` a JSON payload fits in.
pub const MIN_JSON_BYTES: usize = 256;

/// Length of the JSON payload's fixed-width header: `{"t":"<20 digits>","s":"<20>","p":"<10>",`
/// (strings: JSON numbers can not have leading zeros).
const JSON_HEADER_BYTES: usize = 72;

const STATUSES: [&str; 5] = ["created", "paid", "packed", "shipped", "delivered"];
const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "JPY"];
const REGIONS: [&str; 6] = [
    "eu-west-1",
    "eu-central-1",
    "us-east-1",
    "us-west-2",
    "ap-south-1",
    "ap-northeast-1",
];
const WORDS: [&str; 24] = [
    "please",
    "deliver",
    "to",
    "the",
    "back",
    "door",
    "gift",
    "wrap",
    "call",
    "before",
    "arrival",
    "leave",
    "with",
    "neighbour",
    "fragile",
    "handle",
    "care",
    "office",
    "hours",
    "only",
    "weekend",
    "express",
    "standard",
    "pickup",
];

/// splitmix64: the seeded generator of the JSON events' fields.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes message `seq` of `producer` as a JSON event of exactly `size` bytes (at least
/// [`MIN_JSON_BYTES`]).
pub fn write_json(out: &mut Vec<u8>, producer: u32, seq: u64, sent_ns: u64, size: usize) {
    use std::io::Write;
    out.clear();
    let mut r = mix(seq ^ (u64::from(producer) << 40));
    let mut next = || {
        r = mix(r);
        r
    };
    let _ = write!(
        out,
        "{{\"t\":\"{sent_ns:020}\",\"s\":\"{seq:020}\",\"p\":\"{producer:010}\",\"type\":\"order.{}\",\"order\":\"ord-{:08}\",\"customer\":\"cus-{:05}\",\"amount\":{}.{:02},\"currency\":\"{}\",\"region\":\"{}\",\"items\":{},\"note\":\"",
        STATUSES[(next() % 5) as usize],
        next() % 100_000_000,
        next() % 20_000,
        next() % 1000,
        next() % 100,
        CURRENCIES[(next() % 4) as usize],
        REGIONS[(next() % 6) as usize],
        1 + next() % 9,
    );
    // Free text up to the size, then the closing `"}`.
    while out.len() + 2 < size {
        let word = WORDS[(next() % WORDS.len() as u64) as usize].as_bytes();
        let room = size - 2 - out.len();
        if out.last() != Some(&b'"') && room > 0 {
            out.push(b' ');
        }
        let room = size.saturating_sub(2 + out.len());
        out.extend_from_slice(&word[..word.len().min(room)]);
    }
    out.truncate(size.saturating_sub(2));
    out.extend_from_slice(b"\"}");
}

fn check_json(value: &[u8]) -> Option<Decoded> {
    if value.len() < JSON_HEADER_BYTES {
        return None;
    }
    let number = |at: usize, len: usize| -> Option<u64> {
        std::str::from_utf8(value.get(at..at + len)?)
            .ok()?
            .parse()
            .ok()
    };
    let sent_ns = number(6, 20)?;
    let seq = number(33, 20)?;
    let producer = u32::try_from(number(60, 10)?).ok()?;
    let mut expected = Vec::with_capacity(value.len());
    write_json(&mut expected, producer, seq, sent_ns, value.len());
    (expected == value).then_some(Decoded {
        sent_ns,
        seq,
        producer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_are_exact_size_valid_json_and_checkable() {
        for size in [MIN_JSON_BYTES, 300, 1024, 4096] {
            let mut out = Vec::new();
            write_json(&mut out, 3, 77, 123_456, size);
            assert_eq!(out.len(), size);
            let parsed: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(parsed["s"], format!("{:020}", 77));
            let back = check_json(&out).expect("checks");
            assert_eq!((back.seq, back.producer, back.sent_ns), (77, 3, 123_456));
            out[size / 2] ^= 1;
            assert!(check_json(&out).is_none());
        }
    }
}
