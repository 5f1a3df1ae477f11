//! Operating the real binary: metrics under load, graceful shutdown, the config file, and
//! doctor's refusals.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{ok_stdout, parse_acks, parse_consumed, sh, wait_until, Broker, COREBUS};

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// Sum of a metric's samples whose line contains `filter`.
fn metric(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A free port below the ephemeral range (see `common::free_port_span`).
fn free_port() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()) as u16;
    (0..1000u16)
        .map(|i| 32_000 - (seed.wrapping_add(i.wrapping_mul(7)) % 1500))
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port")
}

#[test]
fn metrics_move_with_the_load() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let broker = Broker::start("metrics", 2, &["--metrics-listen", &metrics_addr]);
    ok_stdout(&broker.cli(&["topic", "create", "m", "--partitions", "4"], ""));
    let before = scrape(&metrics_addr);
    assert!(before.contains("# TYPE corebus_produce_latency_seconds histogram"));
    assert_eq!(
        metric(&before, "corebus_messages_in_total", "topic=\"m\""),
        0.0
    );
    let input: String = (0..5000).map(|i| format!("metric-load-{i}\n")).collect();
    ok_stdout(&broker.cli(&["publish", "m", "--batch-records", "100"], &input));
    ok_stdout(&broker.cli(&["consume", "m", "--idle-timeout", "300ms"], ""));
    let after = scrape(&metrics_addr);
    assert_eq!(
        metric(&after, "corebus_messages_in_total", "topic=\"m\""),
        5000.0
    );
    assert!(metric(&after, "corebus_bytes_in_total", "topic=\"m\"") > 5000.0 * 12.0);
    assert!(metric(&after, "corebus_messages_out_total", "topic=\"m\"") >= 5000.0);
    assert_eq!(
        metric(&after, "corebus_log_end_offset", "topic=\"m\""),
        5000.0
    );
    assert!(metric(&after, "corebus_produce_latency_seconds_count", "") >= 4.0);
    assert!(metric(&after, "corebus_fetch_latency_seconds_count", "") >= 4.0);
    let flushes = metric(&after, "corebus_flush_latency_seconds_count", "");
    assert!(flushes >= 4.0, "flushes: {flushes}");
    assert_eq!(
        metric(&after, "corebus_fdatasync_latency_seconds_count", ""),
        flushes
    );
    // Group commit: each flush makes one or more batches durable.
    assert_eq!(metric(&after, "corebus_flush_batches_count", ""), flushes);
    assert!(metric(&after, "corebus_flush_batches_sum", "") >= flushes);
    assert!(metric(&after, "corebus_flush_bytes_bucket", "le=\"+Inf\"") >= 4.0);
    // The longest flush and the slow ones, beside the histogram they must agree with.
    let longest = metric(&after, "corebus_flush_latency_max_seconds", "");
    let mean = metric(&after, "corebus_flush_latency_seconds_sum", "") / flushes;
    assert!(
        longest > 0.0 && longest >= mean,
        "max {longest}, mean {mean}"
    );
    assert!(metric(&after, "corebus_fdatasync_latency_max_seconds", "") > 0.0);
    assert!(metric(&after, "corebus_flush_write_latency_max_seconds", "") > 0.0);
    assert!(longest >= metric(&after, "corebus_flush_write_latency_max_seconds", ""));
    assert_eq!(
        metric(&after, "corebus_flush_write_latency_seconds_count", ""),
        flushes
    );
    let within_10ms = metric(
        &after,
        "corebus_flush_latency_seconds_bucket",
        "le=\"0.01\"",
    );
    assert_eq!(
        metric(&after, "corebus_slow_flushes_total", ""),
        flushes - within_10ms
    );
    // An error is counted by code.
    let out = broker.cli(&["topic", "create", "m", "--partitions", "1"], "");
    assert!(!out.status.success());
    let errors = scrape(&metrics_addr);
    assert_eq!(
        metric(
            &errors,
            "corebus_errors_total",
            "code=\"TopicAlreadyExists\""
        ),
        1.0
    );
    // During a connection, the gauge shows it.
    let _held = TcpStream::connect(broker.addr()).expect("connect");
    wait_until("connection gauge", Duration::from_secs(10), || {
        metric(&scrape(&metrics_addr), "corebus_connections", "") >= 1.0
    });
    // Subscription backlog and dead letters.
    ok_stdout(&broker.cli(&["subscription", "create", "m", "watch"], ""));
    wait_until("subscription backlog", Duration::from_secs(10), || {
        metric(
            &scrape(&metrics_addr),
            "corebus_subscription_backlog",
            "subscription=\"watch\"",
        ) == 5000.0
    });
    let stats = ok_stdout(&broker.cli(&["stats", "--interval", "100ms"], ""));
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("m ") && l.contains("5000")),
        "{stats}"
    );
    // Each shard's row counts its flushes, as the metrics do (nothing was produced since).
    let shard_flushes: f64 = stats
        .lines()
        .skip_while(|l| !l.starts_with("SHARD"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
        .sum();
    assert_eq!(shard_flushes, flushes, "{stats}");
}

#[test]
fn sigterm_during_a_publish_stream_loses_nothing_and_the_restart_skips_the_scan() {
    let mut broker = Broker::start("sigterm", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "s", "--partitions", "4"], ""));
    let mut publisher = Command::new(COREBUS)
        .args([
            "publish",
            "s",
            "--print-acks",
            "--batch-records",
            "10",
            "--delivery-timeout",
            "0",
        ])
        .env("COREBUS_ADDR", broker.addr())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("publisher");
    let mut stdin = publisher.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        for i in 0..1_000_000u64 {
            if writeln!(stdin, "stream-{i}").is_err() {
                break;
            }
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    let mut stdout = publisher.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(500));
    let status = broker.terminate();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(broker.log_text().contains("clean shutdown"));
    let _ = feeder.join();
    let _ = publisher.wait();
    let acks = parse_acks(&reader.join().expect("reader"));
    assert!(
        acks.len() > 100,
        "the stream was acknowledged before the stop ({})",
        acks.len()
    );
    broker.restart();
    let log = broker.log_text();
    assert_eq!(
        log.matches("clean start").count(),
        4,
        "every partition starts without a scan: {log}"
    );
    assert!(!log.contains("torn tail"));
    let consumed = parse_consumed(&ok_stdout(&broker.cli(
        &["consume", "s", "--format", "json", "--idle-timeout", "1s"],
        "",
    )));
    for (line, partition, offset) in acks {
        let value = format!("stream-{line}");
        assert!(
            consumed
                .iter()
                .any(|c| c.partition == partition && c.offset == offset && c.value == value),
            "acknowledged {value} at {partition}/{offset} lost"
        );
    }
}

