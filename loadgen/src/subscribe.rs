//! `corebus-loadgen subscribe`: the receive path of event subscriptions under load.
//!
//! Creates a topic and a subscription (unless they exist), publishes `--events` events with
//! the batching producer, then runs `--receivers` concurrent receivers, each on its own
//! connection, that receive up to `--batch` events at a time and ack them all at once. Reports
//! events/s received and acked, and the latency from a receive's reply to its ack's reply
//! (what a receiver that does no work of its own sees), plus the receive call's own latency.
//! Optionally (`--publish-during`) publishes while receiving, to measure the path from a
//! produce to its delivery.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use corebus::client::{Client, ClientError, ClientOptions, Producer, ProducerOptions};
use corebus::clock::now_ms;
use corebus::record::RecordWriter;
use corebus::subscription::SubscriptionConfig;
use hdrhistogram::Histogram;

/// Options of the subscribe mode.
#[derive(clap::Args, Debug)]
pub struct SubscribeArgs {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// Topic to use (created with --partitions if missing).
    #[arg(long, default_value = "loadgen-subs")]
    topic: String,
    /// Partitions of a created topic.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Subscription to use (created if missing).
    #[arg(long, default_value = "loadgen")]
    subscription: String,
    /// Events to publish and then receive.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Bytes of each event's value.
    #[arg(long, default_value_t = 256)]
    message_bytes: usize,
    /// Concurrent receivers (each its own connection).
    #[arg(long, default_value_t = 4)]
    receivers: usize,
    /// Most events per receive.
    #[arg(long, default_value_t = 100)]
    batch: u32,
    /// Lock duration of a created subscription, in seconds.
    #[arg(long, default_value_t = 60)]
    lock_seconds: u32,
    /// Publish while receiving instead of before.
    #[arg(long)]
    publish_during: bool,
    /// Pin the load generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())
}

fn describe(name: &str, h: &Histogram<u64>) -> String {
    format!(
        "{name}: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    )
}

async fn connect(addr: &str) -> Result<Client, String> {
    Client::connect(addr, ClientOptions::default())
        .await
        .map_err(|e| e.to_string())
}

async fn setup(args: &SubscribeArgs) -> Result<(), String> {
    let client = connect(&args.addr).await?;
    match client.create_topic(&args.topic, args.partitions).await {
        Ok(()) => {}
        Err(ClientError::Api(e))
            if e.code == corebus::protocol::wire::ErrorCode::TopicAlreadyExists => {}
        Err(e) => return Err(format!("creating topic {}: {e}", args.topic)),
    }
    let config = SubscriptionConfig {
        lock_duration_ms: args.lock_seconds * 1000,
        ..SubscriptionConfig::default()
    };
    match client
        .create_subscription(&args.topic, &args.subscription, &config)
        .await
    {
        Ok(_) => Ok(()),
        Err(ClientError::Api(e))
            if e.code == corebus::protocol::wire::ErrorCode::SubscriptionAlreadyExists =>
        {
            Ok(())
        }
        Err(e) => Err(format!("creating subscription {}: {e}", args.subscription)),
    }
}

async fn publish(
    addr: String,
    topic: String,
    events: u64,
    size: usize,
) -> Result<Duration, String> {
    let client = Rc::new(connect(&addr).await?);
    let partitions = client
        .partition_count(&topic)
        .await
        .map_err(|e| e.to_string())?
        .max(1);
    let mut producer = Producer::new(Rc::clone(&client), &topic, ProducerOptions::default());
    let value = vec![b'x'; size];
    let started = Instant::now();
    let mut acks = Vec::with_capacity(events as usize);
    for i in 0..events {
        let id = format!("ev-{i}");
        let record = RecordWriter {
            timestamp_ms: now_ms(),
            value: &value,
            id: &id,
            source: "/loadgen",
            event_type: "loadgen.event",
            subject: "loadgen",
            ..RecordWriter::default()
        };
        acks.push(
            producer
                .send((i % u64::from(partitions)) as u32, &record)
                .await,
        );
    }
    producer.flush().await;
    for ack in acks {
        match ack.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("publish failed: {e}")),
            Err(_) => return Err("publish dropped".into()),
        }
    }
    Ok(started.elapsed())
}

struct Totals {
    received: Cell<u64>,
    acked: Cell<u64>,
    failed_acks: Cell<u64>,
    redelivered: Cell<u64>,
}

