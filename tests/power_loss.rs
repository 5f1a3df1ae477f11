//! Power loss: the broker runs a workload with its disk trace on (`COREBUS_DISK_TRACE`),
//! then `storage::power_loss` makes the disk images a power cut could have left at points
//! of that history, and the real broker restarts on each. Every record acknowledged before
//! the cut must be served at its offset, byte for byte; nothing is served that was not
//! written there; group offsets and subscription acks acknowledged before the cut hold.
//!
//! A kill -9 can not test this: O_DIRECT writes and the page cache outlive the process, so
//! a broker without a single `fdatasync` passes every kill -9 test. Here the images keep
//! only what the rules make durable, so `power_loss_catches_a_missing_sync` shows that a
//! broker built to skip its data sync fails.
//!
//! `COREBUS_CRASH_POINTS` (cuts per run, default 30) and `COREBUS_CRASH_SEED` (default: from
//! the clock, printed) size and repeat a run; docs/operations.md has the long run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::{fresh_dir, Broker};
use corebus::client::{Client, ClientError, ClientOptions};
use corebus::protocol::wire::ErrorCode;
use corebus::record::{BatchBuilder, BatchIter, Decompressor, RecordWriter};
use corebus::storage::disk_trace;
use corebus::storage::power_loss::{History, Rng};
use corebus::subscription::SubscriptionConfig;

const TOPIC: &str = "pl";
const SUBSCRIPTION: &str = "audit";
const GROUP: &str = "readers";

/// One configuration of the broker under test.
struct Setup {
    name: &'static str,
    partitions: u32,
    group_commit: &'static str,
    /// `COREBUS_FAILURE_PROBES` for the traced run (a deliberately broken broker).
    probes: Option<&'static str>,
    /// Flags besides the common ones.
    extra: &'static [&'static str],
    rounds: u32,
}

/// What the workload sent and was told.
#[derive(Default)]
struct Sent {
    /// Per partition: offset → record value, from the produce acknowledgements.
    values: Vec<BTreeMap<u64, Vec<u8>>>,
}

