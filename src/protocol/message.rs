//! Helpers shared by both ends for building and checking protocol messages: verified parsing,
//! the request/response envelopes and the typed error every layer maps into.

use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, VerifierOptions, WIPOffset};

use super::frame::OutFrame;
use super::wire;

/// A protocol-level error: a typed code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The code clients act on.
    pub code: wire::ErrorCode,
    /// What went wrong, with context.
    pub message: String,
}

impl ApiError {
    /// An error with the given code and message.
    pub fn new(code: wire::ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Reads an error from the wire; `None` when absent or `ErrorCode::None`.
    pub fn from_wire(error: Option<wire::Error<'_>>) -> Option<Self> {
        let error = error?;
        if error.code() == wire::ErrorCode::None {
            return None;
        }
        Some(Self::new(error.code(), error.message().unwrap_or_default()))
    }

    /// Writes the error into a builder.
    pub fn to_wire<'a>(&self, fbb: &mut FlatBufferBuilder<'a>) -> WIPOffset<wire::Error<'a>> {
        let message = fbb.create_string(&self.message);
        wire::Error::create(
            fbb,
            &wire::ErrorArgs {
                code: self.code,
                message: Some(message),
            },
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.code.variant_name().unwrap_or("UnknownCode");
        write!(f, "{name}: {}", self.message)
    }
}

impl std::error::Error for ApiError {}

/// Verifier limits for incoming messages: generous for vectors of bytes (record batches are a
/// single vector) but bounded in tables and depth, so a hostile frame cannot make the verifier
/// work hard.
fn verifier_options() -> VerifierOptions {
    VerifierOptions {
        max_depth: 16,
        max_tables: 100_000,
        max_apparent_size: 1 << 31,
        ignore_missing_null_terminator: false,
    }
}

/// Verifies and parses a whole request frame (length prefix included).
pub fn parse_request(frame: &[u8]) -> Result<wire::Request<'_>, ApiError> {
    flatbuffers::size_prefixed_root_with_opts::<wire::Request>(&verifier_options(), frame).map_err(
        |e| {
            ApiError::new(
                wire::ErrorCode::InvalidRequest,
                format!("request failed FlatBuffers verification: {e}"),
            )
        },
    )
}

/// What can be read of a request envelope without verifying the frame: enough to answer a
/// frame that fails verification with its own correlation id instead of 0, so that a client
/// fails one request rather than every request in flight (protocol.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvelopePeek {
    /// The request's `correlation_id` (0 when absent).
    pub correlation_id: u64,
    /// The raw union tag `body_type` (0, `NONE`, when absent).
    pub body_type: u8,
    /// Whether the `body` field is present.
    pub has_body: bool,
}

