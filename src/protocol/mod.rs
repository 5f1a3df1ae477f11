//! The wire protocol: length-prefixed FlatBuffers frames (schema/corebus.fbs).
//!
//! Owns framing ([`frame`]), the generated code ([`wire`]) and the few helpers that build and
//! check messages ([`message`]). Knows nothing of shards, topics or storage.

pub mod frame;
pub mod message;

#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    unused_imports,
    missing_docs,
    non_camel_case_types,
    unsafe_op_in_unsafe_fn,
    mismatched_lifetime_syntaxes
)]
#[rustfmt::skip]
mod generated {
    include!("generated/corebus_generated.rs");
}

/// The generated FlatBuffers types of schema/corebus.fbs. Never edited by hand:
/// run `scripts/gen-schema`.
pub use generated::corebus::wire;

/// Default maximum frame size in bytes (the length prefix is checked before allocating).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
