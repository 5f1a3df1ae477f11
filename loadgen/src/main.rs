//! corebus-loadgen: the bundled load generator.
//!
//! One glommio executor (pinned with `--cpu`) runs every producer and consumer as tasks over
//! the shard-aware client. Producers run closed loop (`--in-flight` requests each) or open loop
//! (`--rate`, latency from intended send times); consumers check every message; HdrHistograms
//! give publish→ack and end-to-end percentiles. With no arguments it starts an embedded broker
//! and runs a short benchmark.

mod args;
mod consumer;
mod embedded;
mod host;
mod payload;
mod producer;
mod report;
mod stats;
mod subscribe;

use std::cell::{Cell, RefCell};
use std::process::ExitCode;
use std::rc::Rc;

use clap::Parser;
use corebus::client::{Client, ClientOptions};
use corebus::protocol::wire::ErrorCode;

use args::Args;
use stats::{Clock, Stats};

/// corebus-loadgen: load a corebus broker and report throughput and latency percentiles.
/// With no arguments it runs a short benchmark against an embedded broker.
#[derive(Parser, Debug)]
#[command(
    name = "corebus-loadgen",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    args: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Mode {
    /// Publish events, then receive and ack them through a subscription with concurrent
    /// receivers: events/s received and acked, receive→ack latency.
    Subscribe(subscribe::SubscribeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Mode::Subscribe(sub)) = cli.mode {
        return match subscribe::run(sub) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("corebus-loadgen: error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut args = cli.args;
    match run(&mut args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corebus-loadgen: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &mut Args) -> Result<ExitCode, String> {
    args.validate()?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut broker = None;
    let addr = match &args.addr {
        Some(addr) => addr.clone(),
        None => {
            args.embedded = true;
            if cpus >= 2 {
                // Broker and generator on different cores, as the benchmarks require.
                args.broker_cpu.get_or_insert(0);
                args.cpu.get_or_insert(1);
            }
            let started = embedded::Embedded::start(args)?;
            eprintln!(
                "corebus-loadgen: embedded broker on {} (data dir {}, durability {}, broker CPU {:?}, generator CPU {:?})",
                started.addr,
                started.data_dir().display(),
                args.durability.as_str(),
                args.broker_cpu,
                args.cpu
            );
            let addr = started.addr.clone();
            broker = Some(started);
            addr
        }
    };
    let topic = args.topic.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("loadgen-{}-{now}", std::process::id())
    });
    args.topic = Some(topic.clone());
    let spin = args.resolved_spin();
    args.spin = Some(spin);
    let run_args = args.clone();
    let outcome = corebus::runtime::block_on_polling(args.cpu, spin, async move {
        load(run_args, addr, topic).await
    })?;
    if let Some(mut b) = broker {
        b.stop()?;
    }
    let (report, stats) = outcome?;
    report::print(&report, &stats);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(if report.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn load(args: Args, addr: String, topic: String) -> Result<(report::Report, Stats), String> {
    let client = Rc::new(
        Client::connect(&addr, ClientOptions::default())
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?,
    );
    match client.create_topic(&topic, args.partitions).await {
        Ok(()) => {}
        Err(e)
            if e.api()
                .is_some_and(|a| a.code == ErrorCode::TopicAlreadyExists) => {}
        Err(e) => return Err(format!("creating topic {topic}: {e}")),
    }
    let partitions = client
        .partition_count(&topic)
        .await
        .map_err(|e| e.to_string())?;
    let start = consumer::current_ends(&client, &topic, partitions).await?;
    let clock = Clock::new();
    let warmup_ns = args.warmup.as_nanos() as u64;
    let stop_ns = warmup_ns + args.duration.as_nanos() as u64;
    let stats = Rc::new(Stats::new(warmup_ns));
    let filler = Rc::new(payload::Filler::new(args.message_size, args.payload));
    let acked_end = Rc::new(RefCell::new(start.clone()));
    let producers_done = Rc::new(Cell::new(false));
    let stop_progress = Rc::new(Cell::new(false));
    let progress = glommio::spawn_local(stats::progress(
        Rc::clone(&stats),
        Rc::clone(&stop_progress),
    ));
    // Where the machine's CPU time goes is read from the end of the warmup on.
    let host_at_warmup_end = Rc::new(RefCell::new(None));
    let _host_sampler = {
        let slot = Rc::clone(&host_at_warmup_end);
        let warmup = args.warmup;
        glommio::spawn_local(async move {
            glommio::timer::sleep(warmup).await;
            *slot.borrow_mut() = Some(host::sample());
        })
    };
    let producer_shared = Rc::new(producer::Shared {
        client: Rc::clone(&client),
        topic: topic.clone(),
        args: args.clone(),
        stats: Rc::clone(&stats),
        clock,
        filler: Rc::clone(&filler),
        stop_ns,
        acked_end: Rc::clone(&acked_end),
    });
    let consumer_shared = Rc::new(consumer::Shared {
        client: Rc::clone(&client),
        topic,
        stats: Rc::clone(&stats),
        clock,
        filler,
        start,
        producers_done: Rc::clone(&producers_done),
        targets: Rc::clone(&acked_end),
    });
    let mut consume_window = args.duration;
    if args.catch_up {
        producer::run(producer_shared).await;
        producers_done.set(true);
        let started = std::time::Instant::now();
        if args.consumers > 0 {
            consumer::run(Rc::clone(&consumer_shared), args.consumers).await;
        }
        consume_window = started.elapsed();
    } else {
        let consumers = (args.consumers > 0).then(|| {
            glommio::spawn_local(consumer::run(Rc::clone(&consumer_shared), args.consumers))
        });
        producer::run(producer_shared).await;
        producers_done.set(true);
        if let Some(c) = consumers {
            c.await;
        }
    }
    stop_progress.set(true);
    progress.await;
    let mut extra_errors = 0;
    if args.consumers > 0 && stats.consumed_total.get() != stats.acked_total.get() {
        stats.error(format!(
            "{} messages acknowledged but {} consumed",
            stats.acked_total.get(),
            stats.consumed_total.get()
        ));
    }
    if stats.acked_total.get() == 0 {
        extra_errors += 1;
        stats.error("no message was acknowledged".into());
    }
    // What the topic takes on disk, against the payload of every acknowledged message, and
    // the broker's flushes.
    let broker = match client.stats().await {
        Ok(s) => report::BrokerFigures::of(&s, &consumer_shared.topic),
        Err(e) => {
            stats.error(format!("stats: {e}"));
            report::BrokerFigures::default()
        }
    };
    let host_cpu = host_at_warmup_end
        .borrow()
        .as_ref()
        .map(|before| host::shares(before, &host::sample()))
        .unwrap_or_default();
    let report = report::build(
        &args,
        &stats,
        args.duration,
        consume_window,
        extra_errors,
        &host_cpu,
        &broker,
    );
    drop(consumer_shared);
    let stats = Rc::try_unwrap(stats)
        .map_err(|_| "stats still shared at the end of the run".to_string())?;
    Ok((report, stats))
}