fn broker_flags(group_commit: &str, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--segment-bytes",
        "256KiB",
        "--preallocate-bytes",
        "64KiB",
        "--prewrite-bytes",
        "64KiB",
        "--retention-bytes",
        "300KiB",
        "--retention-check-interval",
        "100ms",
        "--checkpoint-interval",
        "50ms",
        "--group-commit",
        group_commit,
    ]
    .chunks(2)
    .filter(|pair| !extra.contains(&pair[0])) // `extra` overrides
    .flatten()
    .map(|s| s.to_string())
    .collect();
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// A record value that names its partition, round and place, of a length that varies.
fn value(partition: u32, round: u32, i: u32) -> Vec<u8> {
    let mut v = format!("p{partition}-r{round}-i{i}-").into_bytes();
    let len = 300 + ((round * 7919 + i * 104_729 + partition * 31) % 5000) as usize;
    let fill = (round as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
    v.resize(len, fill);
    v
}

/// Produces `rounds` rounds (a batch to each partition, all in flight at once), commits the
/// group's offsets and acks subscription events along the way.
async fn workload(client: Client, partitions: u32, rounds: u32) -> Sent {
    client
        .create_topic(TOPIC, partitions)
        .await
        .expect("create topic");
    client
        .create_subscription(TOPIC, SUBSCRIPTION, &SubscriptionConfig::default())
        .await
        .expect("create subscription");
    let mut sent = Sent {
        values: vec![BTreeMap::new(); partitions as usize],
    };
    for round in 0..rounds {
        let mut replies = Vec::new();
        let mut batches = Vec::new();
        for p in 0..partitions {
            let records = 1 + (round + p) % 4;
            let values: Vec<Vec<u8>> = (0..records).map(|i| value(p, round, i)).collect();
            let mut b = BatchBuilder::new();
            for v in &values {
                b.push(&RecordWriter {
                    timestamp_ms: 1_000 + i64::from(round),
                    value: v,
                    ..RecordWriter::default()
                });
            }
            let reply = client
                .produce_submit(TOPIC, p, Bytes::from(b.finish()))
                .await
                .expect("submit produce");
            replies.push((p, reply));
            batches.push(values);
        }
        for ((p, reply), values) in replies.into_iter().zip(batches) {
            let (base, last) = corebus::client::produce_result(reply, p)
                .await
                .expect("produce acknowledged");
            assert_eq!(last - base + 1, values.len() as u64);
            for (i, v) in values.into_iter().enumerate() {
                sent.values[p as usize].insert(base + i as u64, v);
            }
        }
        if round % 8 == 7 {
            let offsets: Vec<(u32, u64)> = (0..partitions)
                .map(|p| {
                    let next = sent.values[p as usize].keys().last().map_or(0, |o| o + 1);
                    (p, next / 2 + u64::from(round))
                })
                .collect();
            for (_, r) in client
                .commit_offsets(GROUP, TOPIC, &offsets)
                .await
                .expect("commit")
            {
                r.expect("commit accepted");
            }
        }
        if round % 5 == 4 {
            let events = client
                .receive(TOPIC, SUBSCRIPTION, 12, Duration::ZERO)
                .await
                .expect("receive");
            let tokens: Vec<String> = events.iter().map(|e| e.lock_token.clone()).collect();
            if !tokens.is_empty() {
                for r in client.ack(TOPIC, SUBSCRIPTION, &tokens).await.expect("ack") {
                    r.expect("ack accepted");
                }
            }
        }
    }
    sent
}

/// What a broker serves after a restart on a crash image.
struct Served {
    /// Per partition: offset → value.
    values: Vec<BTreeMap<u64, Vec<u8>>>,
    /// Per partition: the group's committed offset.
    group: Vec<Option<u64>>,
    /// (partition, offset) of every event the subscription delivers; `None`: the broker does
    /// not know the subscription.
    delivered: Option<BTreeSet<(u32, u64)>>,
}

async fn read_everything(client: Client, partitions: u32) -> Result<Served, String> {
    let mut served = Served {
        values: vec![BTreeMap::new(); partitions as usize],
        group: vec![None; partitions as usize],
        delivered: Some(BTreeSet::new()),
    };
    let topics = client
        .list_topics()
        .await
        .map_err(|e| format!("list topics: {e}"))?;
    match topics.iter().find(|(name, _)| name == TOPIC) {
        None => return Ok(served), // cut before the topic was durable: checked against the acks
        Some((_, count)) if *count != partitions => {
            return Err(format!(
                "the topic has {count} partitions, not {partitions}"
            ));
        }
        Some(_) => {}
    }
    for p in 0..partitions {
        let mut offset = 0;
        loop {
            let fetched = match client.fetch(TOPIC, p, offset, 1 << 20, 0).await {
                Ok(fetched) => fetched,
                Err(ClientError::OffsetOutOfRange {
                    log_start_offset,
                    high_watermark,
                    ..
                }) if offset < log_start_offset || offset == high_watermark => {
                    if offset >= high_watermark {
                        break;
                    }
                    offset = log_start_offset;
                    continue;
                }
                Err(e) => return Err(format!("fetch {p}@{offset}: {e}")),
            };
            let before = offset;
            for batch in BatchIter::new(&fetched.batches) {
                let batch = batch.map_err(|e| format!("partition {p}: a bad batch: {e}"))?;
                let base = batch.header().base_offset();
                let mut decompressor = Decompressor::new();
                let records = batch
                    .records(&mut decompressor)
                    .map_err(|e| format!("partition {p}: a bad batch: {e}"))?;
                for r in records {
                    let r = r.map_err(|e| format!("partition {p}: a bad record: {e}"))?;
                    let at = base + u64::from(r.offset_delta);
                    if at >= offset {
                        served.values[p as usize].insert(at, r.value.to_vec());
                        offset = at + 1;
                    }
                }
            }
            if offset >= fetched.high_watermark || offset == before {
                break;
            }
        }
    }
    for (p, r) in client
        .fetch_offsets(GROUP, TOPIC, &[])
        .await
        .map_err(|e| format!("fetch offsets: {e}"))?
    {
        let slot = served
            .group
            .get_mut(p as usize)
            .ok_or_else(|| format!("fetch offsets answered partition {p}"))?;
        *slot = r.map_err(|e| format!("group offset of {p}: {e}"))?;
    }
    let mut delivered = BTreeSet::new();
    loop {
        let events = match client
            .receive(TOPIC, SUBSCRIPTION, 1000, Duration::ZERO)
            .await
        {
            Ok(events) => events,
            Err(ClientError::Api(e)) if e.code == ErrorCode::UnknownSubscription => {
                served.delivered = None;
                return Ok(served);
            }
            Err(e) => return Err(format!("receive: {e}")),
        };
        if events.is_empty() {
            break;
        }
        delivered.extend(events.iter().map(|e| (e.partition, e.offset)));
    }
    served.delivered = Some(delivered);
    Ok(served)
}

fn run_client<T: Send + 'static>(
    addr: String,
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    std::thread::spawn(move || {
        corebus::runtime::block_on(None, async move {
            let client = Client::connect(&addr, ClientOptions::default())
                .await
                .expect("connect");
            body(client).await
        })
        .expect("executor")
    })
    .join()
    .expect("client thread")
}

