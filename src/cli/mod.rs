//! Command-line parsing and the subcommands of the `corebus` binary.

mod config_file;
mod consume;
mod doctor;
mod publish;
mod receive;
mod serve;
mod stats;
mod subscription;
mod topic;

use std::process::ExitCode;
use std::rc::Rc;

use clap::{Parser, Subcommand};
use corebus::client::{Client, ClientOptions};

/// corebus: a thread-per-core pub/sub message broker.
#[derive(Parser, Debug)]
#[command(name = "corebus", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter such as
    /// `corebus=debug`); default: info for `serve`, warn otherwise.
    #[arg(long, env = "COREBUS_LOG", global = true)]
    log_level: Option<String>,
}

/// Sends structured logs to stderr at the chosen level.
fn init_logging(level: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("--log-level '{level}': {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

/// Options every client subcommand takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Broker address (any shard's port; the client finds the others).
    #[arg(
        long,
        env = "COREBUS_ADDR",
        default_value = "127.0.0.1:7070",
        global = true
    )]
    addr: String,
    /// Send every request to --addr and let the broker forward it, instead of straight to
    /// the shard that owns the partition.
    #[arg(long, global = true)]
    no_direct: bool,
}

impl ClientArgs {
    async fn connect(&self) -> Result<Rc<Client>, String> {
        let options = ClientOptions {
            shard_aware: !self.no_direct,
            ..ClientOptions::default()
        };
        Client::connect(&self.addr, options)
            .await
            .map(Rc::new)
            .map_err(|e| e.to_string())
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Create, list and delete topics.
    Topic {
        #[command(subcommand)]
        command: topic::TopicCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Publish each line of stdin as one message.
    Publish(publish::PublishArgs),
    /// Print messages of a topic.
    Consume(consume::ConsumeArgs),
    /// Create, list and delete subscriptions.
    Subscription {
        #[command(subcommand)]
        command: subscription::SubscriptionCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Receive events of a subscription, each locked to this receiver.
    Receive(receive::ReceiveArgs),
    /// Acknowledge received events: they are never delivered again.
    Ack(receive::SettleArgs),
    /// Release received events: delivered again (after --delay).
    Release(receive::ReleaseArgs),
    /// Reject received events: they go to the dead-letter topic now.
    Reject(receive::SettleArgs),
    /// Extend the locks of received events by the lock duration.
    Renew(receive::SettleArgs),
    /// Show throughput per topic, disk use and connections.
    Stats(stats::StatsArgs),
    /// Check the machine and the data directory, and say how to fix what is wrong.
    Doctor(doctor::DoctorArgs),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print a commented example configuration file with every setting.
    Example,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<ExitCode, String> {
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Doctor(_)) {
        "info"
    } else {
        "warn"
    };
    init_logging(cli.log_level.as_deref().unwrap_or(default_level))?;
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Topic { command, client } => client_block_on(topic::run(command, client)),
        Command::Publish(args) => client_block_on(publish::run(args)),
        Command::Consume(args) => client_block_on(consume::run(args)),
        Command::Stats(args) => client_block_on(stats::run(args)),
        Command::Doctor(args) => doctor::run(args),
        Command::Config {
            command: ConfigCommand::Example,
        } => {
            print!("{}", config_file::EXAMPLE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Subscription { command, client } => {
            client_block_on(subscription::run(command, client))
        }
        Command::Receive(args) => client_block_on(receive::run_receive(args)),
        Command::Ack(args) => client_block_on(receive::run_settle(receive::Verb::Ack, args)),
        Command::Release(args) => client_block_on(receive::run_settle(
            receive::Verb::Release(args.delay),
            args.settle,
        )),
        Command::Reject(args) => client_block_on(receive::run_settle(receive::Verb::Reject, args)),
        Command::Renew(args) => client_block_on(receive::run_settle(receive::Verb::Renew, args)),
    }
}

fn client_block_on<F>(fut: F) -> Result<ExitCode, String>
where
    F: std::future::Future<Output = Result<ExitCode, String>> + 'static,
{
    corebus::runtime::block_on(None, fut)?
}

pub use corebus::units::{parse_bytes, parse_duration, parse_millis};
