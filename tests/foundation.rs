//! End-to-end tests of the foundation: topics, publish with acks, consume back exactly once,
//! across clean and unclean restarts, through forwarding and direct shard ports.

mod common;

use std::collections::HashMap;

use common::{cli_at, ok_stdout, Broker};
use corebus::placement::owner_of;

const MESSAGES: usize = 10_000;

/// (partition, offset) → message line, from `--print-acks` output.
fn parse_acks(stdout: &str, lines: &[String]) -> HashMap<(u32, u64), String> {
    let mut acked = HashMap::new();
    for row in stdout.lines() {
        let mut parts = row.split_whitespace();
        let line: usize = parts.next().and_then(|s| s.parse().ok()).expect("line");
        let partition: u32 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .expect("partition");
        let offset: u64 = parts.next().and_then(|s| s.parse().ok()).expect("offset");
        let previous = acked.insert((partition, offset), lines[line].clone());
        assert!(
            previous.is_none(),
            "two messages acknowledged at {partition}/{offset}"
        );
    }
    acked
}

/// Consumes the whole topic as JSON and checks it is exactly the acknowledged messages,
/// each once, each at its acknowledged offset.
fn assert_consumes_exactly(
    addr: &str,
    extra: &[&str],
    topic: &str,
    acked: &HashMap<(u32, u64), String>,
) {
    let mut args = vec!["consume", topic, "--format", "json", "--idle-timeout", "2s"];
    args.extend_from_slice(extra);
    let stdout = ok_stdout(&cli_at(addr, &args, ""));
    let mut seen = HashMap::new();
    for row in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(row).expect("json line");
        let partition = v["partition"].as_u64().expect("partition") as u32;
        let offset = v["offset"].as_u64().expect("offset");
        let value = v["value"].as_str().expect("value").to_string();
        for key in ["key", "timestamp", "headers"] {
            assert!(v.get(key).is_some(), "json line lacks {key}: {row}");
        }
        assert!(
            seen.insert((partition, offset), value).is_none(),
            "{partition}/{offset} consumed twice"
        );
    }
    assert_eq!(
        seen.len(),
        acked.len(),
        "consumed count differs from acknowledged count"
    );
    for (at, value) in acked {
        assert_eq!(
            seen.get(at),
            Some(value),
            "message at {at:?} differs or is missing"
        );
    }
}

fn publish_lines(
    addr: &str,
    extra: &[&str],
    topic: &str,
    lines: &[String],
) -> HashMap<(u32, u64), String> {
    let mut args = vec!["publish", topic, "--print-acks"];
    args.extend_from_slice(extra);
    let input = lines.join("\n") + "\n";
    let stdout = ok_stdout(&cli_at(addr, &args, &input));
    assert_offsets_follow_line_order(&stdout);
    let acked = parse_acks(&stdout, lines);
    assert_eq!(
        acked.len(),
        lines.len(),
        "every line must be acknowledged once"
    );
    acked
}

/// Within each partition, later stdin lines got higher offsets: batches are stored in the
/// order the producer sent them.
fn assert_offsets_follow_line_order(acks: &str) {
    let mut rows = common::parse_acks(acks);
    rows.sort_unstable();
    let mut last: HashMap<u32, (usize, u64)> = HashMap::new();
    for (line, partition, offset) in rows {
        if let Some((prev_line, prev_offset)) = last.insert(partition, (line, offset)) {
            assert!(
                offset > prev_offset,
                "partition {partition}: line {line} got offset {offset}, line {prev_line} {prev_offset}"
            );
        }
    }
}

fn message_lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-message-{i:05}-payload"))
        .collect()
}

#[test]
fn publish_and_consume_survive_clean_and_unclean_restarts() {
    let mut broker = Broker::start("foundation", 2, &[]);
    let out = ok_stdout(&broker.cli(&["topic", "create", "orders", "--partitions", "8"], ""));
    assert!(out.contains("orders"));
    let listed = ok_stdout(&broker.cli(&["topic", "list"], ""));
    assert!(
        listed.lines().any(|l| l == "orders\t8"),
        "topic list: {listed}"
    );

    // Direct to the owning shards (the default, shard-aware client).
    let lines = message_lines("direct", MESSAGES);
    let mut acked = publish_lines(&broker.addr(), &[], "orders", &lines);
    let partitions: std::collections::HashSet<u32> = acked.keys().map(|(p, _)| *p).collect();
    assert_eq!(
        partitions.len(),
        8,
        "messages are spread over all partitions"
    );
    assert_consumes_exactly(&broker.addr(), &[], "orders", &acked);

    // Through the public port with forwarding between shards.
    let lines = message_lines("forwarded", MESSAGES);
    acked.extend(publish_lines(
        &broker.addr(),
        &["--no-direct"],
        "orders",
        &lines,
    ));
    assert_consumes_exactly(&broker.addr(), &["--no-direct"], "orders", &acked);

    // Clean restart.
    let status = broker.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
    broker.restart();
    assert_consumes_exactly(&broker.addr(), &[], "orders", &acked);
    let listed = ok_stdout(&broker.cli(&["topic", "list"], ""));
    assert!(
        listed.lines().any(|l| l == "orders\t8"),
        "topic survives restart: {listed}"
    );

    // Unclean restart, then keep writing.
    broker.kill9();
    broker.restart();
    assert_consumes_exactly(&broker.addr(), &["--no-direct"], "orders", &acked);
    let lines = message_lines("after-kill", 1000);
    acked.extend(publish_lines(&broker.addr(), &[], "orders", &lines));
    assert_consumes_exactly(&broker.addr(), &[], "orders", &acked);
}