fn partition_dir(data: &Path, p: u32) -> String {
    data.join("topics")
        .join(TOPIC)
        .join(p.to_string())
        .to_string_lossy()
        .into_owned()
}

/// Offsets below which retention may have removed acknowledged records by event `cut`:
/// per partition, the newest log start a retention pass announced before it (the pass
/// checkpoints that start before it unlinks, and recovery finishes what it began).
fn retention_floor(history: &History, data: &Path, partitions: u32, cut: usize) -> Vec<u64> {
    let mut floors = vec![0; partitions as usize];
    for (_, note) in history.notes().iter().filter(|(at, _)| *at < cut) {
        if let ["retention", dir, start] = note.split(' ').collect::<Vec<_>>().as_slice() {
            if let Some(p) = (0..partitions).find(|&p| partition_dir(data, p) == *dir) {
                let start = start.parse().unwrap_or(0);
                floors[p as usize] = floors[p as usize].max(start);
            }
        }
    }
    floors
}

/// Checks what a broker restarted on the image of `cut` serves; returns what is wrong.
fn check_image(
    history: &History,
    data: &Path,
    sent: &Sent,
    served: &Served,
    cut: usize,
    partitions: u32,
) -> Vec<String> {
    let mut wrong = Vec::new();
    let floors = retention_floor(history, data, partitions, cut);
    for ack in history.acks().iter().filter(|a| a.at < cut) {
        let Some(p) = (0..partitions).find(|&p| partition_dir(data, p) == ack.dir) else {
            continue;
        };
        for o in ack.first.max(floors[p as usize])..=ack.last {
            let want = sent.values[p as usize].get(&o);
            let got = served.values[p as usize].get(&o);
            if got != want {
                wrong.push(format!(
                    "record {p}@{o} acknowledged at event {} is {} after the cut",
                    ack.at,
                    if got.is_none() {
                        "missing"
                    } else {
                        "different"
                    }
                ));
                break;
            }
        }
    }
    for (p, values) in served.values.iter().enumerate() {
        for (o, v) in values {
            if sent.values[p].get(o) != Some(v) {
                wrong.push(format!(
                    "{p}@{o} serves bytes that were never written there"
                ));
                break;
            }
        }
    }
    for (at, note) in history.notes().iter().filter(|(at, _)| *at < cut) {
        let words: Vec<&str> = note.split(' ').collect();
        match words.as_slice() {
            ["group", dir, GROUP, offset] => {
                let Some(p) = (0..partitions).find(|&p| partition_dir(data, p) == *dir) else {
                    continue;
                };
                let offset: u64 = offset.parse().unwrap_or(0);
                if served.group[p as usize].is_none_or(|o| o < offset) {
                    wrong.push(format!(
                        "group offset {offset} of partition {p}, acknowledged at event {at}, \
                         is {:?} after the cut",
                        served.group[p as usize]
                    ));
                }
            }
            ["settled", TOPIC, SUBSCRIPTION, p, offset] => {
                let key = (p.parse().unwrap_or(0), offset.parse().unwrap_or(0));
                let Some(delivered) = &served.delivered else {
                    wrong.push(format!(
                        "the subscription that acked {}@{} at event {at} is gone after the cut",
                        key.0, key.1
                    ));
                    continue;
                };
                if delivered.contains(&key) {
                    wrong.push(format!(
                        "event {}@{} acked at event {at} is delivered again after the cut",
                        key.0, key.1
                    ));
                }
            }
            _ => {}
        }
    }
    wrong
}

