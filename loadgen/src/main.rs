//! corebus-loadgen: the bundled load generator. Modes so far: `subscribe` (the receive path
//! of event subscriptions, see `subscribe.rs`); the produce/consume modes are being built (see
//! their issue).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod subscribe;

/// corebus-loadgen: drive a corebus broker and measure it.
#[derive(Parser, Debug)]
#[command(name = "corebus-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Publish events, then receive and ack them through a subscription with concurrent
    /// receivers: events/s received and acked, receive→ack latency.
    Subscribe(subscribe::SubscribeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Subscribe(args) => subscribe::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corebus-loadgen: error: {e}");
            ExitCode::FAILURE
        }
    }
}
