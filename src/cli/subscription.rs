//! `corebus subscription create|list|delete`.

use std::process::ExitCode;
use std::time::Duration;

use corebus::subscription::{Filter, StartPosition, SubscriptionConfig};

use super::{parse_duration, ClientArgs};

/// Subscription subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SubscriptionCommand {
    /// Create a subscription on a topic.
    Create(CreateArgs),
    /// List a topic's subscriptions with their figures.
    List {
        /// Topic name.
        topic: String,
        /// Output: text, or one JSON object per subscription.
        #[arg(long, value_enum, default_value = "text")]
        format: ListFormat,
    },
    /// Delete a subscription and its delivery state.
    Delete {
        /// Topic name.
        topic: String,
        /// Subscription name.
        name: String,
    },
}

/// Output of `subscription list`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListFormat {
    /// One line per subscription.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where a new subscription starts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// The first stored event.
    Earliest,
    /// Only events published after the subscription is created.
    Latest,
}

/// Options of `corebus subscription create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Topic name.
    topic: String,
    /// Subscription name: [A-Za-z0-9._-], up to 200 characters.
    name: String,
    /// Deliver only events of this type (repeat for several types).
    #[arg(long = "filter-type")]
    filter_types: Vec<String>,
    /// Deliver only events whose subject begins with this.
    #[arg(long)]
    filter_subject_begins_with: Option<String>,
    /// Deliver only events whose subject ends with this.
    #[arg(long)]
    filter_subject_ends_with: Option<String>,
    /// Deliver only events whose attribute (id, source, type, subject or a header) has this
    /// value: ATTR=VALUE. Repeat: values of the same attribute are alternatives, different
    /// attributes must all match.
    #[arg(long = "filter")]
    filters: Vec<String>,
    /// How long a received event stays locked to its receiver.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    lock_duration: Duration,
    /// Deliveries before an event goes to the dead-letter topic.
    #[arg(long, default_value_t = corebus::subscription::DEFAULT_MAX_DELIVERIES)]
    max_deliveries: u32,
    /// Events older than this (by their time) are dead-lettered instead of delivered.
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Where rejected, expired and exhausted events go (default: dropped and counted).
    #[arg(long)]
    dead_letter: Option<String>,
    /// Where the subscription starts in each partition.
    #[arg(long, value_enum, default_value = "earliest")]
    from: From,
}

fn describe(config: &SubscriptionConfig) -> String {
    let mut parts = vec![
        format!("lock-duration={}ms", config.lock_duration_ms),
        format!("max-deliveries={}", config.max_deliveries),
    ];
    if let Some(ttl) = config.ttl_ms {
        parts.push(format!("ttl={ttl}ms"));
    }
    if let Some(dl) = &config.dead_letter_topic {
        parts.push(format!("dead-letter={dl}"));
    }
    parts.push(format!("from={}", config.start.as_str()));
    for t in &config.filter.types {
        parts.push(format!("filter-type={t}"));
    }
    if let Some(s) = &config.filter.subject_begins_with {
        parts.push(format!("filter-subject-begins-with={s}"));
    }
    if let Some(s) = &config.filter.subject_ends_with {
        parts.push(format!("filter-subject-ends-with={s}"));
    }
    for (k, v) in &config.filter.attributes {
        parts.push(format!("filter={k}={v}"));
    }
    parts.join(" ")
}

fn millis(d: Duration, what: &str) -> Result<u32, String> {
    u32::try_from(d.as_millis()).map_err(|_| format!("{what} is too long"))
}

/// Runs a subscription subcommand.
pub async fn run(command: SubscriptionCommand, args: ClientArgs) -> Result<ExitCode, String> {
    let client = args.connect().await?;
    match command {
        SubscriptionCommand::Create(a) => {
            let mut attributes = Vec::new();
            for f in &a.filters {
                let Some((k, v)) = f.split_once('=') else {
                    return Err(format!("--filter '{f}': expected ATTR=VALUE"));
                };
                attributes.push((k.to_string(), v.to_string()));
            }
            let config = SubscriptionConfig {
                filter: Filter {
                    types: a.filter_types.clone(),
                    subject_begins_with: a.filter_subject_begins_with.clone(),
                    subject_ends_with: a.filter_subject_ends_with.clone(),
                    attributes,
                },
                lock_duration_ms: millis(a.lock_duration, "--lock-duration")?,
                max_deliveries: a.max_deliveries,
                ttl_ms: a.ttl.map(|t| t.as_millis() as u64),
                dead_letter_topic: a.dead_letter.clone(),
                start: match a.from {
                    From::Earliest => StartPosition::Earliest,
                    From::Latest => StartPosition::Latest,
                },
            };
            config.validate()?;
            let stored = client
                .create_subscription(&a.topic, &a.name, &config)
                .await
                .map_err(|e| format!("creating subscription '{}': {e}", a.name))?;
            println!(
                "created subscription {} on {}: {}",
                a.name,
                a.topic,
                describe(&stored)
            );
        }
        SubscriptionCommand::List { topic, format } => {
            let list = client
                .list_subscriptions(&topic, true)
                .await
                .map_err(|e| format!("listing subscriptions of '{topic}': {e}"))?;
            for info in list {
                let s = info.stats.unwrap_or_default();
                match format {
                    ListFormat::Text => println!(
                        "{}\tlocked={} backlog={} acked={} dead-lettered={} dropped={} lost={}\t{}",
                        info.name,
                        s.locked,
                        s.backlog,
                        s.acked,
                        s.dead_lettered,
                        s.dropped,
                        s.lost,
                        describe(&info.config)
                    ),
                    ListFormat::Json => {
                        let c = &info.config;
                        let row = serde_json::json!({
                            "name": info.name,
                            "lock_duration_ms": c.lock_duration_ms,
                            "max_deliveries": c.max_deliveries,
                            "ttl_ms": c.ttl_ms,
                            "dead_letter_topic": c.dead_letter_topic,
                            "from": c.start.as_str(),
                            "filter_types": c.filter.types,
                            "filter_subject_begins_with": c.filter.subject_begins_with,
                            "filter_subject_ends_with": c.filter.subject_ends_with,
                            "filter_attributes": c.filter.attributes,
                            "locked": s.locked,
                            "backlog": s.backlog,
                            "acked": s.acked,
                            "dead_lettered": s.dead_lettered,
                            "dropped": s.dropped,
                            "lost": s.lost,
                        });
                        println!("{row}");
                    }
                }
            }
        }
        SubscriptionCommand::Delete { topic, name } => {
            client
                .delete_subscription(&topic, &name)
                .await
                .map_err(|e| format!("deleting subscription '{name}': {e}"))?;
            println!("deleted subscription {name} of {topic}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
