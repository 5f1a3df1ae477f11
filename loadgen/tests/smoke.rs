//! The load generator end to end: an embedded broker, a short closed-loop and open-loop run,
//! and the JSON report it writes.

use std::process::Command;

fn run(extra: &[&str]) -> serde_json::Value {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let json = dir.join(format!(
        "loadgen-{}-{}.json",
        std::process::id(),
        extra.len()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_corebus-loadgen"))
        .args([
            "--embedded",
            "--duration",
            "2s",
            "--warmup",
            "500ms",
            "--json",
        ])
        .arg(&json)
        .args(extra)
        .output()
        .expect("run corebus-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadgen failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("publish -> ack") && stdout.contains("p99.99"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("json written");
    let _ = std::fs::remove_file(&json);
    serde_json::from_str(&text).expect("valid json")
}

fn assert_report_shape(v: &serde_json::Value) {
    for key in ["messages", "bytes", "msgs_per_sec", "mb_per_sec"] {
        assert!(v["produce"][key].is_number(), "produce.{key}");
    }
    for key in ["messages", "msgs_per_sec", "mb_per_sec"] {
        assert!(v["consume"][key].is_number(), "consume.{key}");
    }
    for hist in [&v["produce"]["ack_latency_us"], &v["e2e_latency_us"]] {
        for key in ["p50", "p90", "p99", "p999", "p9999", "max"] {
            assert!(hist[key].is_number(), "{key}");
        }
        assert!(hist["p50"].as_u64() <= hist["p99"].as_u64());
        assert!(hist["p99"].as_u64() <= hist["max"].as_u64());
    }
    assert!(v["config"]["message_size"].is_number());
    assert_eq!(v["errors"], 0);
}

#[test]
fn closed_loop_run_reports_verified_throughput_and_latency() {
    let v = run(&["--partitions", "4", "--producers", "2", "--consumers", "2"]);
    assert_report_shape(&v);
    let produced = v["produce"]["messages"].as_u64().expect("messages");
    assert!(produced > 0);
    // Consumers read everything the measured window produced (and verified it).
    assert_eq!(v["consume"]["messages"].as_u64(), Some(produced));
}

#[test]
fn open_loop_run_holds_its_rate() {
    let v = run(&[
        "--rate",
        "5000",
        "--message-size",
        "256",
        "--batch-bytes",
        "65536",
    ]);
    assert_report_shape(&v);
    let rate = v["produce"]["msgs_per_sec"].as_f64().expect("rate");
    assert!(
        (4000.0..6000.0).contains(&rate),
        "open loop at 5000 msg/s produced {rate}"
    );
}

/// A catch-up reads the whole backlog after the producers stop, the warmup's messages too:
/// its consume figures count them all (so its rate is over everything it read).
#[test]
fn catch_up_counts_every_message_it_reads() {
    let v = run(&[
        "--catch-up",
        "--partitions",
        "2",
        "--broker-cache-bytes",
        "64KiB",
    ]);
    assert_report_shape(&v);
    let produced = v["produce"]["messages"].as_u64().expect("messages");
    let consumed = v["consume"]["messages"].as_u64().expect("messages");
    assert!(produced > 0);
    assert!(
        consumed > produced,
        "the catch-up read the warmup's messages too: {consumed} read, {produced} measured"
    );
}