#[test]
fn a_config_file_sets_everything_and_flags_override_it() {
    let dir = common::fresh_dir("config");
    let example = Command::new(COREBUS)
        .args(["config", "example"])
        .output()
        .expect("example");
    assert!(example.status.success());
    let example = String::from_utf8_lossy(&example.stdout).into_owned();
    assert!(example.contains("segment_bytes"));
    // The example is a valid file as it is.
    let path = dir.join("corebus.toml");
    std::fs::write(
        &path,
        example.replace("./corebus-data", &dir.join("data").display().to_string()),
    )
    .expect("write");
    let port = free_port();
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace("127.0.0.1:7070", &format!("127.0.0.1:{port}"));
    std::fs::write(&path, text).expect("write");
    let config = path.display().to_string();
    let broker = Broker::start(
        "config-run",
        1,
        &["--config", &config, "--segment-bytes", "128KiB"],
    );
    ok_stdout(&broker.cli(&["topic", "create", "c", "--partitions", "1"], ""));
    let input: String = (0..5000)
        .map(|i| format!("{i:05}-{}\n", "z".repeat(60)))
        .collect();
    ok_stdout(&broker.cli(&["publish", "c"], &input));
    let segments = std::fs::read_dir(broker.data_dir.join("topics/c/0"))
        .expect("partition dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .count();
    assert!(
        segments >= 2,
        "the flag's 128 KiB segments override the file's 1 GiB"
    );
    // Invalid settings are refused, naming the setting.
    std::fs::write(&path, "segment_bytes = \"huge\"\n").expect("write");
    let out = Command::new(COREBUS)
        .args(["serve", "--config", &config])
        .output()
        .expect("serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("segment_bytes"));
    std::fs::write(&path, "segmnt_bytes = 1\n").expect("write");
    let out = Command::new(COREBUS)
        .args(["serve", "--config", &config])
        .output()
        .expect("serve");
    assert!(String::from_utf8_lossy(&out.stderr).contains("segmnt_bytes"));
    let out = Command::new(COREBUS)
        .args([
            "serve",
            "--data-dir",
            &dir.join("d2").display().to_string(),
            "--segment-bytes",
            "1KiB",
        ])
        .output()
        .expect("serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--segment-bytes"));
    // A zero that would make every fetch fail is refused at start, naming the flag.
    let out = Command::new(COREBUS)
        .args([
            "serve",
            "--data-dir",
            &dir.join("d3").display().to_string(),
            "--max-fetch-bytes",
            "0",
        ])
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--max-fetch-bytes must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn doctor_fails_clearly_on_tmpfs_and_on_a_low_memlock_limit() {
    let dir = common::fresh_dir("doctor");
    let ok = Command::new(COREBUS)
        .args(["doctor", "--no-probe", "--shards", "1", "--data-dir"])
        .arg(dir.join("data"))
        .output()
        .expect("doctor");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    // tmpfs: memory, not a disk.
    let mnt = dir.join("tmpfs");
    std::fs::create_dir_all(&mnt).expect("mount point");
    sh(&format!(
        "mount -t tmpfs -o size=16m tmpfs {}",
        mnt.display()
    ));
    let out = Command::new(COREBUS)
        .args(["doctor", "--no-probe", "--shards", "1", "--data-dir"])
        .arg(mnt.join("data"))
        .output()
        .expect("doctor");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let serve = Command::new(COREBUS)
        .args([
            "serve",
            "--shards",
            "1",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(mnt.join("data"))
        .output()
        .expect("serve");
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(!out.status.success());
    assert!(
        text.contains("FAIL  data dir") && text.contains("tmpfs"),
        "{text}"
    );
    assert!(!serve.status.success(), "serve refuses a tmpfs data dir");
    assert!(String::from_utf8_lossy(&serve.stderr).contains("tmpfs"));
    // A locked-memory limit too low for the io_uring rings.
    let out = Command::new("prlimit")
        .args([
            "--memlock=65536",
            COREBUS,
            "doctor",
            "--no-probe",
            "--shards",
            "1",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .output()
        .expect("prlimit doctor");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success());
    assert!(
        text.contains("FAIL  memlock") && text.contains("LimitMEMLOCK"),
        "{text}"
    );
    let out = Command::new("prlimit")
        .args([
            "--memlock=65536",
            COREBUS,
            "serve",
            "--shards",
            "1",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .output()
        .expect("prlimit serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("RLIMIT_MEMLOCK"));
}

/// Issue 16, finding 9: the metrics endpoint bounds its connections and gives a request head
/// one deadline in all, so a client that trickles bytes can not hold a connection open.
#[test]
fn the_metrics_endpoint_bounds_slow_and_idle_clients() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let broker = Broker::start("metrics-hostile", 1, &["--metrics-listen", &metrics_addr]);
    // A trickle: one byte a second never finishes the head; closed within the 5 s deadline.
    let mut slow = std::net::TcpStream::connect(&metrics_addr).expect("connect");
    let started = std::time::Instant::now();
    let closed = loop {
        if started.elapsed() > Duration::from_secs(15) {
            break false;
        }
        if slow.write_all(b"G").is_err() {
            break true;
        }
        slow.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        match slow.read(&mut [0u8; 64]) {
            Ok(0) => break true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            _ => {}
        }
    };
    assert!(closed, "a trickling client is cut off");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Idle connections past the limit are closed at once; a scrape then still works once
    // the idle ones time out.
    let idle: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(&metrics_addr).expect("connect"))
        .collect();
    let mut last = std::net::TcpStream::connect(&metrics_addr).expect("connect");
    last.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    match last.read(&mut [0u8; 64]) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a connection past the limit must be closed at once, got {other:?}"),
    }
    drop(idle);
    let try_scrape = || -> Option<String> {
        let mut s = std::net::TcpStream::connect(&metrics_addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        Some(response)
    };
    wait_until("a scrape answered", Duration::from_secs(15), || {
        try_scrape().is_some_and(|r| r.starts_with("HTTP/1.1 200") && r.contains("corebus_"))
    });
    drop(broker);
}
