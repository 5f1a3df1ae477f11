//! The storage engine against the real binary: kill -9 soak, mid-log corruption, a full disk
//! on a real ext4, fdatasync EIO, segment roll, retention and reads across segments.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ok_stdout, parse_acks, parse_consumed, sh, wait_until, Broker, COREBUS};

/// A small xorshift generator: the soak's kill moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        println!("rng seed {seed}");
        Self(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A `corebus publish --print-acks` process fed continuously from a thread.
struct Publisher {
    child: std::process::Child,
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<String>>>,
    ack_count: Arc<AtomicUsize>,
    feeder: Option<std::thread::JoinHandle<()>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    fn start(addr: &str, topic: &str, prefix: String) -> Self {
        let mut child = Command::new(COREBUS)
            .args([
                "publish",
                topic,
                "--print-acks",
                "--batch-records",
                "20",
                "--delivery-timeout",
                "0",
            ])
            .env("COREBUS_ADDR", addr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn publisher");
        let stop = Arc::new(AtomicBool::new(false));
        let mut stdin = child.stdin.take().expect("stdin");
        let stop_feeding = Arc::clone(&stop);
        let feeder = std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop_feeding.load(Ordering::SeqCst) {
                let mut chunk = String::new();
                for _ in 0..20 {
                    chunk.push_str(&format!("{prefix}-{i}\n"));
                    i += 1;
                }
                if stdin.write_all(chunk.as_bytes()).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let acks = Arc::new(Mutex::new(Vec::new()));
        let ack_count = Arc::new(AtomicUsize::new(0));
        let (sink, counter) = (Arc::clone(&acks), Arc::clone(&ack_count));
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut acks) = sink.lock() {
                    acks.push(line);
                }
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            child,
            stop,
            acks,
            ack_count,
            feeder: Some(feeder),
            reader: Some(reader),
        }
    }

    fn acked(&self) -> usize {
        self.ack_count.load(Ordering::SeqCst)
    }

    /// Stops feeding, waits for the process, returns its `--print-acks` lines.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(f) = self.feeder.take() {
            let _ = f.join();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

#[test]
fn kill9_soak_loses_no_acknowledged_message() {
    const ROUNDS: usize = 22;
    let mut rng = Rng::new();
    let mut broker = Broker::start("soak", 2, &["--checkpoint-interval", "50ms"]);
    ok_stdout(&broker.cli(&["topic", "create", "soak", "--partitions", "4"], ""));
    let mut acked: HashMap<(u32, u64), String> = HashMap::new();
    for round in 0..ROUNDS {
        let publisher = Publisher::start(&broker.addr(), "soak", format!("r{round}"));
        let target = 50 + rng.below(1500) as usize;
        wait_until("acknowledgements", Duration::from_secs(30), || {
            publisher.acked() >= target
        });
        // Vary the moment of the kill within the flush cycle.
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        broker.kill9();
        let lines = publisher.finish();
        for (line, partition, offset) in parse_acks(&lines.join("\n")) {
            let value = format!("r{round}-{line}");
            if let Some(previous) = acked.insert((partition, offset), value.clone()) {
                panic!("offset {partition}/{offset} acknowledged twice: {previous} then {value}");
            }
        }
        broker.restart();
    }
    let out = ok_stdout(&broker.cli(
        &[
            "consume",
            "soak",
            "--format",
            "json",
            "--idle-timeout",
            "2s",
        ],
        "",
    ));
    let consumed = parse_consumed(&out);
    let mut at: HashMap<(u32, u64), String> = HashMap::new();
    for c in &consumed {
        assert!(
            at.insert((c.partition, c.offset), c.value.clone())
                .is_none(),
            "offset {}/{} read twice",
            c.partition,
            c.offset
        );
    }
    let mut times_read: HashMap<&str, usize> = HashMap::new();
    for c in &consumed {
        *times_read.entry(c.value.as_str()).or_default() += 1;
    }
    let lost = acked
        .iter()
        .filter(|(pos, value)| {
            at.get(pos) != Some(value) || times_read.get(value.as_str()) != Some(&1)
        })
        .count();
    println!(
        "acknowledged lost: {lost} of {} ({ROUNDS} kill -9 rounds)",
        acked.len()
    );
    assert_eq!(lost, 0, "acknowledged messages lost or altered");
    assert!(acked.len() > ROUNDS * 50);
}

/// Finds the segment files of `topic/partition`.
fn segment_files(data_dir: &Path, topic: &str, partition: u32) -> Vec<PathBuf> {
    let dir = data_dir
        .join("topics")
        .join(topic)
        .join(partition.to_string());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("partition dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

#[test]
fn corruption_in_acknowledged_data_is_reported_not_served_and_not_truncated() {
    let mut broker = Broker::start("corrupt", 1, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "c", "--partitions", "1"], ""));
    let input: String = (0..2000).map(|i| format!("value-{i:04}\n")).collect();
    let acks = parse_acks(&ok_stdout(&broker.cli(
        &["publish", "c", "--print-acks", "--batch-records", "10"],
        &input,
    )));
    assert_eq!(acks.len(), 2000);
    assert!(broker.terminate().success());
    // Flip one bit in the middle of the record data of a batch near offset 1000.
    let file = segment_files(&broker.data_dir, "c", 0).remove(0);
    let mut bytes = std::fs::read(&file).expect("segment");
    let needle = b"value-1003";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("record in file");
    bytes[at + 3] ^= 0x04;
    let len_before = bytes.len();
    std::fs::write(&file, &bytes).expect("write back");
    broker.restart();
    // Reading from the start stops with a clear error at the damaged batch.
    let out = broker.cli(&["consume", "c", "--idle-timeout", "1s"], "");
    assert!(
        !out.status.success(),
        "a read across corrupt data must fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CorruptData"), "stderr: {err}");
    let served = String::from_utf8_lossy(&out.stdout);
    assert!(
        served.contains("value-0999\n"),
        "data before the damage is served"
    );
    assert!(
        !served.contains("value-1003"),
        "damaged data must not be served"
    );
    assert!(
        broker.log_text().contains("CORRUPT"),
        "the broker reports it loudly"
    );
    // Data after the damaged batch is still served.
    let out = ok_stdout(&broker.cli(
        &["consume", "c", "--from", "1010", "--idle-timeout", "1s"],
        "",
    ));
    assert_eq!(out.lines().count(), 990);
    assert!(out.starts_with("value-1010\n"));
    // Nothing was truncated, and after a crash the log still holds everything after it.
    assert!(std::fs::metadata(&file).expect("segment").len() as usize >= len_before.min(at));
    broker.kill9();
    broker.restart();
    let out = ok_stdout(&broker.cli(
        &["consume", "c", "--from", "1010", "--idle-timeout", "1s"],
        "",
    ));
    assert_eq!(out.lines().count(), 990);
    let acks = parse_acks(&ok_stdout(
        &broker.cli(&["publish", "c", "--print-acks"], "new\n"),
    ));
    assert_eq!(
        acks,
        vec![(0, 0, 2000)],
        "appends continue after the last offset"
    );
}

#[test]
fn fdatasync_eio_is_fatal_for_the_partition_never_retried_never_acknowledged() {
    let mut broker = Broker::start_with(
        "eio",
        1,
        &[],
        &[("COREBUS_FAILURE_PROBES", "fdatasync:eio:after=5")],
        None,
    );
    ok_stdout(&broker.cli(&["topic", "create", "e", "--partitions", "1"], ""));
    let mut acked = Vec::new();
    let mut failed_publishes = 0;
    for i in 0..10 {
        let out = broker.cli(&["publish", "e", "--print-acks"], &format!("m{i}\n"));
        if out.status.success() {
            acked.extend(
                parse_acks(&String::from_utf8_lossy(&out.stdout))
                    .into_iter()
                    .map(|(_, _, o)| (o, format!("m{i}"))),
            );
        } else {
            failed_publishes += 1;
            assert!(
                out.stdout.is_empty(),
                "a failed message must not be acknowledged"
            );
        }
    }
    assert_eq!(acked.len(), 5, "the first five syncs succeed");
    assert_eq!(failed_publishes, 5);
    let log = broker.log_text();
    assert!(log.contains("FATAL"), "{log}");
    assert_eq!(
        log.matches("failure probe Fdatasync fired").count(),
        1,
        "the failed sync is never retried and the read-only log syncs no more: {log}"
    );
    assert!(broker.is_running(), "the broker stays up");
    // After a restart (disk "repaired") every acknowledged message is there.
    broker.kill9();
    broker.set_env(&[]);
    broker.restart();
    let out = ok_stdout(&broker.cli(
        &["consume", "e", "--format", "json", "--idle-timeout", "1s"],
        "",
    ));
    let consumed = parse_consumed(&out);
    for (offset, value) in &acked {
        assert!(
            consumed
                .iter()
                .any(|c| c.offset == *offset && &c.value == value),
            "acknowledged {value} at {offset} missing"
        );
    }
}

/// Kills the broker, restarts it without failure probes (the disk "repaired") and returns
/// every (partition, offset, value) of `topic`, sorted.
fn restart_on_a_repaired_disk(broker: &mut Broker, topic: &str) -> Vec<(u32, u64, String)> {
    broker.kill9();
    broker.set_env(&[]);
    broker.restart();
    let out = ok_stdout(&broker.cli(
        &["consume", topic, "--format", "json", "--idle-timeout", "1s"],
        "",
    ));
    let mut got: Vec<(u32, u64, String)> = parse_consumed(&out)
        .into_iter()
        .map(|c| (c.partition, c.offset, c.value))
        .collect();
    got.sort();
    got
}

/// Issue 16, finding 3 (fsyncgate): a failed sync says the device may have lost writes of
/// every file on it, so every partition of the shard turns read-only, not only the one whose
/// sync failed; acknowledged data survives, and a restart on a repaired disk writes again.
#[test]
fn a_failed_sync_turns_every_partition_of_the_shard_read_only() {
    let mut broker = Broker::start_with(
        "eio-device",
        1,
        &[],
        &[("COREBUS_FAILURE_PROBES", "fdatasync:eio:once=2")],
        None,
    );
    ok_stdout(&broker.cli(&["topic", "create", "d", "--partitions", "2"], ""));
    let publish = |broker: &Broker, partition: &str, value: &str| {
        broker.cli(
            &["publish", "d", "--partition", partition, "--print-acks"],
            &format!("{value}\n"),
        )
    };
    assert_eq!(
        parse_acks(&ok_stdout(&publish(&broker, "0", "a0"))),
        vec![(0, 0, 0)]
    );
    assert_eq!(
        parse_acks(&ok_stdout(&publish(&broker, "1", "b0"))),
        vec![(0, 1, 0)]
    );
    let failed = publish(&broker, "0", "a1");
    assert!(!failed.status.success() && failed.stdout.is_empty());
    // Partition 1 synced nothing that failed, but its writes sat in the same disk cache.
    let other = publish(&broker, "1", "b1");
    assert!(
        !other.status.success(),
        "the other partition must refuse writes"
    );
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("ReadOnly") && stderr.contains("data device"),
        "{stderr}"
    );
    assert!(broker
        .log_text()
        .contains("every partition and subscription state of the shard is now read-only"));

    let mut got = restart_on_a_repaired_disk(&mut broker, "d");
    // a1 was written but its sync failed: never acknowledged, it may or may not be there
    // (at-least-once). b1 was refused before any write.
    got.retain(|(p, o, _)| (*p, *o) != (0, 1));
    assert_eq!(got, vec![(0, 0, "a0".into()), (1, 0, "b0".into())]);
    assert_eq!(
        parse_acks(&ok_stdout(&publish(&broker, "1", "b2"))),
        vec![(0, 1, 1)]
    );
}

