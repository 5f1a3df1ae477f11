//! Settle: ack, release, reject or renew locked events by their lock tokens, with one result
//! per token. A token whose lock expired is refused (`LockLost`), never silently accepted.

use flatbuffers::FlatBufferBuilder;

use crate::broker::shard::Shard;
use crate::protocol::frame::OutFrame;
use crate::protocol::message::{finish_response, ApiError};
use crate::protocol::wire;
use crate::subscription::partition::SettleAction;
use crate::subscription::{LockToken, MAX_RELEASE_DELAY_MS};

pub(super) async fn handle(
    shard: &Shard,
    id: u64,
    req: wire::SettleRequest<'_>,
) -> Result<OutFrame, ApiError> {
    let (topic, name) = (req.topic(), req.subscription());
    let action = match req.action() {
        wire::SettleAction::Ack => SettleAction::Ack,
        wire::SettleAction::Release => {
            let delay = req.release_delay_ms();
            if delay > MAX_RELEASE_DELAY_MS {
                return Err(ApiError::new(
                    wire::ErrorCode::InvalidArgument,
                    format!("release delay must be at most {MAX_RELEASE_DELAY_MS} ms, got {delay}"),
                ));
            }
            SettleAction::Release(delay)
        }
        wire::SettleAction::Reject => SettleAction::Reject,
        wire::SettleAction::Renew => SettleAction::Renew,
        other => {
            return Err(ApiError::new(
                wire::ErrorCode::InvalidArgument,
                format!("unknown settle action {}", other.0),
            ))
        }
    };
    let texts: Vec<&str> = req
        .lock_tokens()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let max = shard.config.max_settle_tokens;
    if texts.len() > max {
        return Err(ApiError::new(
            wire::ErrorCode::InvalidArgument,
            format!("at most {max} lock tokens per request, got {}", texts.len()),
        ));
    }
    // Malformed tokens get their own error; the rest go to their partitions' owners.
    let parsed: Vec<Result<LockToken, ApiError>> = texts
        .iter()
        .map(|t| {
            t.parse::<LockToken>()
                .map_err(|e| ApiError::new(wire::ErrorCode::InvalidArgument, e))
        })
        .collect();
    let valid: Vec<LockToken> = parsed.iter().filter_map(|p| p.clone().ok()).collect();
    let mut outcomes = shard.settle(topic, name, action, valid).await?.into_iter();
    let mut fbb = FlatBufferBuilder::with_capacity(256 + 96 * texts.len());
    let results: Vec<_> = texts
        .iter()
        .zip(parsed)
        .map(|(text, parsed)| {
            let outcome = match parsed {
                Ok(_) => outcomes
                    .next()
                    .unwrap_or_else(|| Err(ApiError::new(wire::ErrorCode::Internal, "no outcome"))),
                Err(e) => Err(e),
            };
            let token = fbb.create_string(text);
            let (error, until) = match outcome {
                Ok(until) => (None, until.unwrap_or(0)),
                Err(e) => (Some(e.to_wire(&mut fbb)), 0),
            };
            wire::SettleResult::create(
                &mut fbb,
                &wire::SettleResultArgs {
                    lock_token: Some(token),
                    error,
                    locked_until_ms: until,
                },
            )
        })
        .collect();
    let results = fbb.create_vector(&results);
    let body = wire::SettleResponse::create(
        &mut fbb,
        &wire::SettleResponseArgs {
            results: Some(results),
        },
    );
    Ok(finish_response(
        fbb,
        id,
        wire::ResponseBody::SettleResponse,
        body.as_union_value(),
    ))
}
