//! `corebus topic create|list|delete`.

use std::process::ExitCode;

use corebus::broker::metadata::{parse_compression, TopicConfig};

use super::ClientArgs;

/// Topic subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name: [A-Za-z0-9._-], up to 200 characters.
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Delete segments whose newest record is older than this (e.g. 7d); default: the
        /// broker's.
        #[arg(long, value_parser = super::parse_millis)]
        retention_ms: Option<u64>,
        /// Keep each partition under about this size (e.g. 10GiB); default: the broker's.
        #[arg(long, value_parser = super::parse_bytes)]
        retention_bytes: Option<u64>,
        /// How the topic stores batches: `producer` keeps what each producer sent; `none`,
        /// `lz4` or `zstd` recompresses on the broker.
        #[arg(long, default_value = "producer")]
        compression: String,
    },
    /// List topics and their partition counts.
    List,
    /// Delete a topic and all its data.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// Runs a topic subcommand.
pub async fn run(command: TopicCommand, args: ClientArgs) -> Result<ExitCode, String> {
    let client = args.connect().await?;
    match command {
        TopicCommand::Create {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            compression,
        } => {
            let config = TopicConfig {
                partitions,
                retention_ms,
                retention_bytes,
                compression: parse_compression(&compression)?,
            };
            client
                .create_topic_with(&name, config)
                .await
                .map_err(|e| format!("creating topic '{name}': {e}"))?;
            println!("created topic {name} with {partitions} partitions");
        }
        TopicCommand::List => {
            let topics = client.list_topics().await.map_err(|e| e.to_string())?;
            for (name, partitions) in topics {
                println!("{name}\t{partitions}");
            }
        }
        TopicCommand::Delete { name } => {
            client
                .delete_topic(&name)
                .await
                .map_err(|e| format!("deleting topic '{name}': {e}"))?;
            println!("deleted topic {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