/// Issue 16, finding 3: an `EIO` from a data write poisons the device like a failed sync, and
/// the shard that sees it tells the others (they share the device): their partitions and
/// subscription states turn read-only too; a restart on a repaired disk writes again.
#[test]
fn a_write_eio_on_one_shard_turns_every_shard_read_only() {
    let mut broker = Broker::start_with(
        "eio-write",
        2,
        &[],
        &[("COREBUS_FAILURE_PROBES", "write:eio:once=2")],
        None,
    );
    // Two partitions: one on each shard.
    ok_stdout(&broker.cli(&["topic", "create", "w", "--partitions", "2"], ""));
    ok_stdout(&broker.cli(&["subscription", "create", "w", "s"], ""));
    let publish = |broker: &Broker, partition: &str, value: &str| {
        broker.cli(
            &["publish", "w", "--partition", partition, "--print-acks"],
            &format!("{value}\n"),
        )
    };
    for value in ["a0", "a1"] {
        assert_eq!(
            parse_acks(&ok_stdout(&publish(&broker, "0", value))).len(),
            1
        );
    }
    assert_eq!(
        parse_acks(&ok_stdout(&publish(&broker, "1", "b0"))),
        vec![(0, 1, 0)]
    );
    // The third flush write of partition 0's shard fails with EIO.
    let failed = publish(&broker, "0", "a2");
    assert!(!failed.status.success() && failed.stdout.is_empty());
    wait_until(
        "the other shard took over the failure",
        Duration::from_secs(10),
        || broker.log_text().contains("failed on shard"),
    );
    // Partition 1's shard wrote nothing that failed, but its writes share the device.
    let other = publish(&broker, "1", "b1");
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && stderr.contains("ReadOnly"),
        "{stderr}"
    );
    // Subscription state is written to the same device: no lock is handed out either.
    let receive = broker.cli(&["receive", "w", "s", "--max", "10", "--wait", "0s"], "");
    let stderr = String::from_utf8_lossy(&receive.stderr);
    assert!(
        !receive.status.success() && stderr.contains("ReadOnly"),
        "{stderr}"
    );

    let mut got = restart_on_a_repaired_disk(&mut broker, "w");
    // a2 and b1 were never acknowledged: they may or may not be there (at-least-once).
    got.retain(|(p, o, _)| (*p, *o) != (0, 2) && (*p, *o) != (1, 1));
    let acked = vec![
        (0, 0, "a0".into()),
        (0, 1, "a1".into()),
        (1, 0, "b0".into()),
    ];
    assert_eq!(got, acked);
    assert_eq!(
        parse_acks(&ok_stdout(&publish(&broker, "1", "b2"))).len(),
        1
    );
}

