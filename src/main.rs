//! The `corebus` binary: the broker (`serve`) and its command-line client.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corebus: error: {e}");
            ExitCode::FAILURE
        }
    }
}
