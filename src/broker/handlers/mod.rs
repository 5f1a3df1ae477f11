//! Request handlers: one module per request kind, each parsing its request, applying it to
//! the shard and building its reply. This file only verifies the frame and dispatches.

mod fetch;
mod init_producer;
mod metadata;
mod offsets;
mod produce;
mod receive;
mod settle;
mod stats;
mod subscriptions;
mod topics;

use bytes::Bytes;

use super::shard::Shard;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{error_response, parse_request, peek_envelope, ApiError};
use crate::protocol::wire::{ErrorCode, RequestBody};

/// Verifies a request frame and runs its handler. Never panics on bad input: a frame that
/// fails verification gets an error reply with its correlation id where that can be read,
/// else with id 0 (see [`unverified`]).
pub async fn dispatch(shard: &Shard, frame: Bytes) -> OutFrame {
    let request = match parse_request(&frame) {
        Ok(request) => request,
        Err(e) => {
            let (id, e) = unverified(&frame, e);
            shard.metrics.count_error(e.code);
            return error_response(id, &e);
        }
    };
    let id = request.correlation_id();
    if id == 0 {
        // Id 0 marks connection-level errors: a reply to it could not be told apart.
        let e = ApiError::new(
            ErrorCode::InvalidRequest,
            "correlation id 0 is reserved for connection-level errors; number requests from 1",
        );
        shard.metrics.count_error(e.code);
        return error_response(0, &e);
    }
    let started = std::time::Instant::now();
    let kind = request.body_type();
    let result = match kind {
        RequestBody::ProduceRequest => match request.body_as_produce_request() {
            Some(r) => produce::handle(shard, id, r, &frame).await,
            None => Err(missing_body()),
        },
        RequestBody::FetchRequest => match request.body_as_fetch_request() {
            Some(r) => fetch::handle(shard, id, r).await,
            None => Err(missing_body()),
        },
        RequestBody::MetadataRequest => match request.body_as_metadata_request() {
            Some(r) => Ok(metadata::handle(shard, id, r)),
            None => Err(missing_body()),
        },
        RequestBody::CreateTopicRequest => match request.body_as_create_topic_request() {
            Some(r) => topics::create(shard, id, r).await,
            None => Err(missing_body()),
        },
        RequestBody::DeleteTopicRequest => match request.body_as_delete_topic_request() {
            Some(r) => topics::delete(shard, id, r).await,
            None => Err(missing_body()),
        },
        RequestBody::ListTopicsRequest => Ok(topics::list(shard, id)),
        RequestBody::CreateSubscriptionRequest => {
            match request.body_as_create_subscription_request() {
                Some(r) => subscriptions::create(shard, id, r).await,
                None => Err(missing_body()),
            }
        }
        RequestBody::DeleteSubscriptionRequest => {
            match request.body_as_delete_subscription_request() {
                Some(r) => subscriptions::delete(shard, id, r).await,
                None => Err(missing_body()),
            }
        }
        RequestBody::ListSubscriptionsRequest => {
            match request.body_as_list_subscriptions_request() {
                Some(r) => subscriptions::list(shard, id, r).await,
                None => Err(missing_body()),
            }
        }
        RequestBody::ReceiveRequest => match request.body_as_receive_request() {
            Some(r) => receive::handle(shard, id, r).await,
            None => Err(missing_body()),
        },
        RequestBody::SettleRequest => match request.body_as_settle_request() {
            Some(r) => settle::handle(shard, id, r).await,
            None => Err(missing_body()),
        },
        RequestBody::CommitOffsetsRequest => match request.body_as_commit_offsets_request() {
            Some(r) => offsets::commit(shard, id, r).await,
            None => Err(missing_body()),
        },
        RequestBody::FetchOffsetsRequest => match request.body_as_fetch_offsets_request() {
            Some(r) => offsets::fetch(shard, id, r).await,
            None => Err(missing_body()),
        },
        RequestBody::StatsRequest => Ok(stats::handle(shard, id).await),
        RequestBody::InitProducerRequest => match request.body_as_init_producer_request() {
            Some(r) => init_producer::handle(shard, id, r).await,
            None => Err(missing_body()),
        },
        other => Err(unsupported(other)),
    };
    let elapsed = started.elapsed().as_secs_f64();
    match kind {
        RequestBody::ProduceRequest => shard.metrics.produce_latency.observe(elapsed),
        RequestBody::FetchRequest => shard.metrics.fetch_latency.observe(elapsed),
        _ => {}
    }
    result.unwrap_or_else(|e| {
        shard.metrics.count_error(e.code);
        error_response(id, &e)
    })
}

/// The reply to a frame that failed verification: with the request's own correlation id
/// when the envelope can be read and the id is not 0, and the error a verified frame would
/// have got (a known body type without its body: `InvalidRequest`; an unknown one:
/// `UnsupportedRequest`). Anything else is the verifier's `InvalidRequest` with id 0.
fn unverified(frame: &[u8], verify_error: ApiError) -> (u64, ApiError) {
    let Some(peek) = peek_envelope(frame).filter(|p| p.correlation_id != 0) else {
        return (0, verify_error);
    };
    let known = peek.body_type != 0 && RequestBody(peek.body_type).variant_name().is_some();
    let error = match (known, peek.has_body) {
        (true, false) => missing_body(),
        (false, false) => unsupported(RequestBody(peek.body_type)),
        _ => verify_error,
    };
    (peek.correlation_id, error)
}

fn unsupported(kind: RequestBody) -> ApiError {
    ApiError::new(
        ErrorCode::UnsupportedRequest,
        format!("request kind {} is not supported", kind.0),
    )
}

fn missing_body() -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, "request has no body")
}