/// Issue 16, finding 1: a roll that can not make the next segment's file changes nothing.
/// Before the fix the old segment was cut to its data end first, while the log kept counting
/// its preallocated, committed blocks: a later batch that fitted was written past the cut,
/// extending the file, and acknowledged after a disk cache flush that commits no file size.
#[test]
fn a_roll_that_can_not_make_the_next_segment_changes_nothing() {
    let mut broker = Broker::start_with(
        "failed-roll",
        1,
        &["--segment-bytes", "64KiB", "--preallocate-bytes", "16KiB"],
        &[("COREBUS_FAILURE_PROBES", "next-segment:enospc:once=0")],
        None,
    );
    ok_stdout(&broker.cli(&["topic", "create", "r", "--partitions", "1"], ""));
    let big = |tag: char| format!("{}\n", tag.to_string().repeat(40_001));
    let publish = |value: &str| broker.cli(&["publish", "r", "--print-acks"], value);
    let first = publish(&big('a'));
    assert_eq!(parse_acks(&ok_stdout(&first)), vec![(0, 0, 0)]);
    let segment_zero = broker
        .data_dir
        .join("topics/r/0")
        .join(format!("{:020}.log", 0));
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).expect("segment file");
    let before = size(&segment_zero);

    // The roll this batch needs fails: refused, and segment 0 keeps its allocation.
    let refused = publish(&big('b'));
    assert!(
        !refused.status.success(),
        "the batch of a failed roll is refused"
    );
    assert!(refused.stdout.is_empty(), "nothing of it is acknowledged");
    let after = size(&segment_zero);
    assert!(
        after >= before,
        "a failed roll must not cut the active segment ({before} -> {after} bytes)"
    );
    assert!(broker
        .log_text()
        .contains("failure probe NextSegment fired"));

    // A batch that fits goes on in segment 0; the next big one rolls for real.
    let small = publish("small\n");
    assert_eq!(parse_acks(&ok_stdout(&small)), vec![(0, 0, 1)]);
    let rolled = publish(&big('c'));
    assert_eq!(parse_acks(&ok_stdout(&rolled)), vec![(0, 0, 2)]);
    let segments = std::fs::read_dir(broker.data_dir.join("topics/r/0"))
        .expect("partition dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .count();
    assert_eq!(segments, 2, "the retried roll made the second segment");

    // Everything acknowledged is there after a crash, at its offset, and nothing else.
    broker.kill9();
    broker.set_env(&[]);
    broker.restart();
    let out = ok_stdout(&broker.cli(
        &["consume", "r", "--format", "json", "--idle-timeout", "1s"],
        "",
    ));
    let consumed: Vec<(u64, String)> = parse_consumed(&out)
        .into_iter()
        .map(|c| (c.offset, c.value))
        .collect();
    let want: Vec<(u64, String)> = vec![
        (0, big('a').trim_end().to_string()),
        (1, "small".to_string()),
        (2, big('c').trim_end().to_string()),
    ];
    assert_eq!(consumed, want);
}

