//! A subscription definition in its wire form (`wire::Subscription`), both ways: used by the
//! broker's handlers and by the client. The only place where this module meets the protocol.

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use super::{Filter, StartPosition, SubscriptionConfig};
use crate::protocol::wire;

/// Writes a definition.
pub fn to_wire<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    topic: &str,
    name: &str,
    config: &SubscriptionConfig,
) -> WIPOffset<wire::Subscription<'a>> {
    let topic = fbb.create_string(topic);
    let name = fbb.create_string(name);
    let types: Vec<_> = config
        .filter
        .types
        .iter()
        .map(|t| fbb.create_string(t))
        .collect();
    let types = fbb.create_vector(&types);
    let begins = config
        .filter
        .subject_begins_with
        .as_deref()
        .map(|s| fbb.create_string(s));
    let ends = config
        .filter
        .subject_ends_with
        .as_deref()
        .map(|s| fbb.create_string(s));
    let attributes: Vec<_> = config
        .filter
        .attributes
        .iter()
        .map(|(k, v)| {
            let name = fbb.create_string(k);
            let value = fbb.create_string(v);
            wire::AttributeFilter::create(
                fbb,
                &wire::AttributeFilterArgs {
                    name: Some(name),
                    value: Some(value),
                },
            )
        })
        .collect();
    let attributes = fbb.create_vector(&attributes);
    let dead_letter = config
        .dead_letter_topic
        .as_deref()
        .map(|s| fbb.create_string(s));
    wire::Subscription::create(
        fbb,
        &wire::SubscriptionArgs {
            topic: Some(topic),
            name: Some(name),
            filter_types: Some(types),
            filter_subject_begins_with: begins,
            filter_subject_ends_with: ends,
            filter_attributes: Some(attributes),
            lock_duration_ms: config.lock_duration_ms,
            max_deliveries: config.max_deliveries,
            ttl_ms: config
                .ttl_ms
                .map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX)),
            dead_letter_topic: dead_letter,
            start: match config.start {
                StartPosition::Earliest => wire::StartPosition::Earliest,
                StartPosition::Latest => wire::StartPosition::Latest,
            },
        },
    )
}

/// Reads a definition: (topic, name, settings with defaults filled in). Not validated.
pub fn from_wire(
    sub: &wire::Subscription<'_>,
) -> Result<(String, String, SubscriptionConfig), String> {
    let start = match sub.start() {
        wire::StartPosition::Earliest => StartPosition::Earliest,
        wire::StartPosition::Latest => StartPosition::Latest,
        other => return Err(format!("unknown start position {}", other.0)),
    };
    let filter = Filter {
        types: sub
            .filter_types()
            .map(|v| v.iter().map(str::to_string).collect())
            .unwrap_or_default(),
        subject_begins_with: sub
            .filter_subject_begins_with()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        subject_ends_with: sub
            .filter_subject_ends_with()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        attributes: sub
            .filter_attributes()
            .map(|v| {
                v.iter()
                    .map(|a| (a.name().to_string(), a.value().to_string()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let config = SubscriptionConfig {
        filter,
        lock_duration_ms: match sub.lock_duration_ms() {
            0 => super::DEFAULT_LOCK_DURATION_MS,
            ms => ms,
        },
        max_deliveries: match sub.max_deliveries() {
            0 => super::DEFAULT_MAX_DELIVERIES,
            n => n,
        },
        ttl_ms: u64::try_from(sub.ttl_ms()).ok(),
        dead_letter_topic: sub
            .dead_letter_topic()
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        start,
    };
    Ok((sub.topic().to_string(), sub.name().to_string(), config))
}