fn crash_points() -> usize {
    std::env::var("COREBUS_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

fn crash_seed() -> u64 {
    std::env::var("COREBUS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Runs the workload traced, then restarts the broker on images of sampled cuts; returns
/// the problems found, each with its cut and seed.
fn simulate(setup: &Setup) -> Vec<String> {
    let seed = crash_seed();
    // A broken broker is run with more cuts, so that finding its losses is never luck.
    let points = if setup.probes.is_some() {
        crash_points().max(60)
    } else {
        crash_points()
    };
    eprintln!(
        "{}: seed {seed}, {points} cuts (COREBUS_CRASH_SEED={seed} repeats it)",
        setup.name
    );
    let data = fresh_dir(setup.name);
    let trace: PathBuf = fresh_dir(&format!("{}-trace", setup.name)).join("disk.trace");
    let flags = broker_flags(setup.group_commit, setup.extra);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let trace_env = trace.to_string_lossy().into_owned();
    let mut env = vec![(disk_trace::ENV, trace_env.as_str())];
    if let Some(probes) = setup.probes {
        env.push(("COREBUS_FAILURE_PROBES", probes));
    }
    let mut broker = Broker::start_with(setup.name, 1, &flag_refs, &env, Some(data.clone()));
    let (partitions, rounds) = (setup.partitions, setup.rounds);
    let sent = run_client(broker.addr(), move |client| {
        Box::pin(workload(client, partitions, rounds))
    });
    // Retention runs on its own clock: let it unlink the first segment of every partition
    // (its index goes after its log file, so the log's unlink is in the trace by then).
    common::wait_until(
        "retention removed a segment of every partition",
        Duration::from_secs(20),
        || {
            (0..partitions).all(|p| {
                let dir = PathBuf::from(partition_dir(&data, p));
                let gone = |ext: &str| !dir.join(format!("{:020}.{ext}", 0)).exists();
                dir.exists() && gone("log") && gone("index")
            })
        },
    );
    broker.kill9();
    let bytes = std::fs::read(&trace).expect("read the trace");
    let events = disk_trace::read(&bytes).expect("parse the trace");
    let history = History::new(&events).expect("analyse the trace");
    assert!(
        history.acks().len() >= rounds as usize,
        "the trace holds the acknowledgements"
    );
    eprintln!("{}: the history: {:?}", setup.name, history.summary());
    let renamed_spares = history
        .named_paths()
        .iter()
        .filter(|p| p.ends_with(".spare"))
        .count();
    let removed_segments = history
        .removed_before(history.events())
        .iter()
        .filter(|p| p.ends_with(".log"))
        .count();
    let prewriting = !setup.extra.contains(&"--prewrite-bytes");
    assert!(
        (renamed_spares > 1 || !prewriting) && removed_segments > 0,
        "the workload rolls into spare segments and retention removes segments \
         ({renamed_spares} spares, {removed_segments} segments removed)"
    );
    let root = data.to_string_lossy().into_owned();
    // A restarted broker runs no retention of its own while it is read (its removals would
    // look like losses); what recovery does to finish a pass cut short is what is checked.
    let mut restart_extra = setup.extra.to_vec();
    restart_extra.extend(["--retention-check-interval", "1h"]);
    let restart_flags = broker_flags(setup.group_commit, &restart_extra);
    let restart_refs: Vec<&str> = restart_flags.iter().map(String::as_str).collect();
    let mut rng = Rng::new(seed);
    let interesting = history.interesting_cuts();
    let mut cuts: BTreeSet<usize> = BTreeSet::new();
    while cuts.len() < points.min(history.events()) {
        let cut = if rng.coin() && !interesting.is_empty() {
            interesting[rng.below(interesting.len() as u64) as usize]
        } else {
            1 + rng.below(history.events() as u64) as usize
        };
        cuts.insert(cut);
    }
    let mut problems = Vec::new();
    let mut kept_an_image = false;
    for cut in cuts {
        let image_seed = seed ^ (cut as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let image = history.image(cut, &root, &mut Rng::new(image_seed));
        let dir = fresh_dir(&format!("{}-cut", setup.name));
        image.write(&root, &dir).expect("write the image");
        let restarted = Broker::start_with(
            &format!("{}-cut", setup.name),
            1,
            &restart_refs,
            &[],
            Some(dir.clone()),
        );
        let served = run_client(restarted.addr(), move |client| {
            Box::pin(read_everything(client, partitions))
        });
        drop(restarted);
        let wrong = match served {
            Ok(served) => {
                let records: usize = served.values.iter().map(BTreeMap::len).sum();
                let acked = history.acks().iter().filter(|a| a.at < cut).count();
                eprintln!(
                    "{}: cut at event {cut}: {acked} acknowledgements before it, {records} \
                     records served",
                    setup.name
                );
                check_image(&history, &data, &sent, &served, cut, partitions)
            }
            Err(e) => vec![e],
        };
        if !wrong.is_empty() && !kept_an_image {
            kept_an_image = true; // the first failing image stays, to be looked at
            eprintln!(
                "{}: the image of cut {cut} is kept at {}",
                setup.name,
                dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        for w in wrong {
            problems.push(format!(
                "{}: cut at event {cut} of {} (seed {seed}): {w}",
                setup.name,
                history.events()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&data);
    if problems.is_empty() {
        let _ = std::fs::remove_dir_all(trace.parent().unwrap_or(&trace));
    }
    problems
}

fn assert_survives(setup: Setup) {
    let problems = simulate(&setup);
    assert!(
        problems.is_empty(),
        "{} problems, the first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn power_loss_keeps_acknowledged_data_shared_flush_one_partition() {
    assert_survives(Setup {
        name: "pl-shared-1",
        partitions: 1,
        group_commit: "shared-flush",
        probes: None,
        extra: &[],
        rounds: 160,
    });
}

#[test]
fn power_loss_keeps_acknowledged_data_shared_flush_four_partitions() {
    assert_survives(Setup {
        name: "pl-shared-4",
        partitions: 4,
        group_commit: "shared-flush",
        probes: None,
        extra: &[],
        rounds: 60,
    });
}

#[test]
fn power_loss_keeps_acknowledged_data_partition_sync_one_partition() {
    assert_survives(Setup {
        name: "pl-partition-1",
        partitions: 1,
        group_commit: "partition",
        probes: None,
        extra: &[],
        rounds: 160,
    });
}

#[test]
fn power_loss_keeps_acknowledged_data_partition_sync_four_partitions() {
    assert_survives(Setup {
        name: "pl-partition-4",
        partitions: 4,
        group_commit: "partition",
        probes: None,
        extra: &[],
        rounds: 60,
    });
}

#[test]
fn power_loss_catches_a_missing_sync() {
    let problems = simulate(&Setup {
        name: "pl-no-sync",
        partitions: 1,
        group_commit: "partition",
        probes: Some("fdatasync:skip:after=0"),
        extra: &[],
        rounds: 80,
    });
    eprintln!("found, as it should:\n{}", problems.join("\n"));
    assert!(
        problems.iter().any(|p| p.contains("acknowledged at event")),
        "a broker that acknowledges without fdatasync must lose acknowledged records: {problems:?}"
    );
}

#[test]
fn power_loss_keeps_acknowledged_data_syncfs_four_partitions() {
    assert_survives(Setup {
        name: "pl-syncfs-4",
        partitions: 4,
        group_commit: "syncfs",
        probes: None,
        extra: &[],
        rounds: 60,
    });
}

#[test]
fn power_loss_catches_a_broken_shared_flush_precondition() {
    // Without prewriting no flush only overwrites committed blocks; the probe makes every
    // flush share the shard's disk flush anyway, as a wrong overwrite check would.
    let problems = simulate(&Setup {
        name: "pl-bad-overwrite",
        partitions: 1,
        group_commit: "shared-flush",
        probes: Some("overwrite-check:skip:after=0"),
        extra: &["--prewrite-bytes", "0"],
        rounds: 80,
    });
    eprintln!("found, as it should:\n{}", problems.join("\n"));
    assert!(
        problems.iter().any(|p| p.contains("acknowledged at event")),
        "flushes into blocks whose allocation is not committed need their own fdatasync: \
         {problems:?}"
    );
}