/// Issue 16, finding 11: retention by age goes by the broker's append time when a producer's
/// clock runs ahead: a record stamped ten years from now does not keep its segment forever.
#[test]
fn retention_by_age_is_bounded_by_the_append_time() {
    let broker = Broker::start(
        "future-retention",
        1,
        &[
            "--segment-age",
            "200ms",
            "--retention-ms",
            "1s",
            "--retention-check-interval",
            "100ms",
        ],
    );
    ok_stdout(&broker.cli(&["topic", "create", "f", "--partitions", "1"], ""));
    let ten_years_ms: i64 = 10 * 365 * 24 * 3600 * 1000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut builder = corebus::record::BatchBuilder::new();
    builder.push(&corebus::record::RecordWriter {
        timestamp_ms: now + ten_years_ms,
        value: b"from the future",
        ..corebus::record::RecordWriter::default()
    });
    let frame = corebus::client::requests::produce(1, "f", 0, bytes::Bytes::from(builder.finish()));
    let mut s = std::net::TcpStream::connect(broker.addr()).expect("connect");
    let reply = common::raw_round_trip(&mut s, &frame.to_vec()[4..]).expect("reply");
    let response = corebus::protocol::message::parse_response(&reply).expect("valid reply");
    let body = response.body_as_produce_response().expect("produce reply");
    let part = body.partitions().expect("partitions").get(0);
    assert!(part.error().is_none(), "the future record is accepted");
    // The segment age passes, and the next append rolls the segment holding it.
    let first = segment_files(&broker.data_dir, "f", 0);
    wait_until("the segment age to pass", Duration::from_secs(5), || {
        let out = ok_stdout(&broker.cli(&["publish", "f", "--print-acks"], "now\n"));
        !out.is_empty() && segment_files(&broker.data_dir, "f", 0).len() > first.len()
    });
    wait_until(
        "retention to delete the segment of the future record",
        Duration::from_secs(20),
        || !first[0].exists(),
    );
}