/// Reads the `Request` root table's first three fields by hand, every read bounds-checked:
/// `None` when the root table or its vtable does not lie inside the frame (length prefix
/// included). Nothing else of the frame is trusted.
pub fn peek_envelope(frame: &[u8]) -> Option<EnvelopePeek> {
    let buf = frame.get(4..)?;
    let read = |pos: usize, n: usize| buf.get(pos..pos.checked_add(n)?);
    let u16_at = |pos: usize| read(pos, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |pos: usize| read(pos, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let table = u32_at(0)? as usize;
    let vtable = i64::try_from(table).ok()? - i64::from(u32_at(table)? as i32);
    let vtable = usize::try_from(vtable).ok()?;
    let vtable_len = usize::from(u16_at(vtable)?);
    // The table-relative position of field `i`, or None when the field is absent.
    let field = |i: usize| -> Option<usize> {
        let slot = 4 + 2 * i;
        if slot + 2 > vtable_len {
            return None;
        }
        match u16_at(vtable + slot)? {
            0 => None,
            at => Some(table + usize::from(at)),
        }
    };
    let correlation_id = match field(0) {
        Some(pos) => u64::from_le_bytes(read(pos, 8)?.try_into().ok()?),
        None => 0,
    };
    let body_type = match field(1) {
        Some(pos) => *read(pos, 1)?.first()?,
        None => 0,
    };
    Some(EnvelopePeek {
        correlation_id,
        body_type,
        has_body: field(2).is_some(),
    })
}

/// Verifies and parses a whole response frame (length prefix included).
pub fn parse_response(frame: &[u8]) -> Result<wire::Response<'_>, ApiError> {
    flatbuffers::size_prefixed_root_with_opts::<wire::Response>(&verifier_options(), frame).map_err(
        |e| {
            ApiError::new(
                wire::ErrorCode::InvalidRequest,
                format!("response failed FlatBuffers verification: {e}"),
            )
        },
    )
}

/// Finishes a request envelope around `body` and returns the frame to send.
pub fn finish_request(
    mut fbb: FlatBufferBuilder<'_>,
    correlation_id: u64,
    body_type: wire::RequestBody,
    body: WIPOffset<UnionWIPOffset>,
) -> OutFrame {
    seal_request(&mut fbb, correlation_id, body_type, body);
    OutFrame::from_builder(fbb)
}

/// Like [`finish_request`], with the vector of [`builder_with_tail_vector`] holding `tail`,
/// which is sent after the builder's bytes instead of being copied in. A tail too large for
/// any frame gives a frame whose length prefix the broker refuses (`OutFrame::too_large`).
pub fn finish_request_with_tail(
    mut fbb: FlatBufferBuilder<'_>,
    correlation_id: u64,
    body_type: wire::RequestBody,
    body: WIPOffset<UnionWIPOffset>,
    tail: bytes::Bytes,
) -> OutFrame {
    seal_request(&mut fbb, correlation_id, body_type, body);
    OutFrame::with_trailing_vector(fbb, vec![tail]).unwrap_or_else(OutFrame::too_large)
}

fn seal_request(
    fbb: &mut FlatBufferBuilder<'_>,
    correlation_id: u64,
    body_type: wire::RequestBody,
    body: WIPOffset<UnionWIPOffset>,
) {
    let request = wire::Request::create(
        fbb,
        &wire::RequestArgs {
            correlation_id,
            body_type,
            body: Some(body),
        },
    );
    fbb.finish_size_prefixed(request, None);
}

/// Finishes a successful response envelope around `body`.
pub fn finish_response(
    mut fbb: FlatBufferBuilder<'_>,
    correlation_id: u64,
    body_type: wire::ResponseBody,
    body: WIPOffset<UnionWIPOffset>,
) -> OutFrame {
    seal_response(&mut fbb, correlation_id, body_type, body);
    OutFrame::from_builder(fbb)
}

/// A builder for a message with a byte vector to be filled by [`finish_request_with_tail`] or
/// [`finish_response_with_tail`]: the vector (returned) is created empty as the builder's very
/// first object, which puts its length at the end of the buffer.
pub fn builder_with_tail_vector(
    capacity: usize,
) -> (
    FlatBufferBuilder<'static>,
    WIPOffset<flatbuffers::Vector<'static, u8>>,
) {
    let mut fbb = FlatBufferBuilder::with_capacity(capacity);
    let vector = fbb.create_vector::<u8>(&[]);
    (fbb, vector)
}

/// Like [`finish_response`], with the vector of [`builder_with_tail_vector`] holding `tail`
/// (its pieces in order), which is sent after the builder's bytes instead of being copied in.
pub fn finish_response_with_tail(
    mut fbb: FlatBufferBuilder<'_>,
    correlation_id: u64,
    body_type: wire::ResponseBody,
    body: WIPOffset<UnionWIPOffset>,
    tail: Vec<bytes::Bytes>,
) -> Result<OutFrame, ApiError> {
    let tail_len: usize = tail.iter().map(bytes::Bytes::len).sum();
    seal_response(&mut fbb, correlation_id, body_type, body);
    OutFrame::with_trailing_vector(fbb, tail).ok_or_else(|| {
        ApiError::new(
            wire::ErrorCode::TooLarge,
            format!("a response of {tail_len} bytes of batches does not fit in one frame"),
        )
    })
}

fn seal_response(
    fbb: &mut FlatBufferBuilder<'_>,
    correlation_id: u64,
    body_type: wire::ResponseBody,
    body: WIPOffset<UnionWIPOffset>,
) {
    let response = wire::Response::create(
        fbb,
        &wire::ResponseArgs {
            correlation_id,
            error: None,
            body_type,
            body: Some(body),
        },
    );
    fbb.finish_size_prefixed(response, None);
}

/// A response that carries only an error.
pub fn error_response(correlation_id: u64, error: &ApiError) -> OutFrame {
    let mut fbb = FlatBufferBuilder::with_capacity(128 + error.message.len());
    let error = error.to_wire(&mut fbb);
    let response = wire::Response::create(
        &mut fbb,
        &wire::ResponseArgs {
            correlation_id,
            error: Some(error),
            body_type: wire::ResponseBody::NONE,
            body: None,
        },
    );
    fbb.finish_size_prefixed(response, None);
    OutFrame::from_builder(fbb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_envelope_reads_what_the_verifier_refuses_and_nothing_out_of_bounds() {
        let mut fbb = FlatBufferBuilder::new();
        let request = wire::Request::create(
            &mut fbb,
            &wire::RequestArgs {
                correlation_id: 0x0102_0304_0506_0708,
                body_type: wire::RequestBody::FetchRequest,
                body: None,
            },
        );
        fbb.finish_size_prefixed(request, None);
        let frame = fbb.finished_data();
        assert!(
            parse_request(frame).is_err(),
            "a union tag without its value"
        );
        let peek = peek_envelope(frame).expect("readable envelope");
        assert_eq!(
            peek,
            EnvelopePeek {
                correlation_id: 0x0102_0304_0506_0708,
                body_type: wire::RequestBody::FetchRequest.0,
                has_body: false,
            }
        );
        // Every truncation either reads nothing or stays inside the bytes it was given.
        for cut in 0..frame.len() {
            let _ = peek_envelope(&frame[..cut]);
        }
        assert_eq!(peek_envelope(&[0, 0, 0, 0]), None);
        assert_eq!(peek_envelope(&[8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn error_response_round_trips() {
        let err = ApiError::new(wire::ErrorCode::UnknownTopic, "no topic 'x'");
        let frame = error_response(7, &err);
        let bytes = frame.as_bytes();
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert_eq!(len, bytes.len() - 4);
        let response = parse_response(bytes).expect("valid");
        assert_eq!(response.correlation_id(), 7);
        assert_eq!(ApiError::from_wire(response.error()), Some(err));
    }

    /// A fetch response whose batches are a tail verifies and reads back as one whose batches
    /// were copied into the builder.
    #[test]
    fn a_tail_vector_is_read_as_if_copied_in() {
        let batches = b"0123456789abcdefghij".to_vec();
        let body = |fbb: &mut FlatBufferBuilder<'static>, vector| {
            let topic = fbb.create_string("t");
            wire::FetchResponse::create(
                fbb,
                &wire::FetchResponseArgs {
                    topic: Some(topic),
                    partition: 3,
                    high_watermark: 99,
                    log_start_offset: 1,
                    batches: Some(vector),
                    error: None,
                },
            )
            .as_union_value()
        };
        let mut copied = FlatBufferBuilder::with_capacity(64);
        let vector = copied.create_vector(&batches);
        let b = body(&mut copied, vector);
        let copied = finish_response(copied, 5, wire::ResponseBody::FetchResponse, b);

        let (mut fbb, vector) = builder_with_tail_vector(64);
        let b = body(&mut fbb, vector);
        let tail = vec![
            bytes::Bytes::copy_from_slice(&batches[..7]),
            bytes::Bytes::copy_from_slice(&batches[7..]),
        ];
        let framed = finish_response_with_tail(fbb, 5, wire::ResponseBody::FetchResponse, b, tail)
            .expect("fits");
        let wire_bytes = framed.to_vec();
        let len = u32::from_le_bytes([wire_bytes[0], wire_bytes[1], wire_bytes[2], wire_bytes[3]]);
        assert_eq!(len as usize, wire_bytes.len() - 4);
        let response = parse_response(&wire_bytes).expect("verifies");
        let fetch = response.body_as_fetch_response().expect("a fetch response");
        assert_eq!(fetch.batches().map(|v| v.bytes()), Some(&batches[..]));
        assert_eq!((fetch.partition(), fetch.high_watermark()), (3, 99));
        // Read back like the frame whose builder copied the batches in (the two differ only
        // in padding).
        let copied = parse_response(copied.as_bytes()).expect("verifies");
        let copied = copied.body_as_fetch_response().expect("a fetch response");
        assert_eq!(copied.batches().map(|v| v.bytes()), Some(&batches[..]));
        assert_eq!(copied.topic(), fetch.topic());
    }

    #[test]
    fn a_builder_not_ending_with_an_empty_vector_gets_no_tail() {
        let mut fbb = FlatBufferBuilder::with_capacity(64);
        let topic = fbb.create_string("t");
        let b = wire::FetchResponse::create(
            &mut fbb,
            &wire::FetchResponseArgs {
                topic: Some(topic),
                ..Default::default()
            },
        );
        let result = finish_response_with_tail(
            fbb,
            1,
            wire::ResponseBody::FetchResponse,
            b.as_union_value(),
            vec![bytes::Bytes::from_static(b"x")],
        );
        assert!(result.is_err());
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for junk in [&b""[..], b"\x01", b"GET / HTTP/1.1\r\n\r\n", &[0xff; 64]] {
            assert!(parse_request(junk).is_err());
        }
    }
}
