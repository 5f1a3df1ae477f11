//! One record inside a batch: key, value, headers and the CloudEvents attributes.
//!
//! Layout (little-endian), after a `u32` length of the rest of the record:
//! `u32 offset_delta, i64 timestamp_ms, u32 key_len (u32::MAX = no key), key,
//! u32 value_len, value, u16 id_len, id, u16 source_len, source, u16 type_len, type,
//! u16 subject_len, subject, u16 header_count, then per header u16 key_len, key,
//! u32 value_len, value`. An attribute of length 0 is absent.

use super::RecordError;

const NO_KEY: u32 = u32::MAX;

/// The fields of a record to encode. CloudEvents `time` is the record timestamp.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordWriter<'a> {
    /// Producer time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Optional key (partitioning, compaction).
    pub key: Option<&'a [u8]>,
    /// The payload.
    pub value: &'a [u8],
    /// CloudEvents `id`.
    pub id: &'a str,
    /// CloudEvents `source`.
    pub source: &'a str,
    /// CloudEvents `type`.
    pub event_type: &'a str,
    /// CloudEvents `subject`.
    pub subject: &'a str,
    /// Application headers (CloudEvents extension attributes go here).
    pub headers: &'a [(&'a [u8], &'a [u8])],
}

fn put_short(out: &mut Vec<u8>, bytes: &[u8]) {
    // Attributes longer than u16::MAX are cut; callers validate lengths before this.
    let len = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&bytes[..len]);
}

impl RecordWriter<'_> {
    /// Bytes this record takes in a batch.
    pub fn encoded_len(&self) -> usize {
        4 + 4
            + 8
            + 4
            + self.key.map_or(0, <[u8]>::len)
            + 4
            + self.value.len()
            + 2 * 4
            + self.id.len()
            + self.source.len()
            + self.event_type.len()
            + self.subject.len()
            + 2
            + self
                .headers
                .iter()
                .map(|(k, v)| 2 + k.len() + 4 + v.len())
                .sum::<usize>()
    }

    /// Appends the encoded record with the given offset delta to `out`.
    pub fn encode_into(&self, offset_delta: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&0u32.to_le_bytes()); // length, filled below
        out.extend_from_slice(&offset_delta.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        match self.key {
            Some(key) => {
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
            }
            None => out.extend_from_slice(&NO_KEY.to_le_bytes()),
        }
        out.extend_from_slice(&(self.value.len() as u32).to_le_bytes());
        out.extend_from_slice(self.value);
        put_short(out, self.id.as_bytes());
        put_short(out, self.source.as_bytes());
        put_short(out, self.event_type.as_bytes());
        put_short(out, self.subject.as_bytes());
        let count = self.headers.len().min(u16::MAX as usize);
        out.extend_from_slice(&(count as u16).to_le_bytes());
        for (k, v) in &self.headers[..count] {
            put_short(out, k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// A decoded view of one record; every field borrows from the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Position of the record in its batch.
    pub offset_delta: u32,
    /// Producer time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The key, if any.
    pub key: Option<&'a [u8]>,
    /// The payload.
    pub value: &'a [u8],
    /// CloudEvents `id` (empty if absent).
    pub id: &'a [u8],
    /// CloudEvents `source`.
    pub source: &'a [u8],
    /// CloudEvents `type`.
    pub event_type: &'a [u8],
    /// CloudEvents `subject`.
    pub subject: &'a [u8],
    headers_raw: &'a [u8],
    header_count: u16,
}

impl<'a> Record<'a> {
    /// The record's headers as (key, value) pairs.
    pub fn headers(&self) -> HeaderIter<'a> {
        HeaderIter {
            cursor: Cursor {
                bytes: self.headers_raw,
            },
            left: self.header_count,
        }
    }
}

/// Bounds-checked little-endian reads over a byte slice.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], RecordError> {
        if self.bytes.len() < n {
            return Err(RecordError::BadRecord(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, RecordError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, RecordError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, RecordError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }
    fn short_bytes(&mut self, what: &'static str) -> Result<&'a [u8], RecordError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
}

/// Iterates over the (key, value) headers of a record.
pub struct HeaderIter<'a> {
    cursor: Cursor<'a>,
    left: u16,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Layout was checked when the record was decoded, so these cannot fail.
        let key = self.cursor.short_bytes("header key").ok()?;
        let n = self.cursor.u32("header value length").ok()? as usize;
        let value = self.cursor.take(n, "header value").ok()?;
        Some((key, value))
    }
}

/// Iterates over the records in the body of a batch (the bytes after its header).
pub struct RecordIter<'a> {
    rest: &'a [u8],
}