#[test]
fn a_produce_sent_to_the_wrong_shard_is_forwarded_and_answered() {
    let broker = Broker::start("wrong-shard", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "events", "--partitions", "4"], ""));
    // A partition that shard 1 owns, sent to shard 0's own port without shard routing.
    let partition = (0..4u32)
        .find(|&p| owner_of("events", p, 2) == 1)
        .expect("some partition on shard 1");
    let p = partition.to_string();
    let lines = message_lines("wrong-shard", 100);
    let acked = publish_lines(
        &broker.shard_addr(0),
        &["--no-direct", "--partition", &p],
        "events",
        &lines,
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(acked.get(&(partition, i as u64)), Some(line), "offset {i}");
    }
    // Read back from the owner directly.
    assert_consumes_exactly(
        &broker.shard_addr(1),
        &["--no-direct", "--partition", &p],
        "events",
        &acked,
    );
}

#[test]
fn keys_pick_one_partition_and_topics_can_be_deleted() {
    let broker = Broker::start("keys", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "k", "--partitions", "6"], ""));
    let lines = message_lines("keyed", 50);
    let acked = publish_lines(&broker.addr(), &["--key", "customer-42"], "k", &lines);
    let partitions: std::collections::HashSet<u32> = acked.keys().map(|(p, _)| *p).collect();
    assert_eq!(partitions.len(), 1, "one key, one partition");
    let json = ok_stdout(&broker.cli(&["consume", "k", "--format", "json", "--count", "1"], ""));
    assert!(json.contains("\"key\":\"customer-42\""), "{json}");

    ok_stdout(&broker.cli(&["topic", "delete", "k"], ""));
    let listed = ok_stdout(&broker.cli(&["topic", "list"], ""));
    assert!(
        !listed.contains('k'),
        "deleted topic still listed: {listed}"
    );
    assert!(
        !broker.data_dir.join("topics").join("k").exists(),
        "topic data not removed"
    );
    // The name can be reused, empty.
    ok_stdout(&broker.cli(&["topic", "create", "k", "--partitions", "2"], ""));
    let out = ok_stdout(&broker.cli(&["consume", "k", "--idle-timeout", "300ms"], ""));
    assert!(out.is_empty(), "re-created topic must be empty: {out}");
}

#[test]
fn user_errors_are_clear_and_exit_non_zero() {
    let broker = Broker::start("user-errors", 1, &[]);
    let out = broker.cli(&["publish", "nope"], "x\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let out = broker.cli(&["topic", "create", "bad/name"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
    ok_stdout(&broker.cli(&["topic", "create", "t", "--partitions", "2"], ""));
    let out = broker.cli(&["topic", "create", "t", "--partitions", "2"], "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("TopicAlreadyExists"));
    let out = broker.cli(&["publish", "t", "--partition", "5"], "x\n");
    assert!(!out.status.success());
    let out = broker.cli(&["consume", "t", "--from", "99"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"));
}

#[test]
fn with_shard_group_commit_acknowledged_messages_survive_kill9() {
    let mut broker = Broker::start("group-commit-shard", 2, &["--group-commit", "shard"]);
    ok_stdout(&broker.cli(&["topic", "create", "events", "--partitions", "8"], ""));
    let lines = message_lines("shard-sync", MESSAGES);
    let mut acked = publish_lines(&broker.addr(), &[], "events", &lines);
    assert_eq!(acked.len(), MESSAGES, "every message acknowledged");
    broker.kill9();
    broker.restart();
    assert_consumes_exactly(&broker.addr(), &[], "events", &acked);
    let lines = message_lines("after-restart", 1000);
    acked.extend(publish_lines(&broker.addr(), &[], "events", &lines));
    assert_consumes_exactly(&broker.addr(), &[], "events", &acked);
}
