//! `corebus doctor`: checks the machine and the data directory, explaining each finding and
//! how to fix it. Exits non-zero if any check fails.

use std::path::PathBuf;
use std::process::ExitCode;

use corebus::broker::preflight::{self, Status};

/// Options of `corebus doctor`.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// The data directory to check.
    #[arg(long, default_value = "./corebus-data")]
    data_dir: PathBuf,
    /// The number of shards you plan to run [default: number of CPUs].
    #[arg(long)]
    shards: Option<usize>,
    /// The DMA pool per shard you plan to use [default: 64MiB].
    #[arg(long, default_value = "64MiB", value_parser = super::parse_bytes)]
    io_memory: u64,
    /// Skip the disk bandwidth and latency probe.
    #[arg(long)]
    no_probe: bool,
}

/// Runs every check and prints the results.
pub fn run(args: DoctorArgs) -> Result<ExitCode, String> {
    let shards = args
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let mut checks = preflight::fatal_checks(&args.data_dir, shards, args.io_memory as usize);
    checks.push(preflight::cpus(shards));
    let data_ok = checks
        .iter()
        .all(|c| c.name != "data dir" || c.status != Status::Fail);
    if !args.no_probe && data_ok {
        checks.push(preflight::disk_probe(&args.data_dir));
    }
    for check in &checks {
        println!("{}", check.render());
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if failed > 0 {
        println!("\n{failed} check(s) failed: corebus serve would refuse to start.");
        return Ok(ExitCode::FAILURE);
    }
    println!("\nall checks passed");
    Ok(ExitCode::SUCCESS)
}