impl<'a> RecordIter<'a> {
    /// Iterates over the records in `body`.
    pub fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }
}

fn decode(bytes: &[u8]) -> Result<Record<'_>, RecordError> {
    let mut c = Cursor { bytes };
    let offset_delta = c.u32("offset delta")?;
    let timestamp_ms = c.i64("timestamp")?;
    let key_len = c.u32("key length")?;
    let key = if key_len == NO_KEY {
        None
    } else {
        Some(c.take(key_len as usize, "key")?)
    };
    let value_len = c.u32("value length")? as usize;
    let value = c.take(value_len, "value")?;
    let id = c.short_bytes("id")?;
    let source = c.short_bytes("source")?;
    let event_type = c.short_bytes("type")?;
    let subject = c.short_bytes("subject")?;
    let header_count = c.u16("header count")?;
    let headers_raw = c.bytes;
    for _ in 0..header_count {
        c.short_bytes("header key")?;
        let n = c.u32("header value length")? as usize;
        c.take(n, "header value")?;
    }
    if !c.bytes.is_empty() {
        return Err(RecordError::BadRecord("trailing bytes after headers"));
    }
    Ok(Record {
        offset_delta,
        timestamp_ms,
        key,
        value,
        id,
        source,
        event_type,
        subject,
        headers_raw,
        header_count,
    })
}

impl<'a> RecordIter<'a> {
    /// The next record together with its encoded bytes (length prefix included), as they
    /// are stored: what a subscription hands to its receivers.
    pub fn next_with_bytes(&mut self) -> Option<Result<(&'a [u8], Record<'a>), RecordError>> {
        let before = self.rest;
        let item = self.next()?;
        Some(item.map(|record| (&before[..before.len() - self.rest.len()], record)))
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<Record<'a>, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let mut c = Cursor { bytes: self.rest };
        let result = c
            .u32("record length")
            .and_then(|len| c.take(len as usize, "record body"))
            .and_then(decode);
        match result {
            Ok(record) => {
                self.rest = c.bytes;
                Some(Ok(record))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_len_matches_encoding() {
        let rec = RecordWriter {
            timestamp_ms: 5,
            key: Some(b"key"),
            value: b"hello",
            id: "id-1",
            source: "/src",
            event_type: "com.example.created",
            subject: "orders/1",
            headers: &[(b"a".as_slice(), b"bb".as_slice())],
        };
        let mut out = Vec::new();
        rec.encode_into(0, &mut out);
        assert_eq!(out.len(), rec.encoded_len());
        let decoded = RecordIter::new(&out).next().expect("one").expect("ok");
        assert_eq!(decoded.key, Some(b"key".as_slice()));
        assert_eq!(decoded.subject, b"orders/1");
        assert_eq!(decoded.event_type, b"com.example.created");
        let headers: Vec<_> = decoded.headers().collect();
        assert_eq!(headers, vec![(b"a".as_slice(), b"bb".as_slice())]);
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let rec = RecordWriter {
            value: b"hello",
            ..RecordWriter::default()
        };
        let mut out = Vec::new();
        rec.encode_into(0, &mut out);
        for cut in 0..out.len() {
            let mut iter = RecordIter::new(&out[..cut]);
            if cut > 0 {
                assert!(iter.next().expect("item").is_err(), "cut {cut}");
            }
        }
    }
}