#[test]
fn segments_roll_reads_cross_them_and_retention_deletes_whole_segments() {
    let broker = Broker::start(
        "roll",
        2,
        &[
            "--segment-bytes",
            "64KiB",
            "--preallocate-bytes",
            "16KiB",
            "--retention-check-interval",
            "100ms",
            "--cache-bytes-per-partition",
            "0",
        ],
    );
    ok_stdout(&broker.cli(&["topic", "create", "keep", "--partitions", "2"], ""));
    ok_stdout(&broker.cli(
        &[
            "topic",
            "create",
            "trim",
            "--partitions",
            "1",
            "--retention-bytes",
            "200KiB",
        ],
        "",
    ));
    let input: String = (0..20_000)
        .map(|i| format!("{i:06}-{}\n", "x".repeat(80)))
        .collect();
    // Both topics under load at once.
    let keep_acks = std::thread::scope(|s| {
        let keep = s.spawn(|| {
            ok_stdout(&broker.cli(
                &["publish", "keep", "--print-acks", "--batch-records", "50"],
                &input,
            ))
        });
        ok_stdout(&broker.cli(&["publish", "trim", "--batch-records", "50"], &input));
        keep.join().expect("keep publisher")
    });
    assert_eq!(parse_acks(&keep_acks).len(), 20_000);
    let segments = segment_files(&broker.data_dir, "keep", 0).len();
    assert!(
        segments >= 10,
        "expected many 64 KiB segments, found {segments}"
    );
    // Every message read back once, across segment boundaries, from disk.
    let out = ok_stdout(&broker.cli(&["consume", "keep", "--idle-timeout", "1s"], ""));
    let mut seen: Vec<&str> = out.lines().collect();
    assert_eq!(seen.len(), 20_000);
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 20_000, "no duplicates");
    // Retention keeps "trim" near 200 KiB by deleting its oldest segments.
    wait_until("retention", Duration::from_secs(20), || {
        segment_files(&broker.data_dir, "trim", 0).len() <= 5
    });
    let out = broker.cli(&["consume", "trim", "--from", "0"], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("out of range"),
        "{err}"
    );
    let out = ok_stdout(&broker.cli(
        &[
            "consume",
            "trim",
            "--from",
            "earliest",
            "--idle-timeout",
            "1s",
        ],
        "",
    ));
    let first: u64 = out
        .lines()
        .next()
        .and_then(|l| l[..6].parse().ok())
        .expect("first message");
    assert!(first > 0, "the oldest messages are gone");
    assert_eq!(out.lines().last().map(|l| &l[..6]), Some("019999"));
    let kept: HashSet<&str> = out.lines().collect();
    assert_eq!(
        kept.len() as u64,
        20_000 - first,
        "everything from the log start on is readable"
    );
}