async fn receiver(
    args: Rc<SubscribeArgs>,
    totals: Rc<Totals>,
    deadline: Instant,
) -> Result<(Histogram<u64>, Histogram<u64>, Histogram<u64>), String> {
    let client = connect(&args.addr).await?;
    let mut to_ack = histogram()?;
    let mut receive_call = histogram()?;
    let mut end_to_end = histogram()?;
    while totals.acked.get() < args.events && Instant::now() < deadline {
        let asked = Instant::now();
        let events = client
            .receive(
                &args.topic,
                &args.subscription,
                args.batch,
                Duration::from_millis(200),
            )
            .await
            .map_err(|e| format!("receive: {e}"))?;
        if events.is_empty() {
            continue;
        }
        let received = Instant::now();
        let _ = receive_call.record(received.duration_since(asked).as_micros() as u64);
        totals
            .received
            .set(totals.received.get() + events.len() as u64);
        let now = now_ms();
        for e in &events {
            if e.delivery_count > 1 {
                totals.redelivered.set(totals.redelivered.get() + 1);
            }
            if let Ok(r) = e.record() {
                let _ = end_to_end.record((now - r.timestamp_ms).max(0) as u64 * 1000);
            }
        }
        let tokens: Vec<String> = events.iter().map(|e| e.lock_token.clone()).collect();
        let results = client
            .ack(&args.topic, &args.subscription, &tokens)
            .await
            .map_err(|e| format!("ack: {e}"))?;
        let _ = to_ack.record(received.elapsed().as_micros() as u64);
        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
        totals.acked.set(totals.acked.get() + ok);
        totals
            .failed_acks
            .set(totals.failed_acks.get() + results.len() as u64 - ok);
    }
    Ok((to_ack, receive_call, end_to_end))
}

/// Runs the subscribe mode.
pub fn run(args: SubscribeArgs) -> Result<(), String> {
    let cpu = args.cpu;
    corebus::runtime::block_on(cpu, async move { run_async(args).await })?
}

async fn run_async(args: SubscribeArgs) -> Result<(), String> {
    setup(&args).await?;
    let args = Rc::new(args);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    let publisher = glommio::spawn_local(publish(
        args.addr.clone(),
        args.topic.clone(),
        args.events,
        args.message_bytes,
    ));
    if !args.publish_during {
        let took = publisher.await?;
        println!(
            "published {} events of {} B in {:.2} s ({:.0}/s)",
            args.events,
            args.message_bytes,
            took.as_secs_f64(),
            args.events as f64 / took.as_secs_f64()
        );
        run_receivers(&args, deadline).await
    } else {
        let publisher = publisher.detach();
        let result = run_receivers(&args, deadline).await;
        if let Some(Err(e)) = publisher.await {
            return Err(e);
        }
        result
    }
}

async fn run_receivers(args: &Rc<SubscribeArgs>, deadline: Instant) -> Result<(), String> {
    let totals = Rc::new(Totals {
        received: Cell::new(0),
        acked: Cell::new(0),
        failed_acks: Cell::new(0),
        redelivered: Cell::new(0),
    });
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.receivers.max(1))
        .map(|_| glommio::spawn_local(receiver(Rc::clone(args), Rc::clone(&totals), deadline)))
        .collect();
    let mut to_ack = histogram()?;
    let mut receive_call = histogram()?;
    let mut end_to_end = histogram()?;
    for task in tasks {
        let (a, r, e) = task.await?;
        to_ack.add(a).map_err(|e| e.to_string())?;
        receive_call.add(r).map_err(|e| e.to_string())?;
        end_to_end.add(e).map_err(|e| e.to_string())?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} receivers, batch {}: {} events received, {} acked in {:.2} s: {:.0} events/s received and acked; {} redelivered, {} acks refused",
        args.receivers,
        args.batch,
        totals.received.get(),
        totals.acked.get(),
        secs,
        totals.acked.get() as f64 / secs,
        totals.redelivered.get(),
        totals.failed_acks.get()
    );
    println!("{}", describe("receive→ack (reply to reply)", &to_ack));
    println!("{}", describe("receive call", &receive_call));
    if args.publish_during {
        println!(
            "{}",
            describe("publish→receive (record time to reply)", &end_to_end)
        );
    }
    if totals.acked.get() < args.events {
        return Err(format!(
            "only {} of {} events acked before the deadline",
            totals.acked.get(),
            args.events
        ));
    }
    Ok(())
}