/// A small ext4 on a loop device, mounted for the test's lifetime.
struct LoopFs {
    mount: PathBuf,
    device: String,
}

impl LoopFs {
    fn new(name: &str, size_mib: u32) -> Self {
        Self::with_options(name, size_mib, "defaults")
    }

    /// Mounted with `options` (as `mount -o` takes them).
    fn with_options(name: &str, size_mib: u32, options: &str) -> Self {
        Self::with_mkfs_options(name, size_mib, "", options)
    }

    /// Made with `mkfs.ext4` options `mkfs` and mounted with `options`.
    fn with_mkfs_options(name: &str, size_mib: u32, mkfs: &str, options: &str) -> Self {
        let base = common::fresh_dir(name);
        let image = base.join("fs.img");
        let mount = base.join("mnt");
        std::fs::create_dir_all(&mount).expect("mount point");
        sh(&format!("truncate -s {size_mib}M {}", image.display()));
        sh(&format!("mkfs.ext4 -q -m 0 -F {mkfs} {}", image.display()));
        let device = sh(&format!("losetup -f --show {}", image.display()))
            .trim()
            .to_string();
        sh(&format!("mount -o {options} {device} {}", mount.display()));
        Self { mount, device }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Issue 16, finding 5: ext4 mounted `data=journal` turns direct I/O into buffered writes,
/// which a disk cache flush does not make durable: the broker sees the mount option and has
/// every flush sync its own file instead of sharing the shard's disk flush.
#[test]
fn on_ext4_data_journal_flushes_sync_their_own_files() {
    let fs = LoopFs::with_options("datajournal", 64, "data=journal");
    let mut broker = Broker::start_with("datajournal", 1, &[], &[], Some(fs.mount.join("data")));
    assert!(
        broker.log_text().contains("data=journal"),
        "the fallback is reported: {}",
        broker.log_text()
    );
    ok_stdout(&broker.cli(&["topic", "create", "j", "--partitions", "1"], ""));
    let input: String = (0..200).map(|i| format!("j{i}\n")).collect();
    let acks = parse_acks(&ok_stdout(
        &broker.cli(&["publish", "j", "--print-acks"], &input),
    ));
    assert_eq!(acks.len(), 200);
    broker.kill9();
    broker.restart();
    let out = ok_stdout(&broker.cli(&["consume", "j", "--idle-timeout", "1s"], ""));
    assert_eq!(out, input);
}

/// Issue 16, finding 5: on an fscrypt-encrypted directory direct I/O may be buffered (without
/// inline encryption hardware), which a disk cache flush does not make durable: the broker
/// sees the directory's encryption and has every flush sync its own file. ext4's
/// `test_dummy_encryption` encrypts every new directory without a key to manage.
#[test]
fn on_an_encrypted_directory_flushes_sync_their_own_files() {
    let fs = LoopFs::with_mkfs_options("fscrypt", 64, "-O encrypt", "test_dummy_encryption");
    let mut broker = Broker::start_with("fscrypt", 1, &[], &[], Some(fs.mount.join("data")));
    ok_stdout(&broker.cli(&["topic", "create", "x", "--partitions", "1"], ""));
    assert!(
        broker.log_text().contains("encrypted with fscrypt"),
        "the fallback is reported: {}",
        broker.log_text()
    );
    let input: String = (0..200).map(|i| format!("x{i}\n")).collect();
    let acks = parse_acks(&ok_stdout(
        &broker.cli(&["publish", "x", "--print-acks"], &input),
    ));
    assert_eq!(acks.len(), 200);
    broker.kill9();
    broker.restart();
    let out = ok_stdout(&broker.cli(&["consume", "x", "--idle-timeout", "1s"], ""));
    assert_eq!(out, input);
}

#[test]
fn a_full_disk_gives_errors_keeps_acknowledged_data_and_recovers_when_space_is_freed() {
    let fs = LoopFs::new("diskfull", 48);
    let data_dir = fs.mount.join("data");
    let mut broker = Broker::start_with(
        "diskfull",
        1,
        &["--segment-bytes", "1MiB", "--preallocate-bytes", "256KiB"],
        &[],
        Some(data_dir.clone()),
    );
    ok_stdout(&broker.cli(&["topic", "create", "d", "--partitions", "1"], ""));
    // Leave little room (about 3 MiB): a filler file takes the rest of the disk.
    let avail_kib: u64 = sh(&format!(
        "df --output=avail -k {} | tail -1",
        fs.mount.display()
    ))
    .trim()
    .parse()
    .expect("df");
    let filler_kib = avail_kib.saturating_sub(3 * 1024);
    sh(&format!(
        "fallocate -l {}K {}",
        filler_kib,
        fs.mount.join("filler").display()
    ));
    let value = "v".repeat(1000);
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut saw_full = false;
    for round in 0..200 {
        let input: String = (0..100)
            .map(|i| format!("{round:03}-{i:03}-{value}\n"))
            .collect();
        let out = broker.cli(
            &["publish", "d", "--print-acks", "--batch-records", "100"],
            &input,
        );
        let lines: Vec<&str> = input.lines().collect();
        for (line, _, offset) in parse_acks(&String::from_utf8_lossy(&out.stdout)) {
            acked.push((offset, lines[line].to_string()));
        }
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("No space left on device"), "{err}");
            saw_full = true;
            break;
        }
    }
    assert!(saw_full, "the disk never filled up");
    assert!(broker.is_running(), "the broker stays up on a full disk");
    ok_stdout(&broker.cli(&["topic", "list"], ""));
    // Free space: writes resume.
    std::fs::remove_file(fs.mount.join("filler")).expect("free space");
    let out = ok_stdout(&broker.cli(&["publish", "d", "--print-acks"], "after-free\n"));
    let (_, _, offset) = parse_acks(&out)[0];
    acked.push((offset, "after-free".to_string()));
    // Nothing acknowledged was lost, before or after a crash.
    for restart in [false, true] {
        if restart {
            broker.kill9();
            broker.restart();
        }
        let out = ok_stdout(&broker.cli(
            &["consume", "d", "--format", "json", "--idle-timeout", "1s"],
            "",
        ));
        let consumed: HashMap<u64, String> = parse_consumed(&out)
            .into_iter()
            .map(|c| (c.offset, c.value))
            .collect();
        assert_eq!(
            consumed.len(),
            acked.len(),
            "exactly the acknowledged messages"
        );
        for (offset, value) in &acked {
            assert_eq!(consumed.get(offset), Some(value), "offset {offset}");
        }
    }
    drop(broker);
}

#[test]
fn the_broker_restarts_on_a_torn_tail_and_serves_exactly_the_complete_batches() {
    let mut broker = Broker::start("torn", 1, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "t", "--partitions", "1"], ""));
    let input: String = (0..200).map(|i| format!("m{i:03}\n")).collect();
    ok_stdout(&broker.cli(&["publish", "t", "--batch-records", "5"], &input));
    broker.kill9();
    let file = segment_files(&broker.data_dir, "t", 0).remove(0);
    let original = std::fs::read(&file).expect("segment");
    // The valid data ends where the zero padding of the preallocated file begins.
    let end = original.len() - original.iter().rev().take_while(|&&b| b == 0).count();
    let partition_dir = file.parent().expect("dir").to_path_buf();
    let mut previous_count = usize::MAX;
    for back in [1usize, 7, 30, 64, 65, 100, 130, 200, 333] {
        let cut = end - back;
        std::fs::write(&file, &original[..cut]).expect("cut");
        // A crash before any checkpoint: nothing tells recovery that these bytes were acknowledged.
        let _ = std::fs::remove_file(partition_dir.join("checkpoint"));
        broker.restart();
        let out = ok_stdout(&broker.cli(&["consume", "t", "--idle-timeout", "300ms"], ""));
        let values: Vec<&str> = out.lines().collect();
        assert_eq!(
            values.len() % 5,
            0,
            "only whole batches are served (cut {back} bytes from the end)"
        );
        assert!(
            values.len() < 200 && values.len() >= 200 - 5 * (1 + back / 40),
            "cut {back}: {}",
            values.len()
        );
        assert!(values.len() <= previous_count);
        previous_count = values.len();
        let expected: Vec<String> = (0..values.len()).map(|i| format!("m{i:03}")).collect();
        assert_eq!(values, expected);
        assert!(
            broker.log_text().contains("torn tail"),
            "recovery reports the cut"
        );
        broker.kill9();
    }
}
