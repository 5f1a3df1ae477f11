//! End-to-end tests of event subscriptions against the real broker binary: filters, shared
//! pull delivery under locks, lock expiry, release delays, renewals, late acks, dead-lettering
//! (max deliveries, TTL, reject), and durability of the delivery state across kill -9; plus
//! consumer-group offsets.
//!
//! Lock durations are short (1–2 s); every wait for a condition has a deadline. The only sleeps
//! let a lock duration or a release delay pass, and the tests then check that nothing came
//! back before it.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ok_stdout, wait_until, Broker};
use corebus::client::{Client, ClientOptions};

/// Publishes `values` (one message each) with CloudEvents attributes via the CLI.
fn publish(broker: &Broker, topic: &str, values: &[String], attrs: &[&str]) {
    let mut args = vec!["publish", topic];
    args.extend_from_slice(attrs);
    let input = values.join("\n") + "\n";
    ok_stdout(&broker.cli(&args, &input));
}

/// `corebus receive --format json`, parsed.
fn receive(
    broker: &Broker,
    topic: &str,
    sub: &str,
    max: u32,
    wait: &str,
) -> Vec<serde_json::Value> {
    let max = max.to_string();
    let out = broker.cli(
        &[
            "receive", topic, sub, "--max", &max, "--wait", wait, "--format", "json",
        ],
        "",
    );
    ok_stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Runs `corebus VERB TOPIC SUB [extra] TOKENS...`; returns (token → ok, line) per token.
fn settle(
    broker: &Broker,
    verb: &str,
    topic: &str,
    sub: &str,
    extra: &[&str],
    tokens: &[&str],
) -> Vec<(String, bool, String)> {
    let mut args = vec![verb, topic, sub];
    args.extend_from_slice(extra);
    args.extend_from_slice(tokens);
    let out = broker.cli(&args, "");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<_> = stdout
        .lines()
        .map(|l| {
            let mut parts = l.splitn(3, '\t');
            let token = parts.next().unwrap_or_default().to_string();
            let status = parts.next().unwrap_or_default();
            (token, status == "ok", l.to_string())
        })
        .collect();
    assert_eq!(rows.len(), tokens.len(), "one line per token: {stdout}");
    let all_ok = rows.iter().all(|r| r.1);
    assert_eq!(
        out.status.success(),
        all_ok,
        "exit status reflects the tokens: {stdout}"
    );
    rows
}

/// The wall clock in ms since the epoch: the clock the broker's lock ends are on.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn token(event: &serde_json::Value) -> String {
    event["lock_token"]
        .as_str()
        .expect("lock_token")
        .to_string()
}

fn value(event: &serde_json::Value) -> String {
    event["value"].as_str().expect("value").to_string()
}

/// Receives and acks everything currently deliverable; returns the values.
fn drain(broker: &Broker, topic: &str, sub: &str) -> Vec<String> {
    let mut values = Vec::new();
    loop {
        let events = receive(broker, topic, sub, 1000, "0s");
        if events.is_empty() {
            return values;
        }
        let tokens: Vec<String> = events.iter().map(token).collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        for (_, ok, line) in settle(broker, "ack", topic, sub, &[], &refs) {
            assert!(ok, "ack failed: {line}");
        }
        values.extend(events.iter().map(value));
    }
}

/// Every record of a topic, as `consume --format json` prints them.
fn consume_all(broker: &Broker, topic: &str) -> Vec<serde_json::Value> {
    let out = broker.cli(
        &[
            "consume",
            topic,
            "--format",
            "json",
            "--idle-timeout",
            "500ms",
        ],
        "",
    );
    ok_stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Runs `body` with a connected client on its own glommio executor (a thread of its own).
fn with_client<T: Send + 'static>(
    addr: String,
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        corebus::runtime::block_on(None, async move {
            let client = Client::connect(&addr, ClientOptions::default())
                .await
                .expect("connect");
            body(client).await
        })
        .expect("executor")
    })
}

#[test]
fn filters_deliver_exactly_the_events_they_select() {
    let broker = Broker::start("subs-filters", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "events", "--partitions", "3"], ""));
    let subs: &[(&str, &[&str])] = &[
        ("all", &[]),
        (
            "orders",
            &[
                "--filter-type",
                "order.created",
                "--filter-type",
                "order.paid",
            ],
        ),
        ("eu", &["--filter-subject-begins-with", "eu/"]),
        ("first", &["--filter-subject-ends-with", "/1"]),
        (
            "gold",
            &["--filter", "tier=gold", "--filter", "tier=platinum"],
        ),
        (
            "eu-paid-gold",
            &[
                "--filter-type",
                "order.paid",
                "--filter-subject-begins-with",
                "eu/",
                "--filter",
                "tier=gold",
            ],
        ),
        ("by-source", &["--filter", "source=/shop"]),
    ];
    for (name, args) in subs {
        let mut cmd = vec!["subscription", "create", "events", name];
        cmd.extend_from_slice(args);
        ok_stdout(&broker.cli(&cmd, ""));
    }
    let listed = ok_stdout(&broker.cli(&["subscription", "list", "events"], ""));
    assert_eq!(listed.lines().count(), subs.len(), "{listed}");

    // Every combination of type, subject and tier, several events each.
    struct Event {
        value: String,
        event_type: &'static str,
        subject: String,
        tier: &'static str,
        source: &'static str,
    }
    let mut events = Vec::new();
    for event_type in ["order.created", "order.paid", "refund.created"] {
        for region in ["eu", "us"] {
            for n in 1..=2 {
                for (tier, source) in [("gold", "/shop"), ("silver", "/shop"), ("platinum", "/pos")]
                {
                    let subject = format!("{region}/orders/{n}");
                    let values: Vec<String> = (0..3)
                        .map(|i| format!("{event_type}|{subject}|{tier}|{i}"))
                        .collect();
                    publish(
                        &broker,
                        "events",
                        &values,
                        &[
                            "--type",
                            event_type,
                            "--subject",
                            &subject,
                            "--source",
                            source,
                            "--header",
                            &format!("tier={tier}"),
                        ],
                    );
                    for value in values {
                        events.push(Event {
                            value,
                            event_type,
                            subject: subject.clone(),
                            tier,
                            source,
                        });
                    }
                }
            }
        }
    }
    let selects = |name: &str, e: &Event| -> bool {
        match name {
            "all" => true,
            "orders" => e.event_type == "order.created" || e.event_type == "order.paid",
            "eu" => e.subject.starts_with("eu/"),
            "first" => e.subject.ends_with("/1"),
            "gold" => e.tier == "gold" || e.tier == "platinum",
            "eu-paid-gold" => {
                e.event_type == "order.paid" && e.subject.starts_with("eu/") && e.tier == "gold"
            }
            "by-source" => e.source == "/shop",
            _ => unreachable!(),
        }
    };
    for (name, _) in subs {
        let mut got = drain(&broker, "events", name);
        let count = got.len();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), count, "subscription {name} got an event twice");
        let mut want: Vec<String> = events
            .iter()
            .filter(|e| selects(name, e))
            .map(|e| e.value.clone())
            .collect();
        want.sort();
        assert!(!want.is_empty());
        assert_eq!(got, want, "subscription {name}");
    }
    // The JSON carries the CloudEvents attributes; ids were generated, one per event.
    ok_stdout(&broker.cli(&["subscription", "create", "events", "again"], ""));
    let all = receive(&broker, "events", "again", 1000, "0s");
    assert_eq!(all.len(), events.len());
    let ids: HashSet<&str> = all.iter().map(|e| e["id"].as_str().expect("id")).collect();
    assert_eq!(ids.len(), events.len(), "every event has its own id");
    for e in &all {
        for key in [
            "lock_token",
            "delivery_count",
            "partition",
            "offset",
            "type",
            "subject",
            "value",
        ] {
            assert!(e.get(key).is_some(), "receive json lacks {key}: {e}");
        }
    }
}

#[test]
fn three_concurrent_receivers_share_10000_events_without_overlap() {
    const EVENTS: usize = 10_000;
    let broker = Broker::start("subs-shared", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "work", "--partitions", "4"], ""));
    // A lock long enough that nothing is redelivered during the test: any event seen twice
    // would have been handed to two receivers while locked.
    ok_stdout(&broker.cli(
        &[
            "subscription",
            "create",
            "work",
            "workers",
            "--lock-duration",
            "2m",
        ],
        "",
    ));
    let values: Vec<String> = (0..EVENTS).map(|i| format!("job-{i:05}")).collect();
    publish(&broker, "work", &values, &["--type", "job"]);

    let seen = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let receivers: Vec<_> = (0..3)
        .map(|_| {
            let seen = Arc::clone(&seen);
            with_client(broker.addr(), move |client| {
                Box::pin(async move {
                    let mut got: Vec<(String, u32)> = Vec::new();
                    let mut latencies = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while seen.load(Ordering::SeqCst) < EVENTS && Instant::now() < deadline {
                        let events = client
                            .receive("work", "workers", 200, Duration::from_millis(200))
                            .await
                            .expect("receive");
                        if events.is_empty() {
                            continue;
                        }
                        let received_at = Instant::now();
                        let tokens: Vec<String> =
                            events.iter().map(|e| e.lock_token.clone()).collect();
                        let results = client.ack("work", "workers", &tokens).await.expect("ack");
                        latencies.push(received_at.elapsed());
                        for (e, r) in events.iter().zip(results) {
                            assert!(r.is_ok(), "ack of {} failed: {r:?}", e.lock_token);
                            let record = e.record().expect("record");
                            got.push((
                                String::from_utf8_lossy(record.value).into_owned(),
                                e.delivery_count,
                            ));
                        }
                        seen.fetch_add(events.len(), Ordering::SeqCst);
                    }
                    (got, latencies)
                })
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut per_receiver = Vec::new();
    for r in receivers {
        let (got, lat) = r.join().expect("receiver");
        per_receiver.push(got.len());
        latencies.extend(lat);
        for (value, count) in got {
            assert_eq!(count, 1, "{value} was delivered more than once");
            assert!(
                all.insert(value.clone(), ()).is_none(),
                "{value} received twice"
            );
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(all.len(), EVENTS, "every event received");
    assert!(
        per_receiver.iter().filter(|&&n| n > 0).count() >= 2,
        "the receivers shared the work: {per_receiver:?}"
    );
    latencies.sort();
    eprintln!(
        "3 receivers: {EVENTS} events received and acked in {elapsed:?} ({:.0}/s); per receiver {per_receiver:?}; \
         receive→ack p50 {:?} p99 {:?} over {} batches",
        EVENTS as f64 / elapsed.as_secs_f64(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        latencies.len()
    );
    // Nothing is left, and the broker counted every ack.
    assert!(receive(&broker, "work", "workers", 10, "0s").is_empty());
    let list = ok_stdout(&broker.cli(&["subscription", "list", "work", "--format", "json"], ""));
    let row: serde_json::Value = serde_json::from_str(list.trim()).expect("json");
    assert_eq!(row["acked"], EVENTS as u64, "{row}");
    assert_eq!(row["locked"], 0, "{row}");
}

#[test]
fn lock_expiry_release_delay_renew_and_late_ack() {
    let broker = Broker::start("subs-locks", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "t", "--partitions", "2"], ""));
    ok_stdout(&broker.cli(
        &["subscription", "create", "t", "s", "--lock-duration", "1s"],
        "",
    ));
    ok_stdout(&broker.cli(
        &["subscription", "create", "t", "r", "--lock-duration", "3s"],
        "",
    ));
    publish(&broker, "t", &["first".to_string()], &["--type", "x"]);

    // Lock expiry: delivered again with delivery_count + 1, not before the lock ends.
    let first = receive(&broker, "t", "s", 10, "0s");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["delivery_count"], 1);
    let locked_at = Instant::now();
    assert!(
        receive(&broker, "t", "s", 10, "0s").is_empty(),
        "a locked event is not delivered to another receiver"
    );
    let again = receive(&broker, "t", "s", 10, "5s");
    assert!(
        locked_at.elapsed() >= Duration::from_millis(900),
        "redelivered before the lock ended"
    );
    assert_eq!(again.len(), 1);
    assert_eq!(value(&again[0]), "first");
    assert_eq!(again[0]["delivery_count"], 2);
    assert_eq!(again[0]["offset"], first[0]["offset"]);
    // The first delivery's token is dead now.
    let old = settle(&broker, "ack", "t", "s", &[], &[&token(&first[0])]);
    assert!(!old[0].1 && old[0].2.contains("LockLost"), "{old:?}");

    // Release with a delay: not delivered again before the delay.
    let released = settle(
        &broker,
        "release",
        "t",
        "s",
        &["--delay", "2s"],
        &[&token(&again[0])],
    );
    assert!(released[0].1, "{released:?}");
    let released_at = Instant::now();
    assert!(receive(&broker, "t", "s", 10, "0s").is_empty());
    let third = receive(&broker, "t", "s", 10, "5s");
    assert!(
        released_at.elapsed() >= Duration::from_millis(1900),
        "delivered {:?} after a release with a 2 s delay",
        released_at.elapsed()
    );
    assert_eq!(third.len(), 1);
    assert_eq!(third[0]["delivery_count"], 3);
    let acked = settle(&broker, "ack", "t", "s", &[], &[&token(&third[0])]);
    assert!(acked[0].1, "{acked:?}");

    // Renew keeps the lock past its first end, and the ack then succeeds. Timed by the lock
    // ends the broker reports (a 3 s lock renewed halfway), not by sleeps in the test.
    let held = receive(&broker, "t", "r", 10, "5s");
    assert_eq!(held.len(), 1);
    let first_until = held[0]["locked_until"].as_i64().expect("locked_until");
    wait_until("half the lock has passed", Duration::from_secs(5), || {
        now_ms() >= first_until - 1_500
    });
    let held_token = token(&held[0]);
    let renewed = settle(&broker, "renew", "t", "r", &[], &[&held_token]);
    assert!(renewed[0].1, "{renewed:?}");
    let renewed_until: i64 = renewed[0]
        .2
        .split("locked-until=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lock end in {renewed:?}"));
    assert!(
        renewed_until > first_until,
        "the renewed lock ends later: {renewed_until} vs {first_until}"
    );
    wait_until(
        "the first lock's end has passed",
        Duration::from_secs(5),
        || now_ms() > first_until,
    );
    assert!(
        receive(&broker, "t", "r", 10, "0s").is_empty(),
        "a renewed lock still holds"
    );
    assert!(
        now_ms() < renewed_until,
        "the check ran within the renewed lock (the machine stalled for over a second)"
    );
    let acked = settle(&broker, "ack", "t", "r", &[], &[&held_token]);
    assert!(acked[0].1, "{acked:?}");

    // An ack after the lock expired is refused, not silently accepted.
    publish(&broker, "t", &["second".to_string()], &["--type", "x"]);
    let second = receive(&broker, "t", "s", 10, "5s");
    assert_eq!(second.len(), 1);
    let second_until = second[0]["locked_until"].as_i64().expect("locked_until");
    wait_until("the lock's end has passed", Duration::from_secs(5), || {
        now_ms() > second_until
    });
    let late = settle(&broker, "ack", "t", "s", &[], &[&token(&second[0])]);
    assert!(!late[0].1, "{late:?}");
    assert!(
        late[0].2.contains("LockLost") && late[0].2.contains("expired"),
        "{late:?}"
    );
    let back = receive(&broker, "t", "s", 10, "5s");
    assert_eq!(
        back.len(),
        1,
        "the event whose late ack was refused comes back"
    );
    assert_eq!(value(&back[0]), "second");
    assert_eq!(back[0]["delivery_count"], 2);
}

#[test]
fn max_deliveries_ttl_and_reject_go_to_the_dead_letter_topic() {
    let broker = Broker::start("subs-dlq", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "src", "--partitions", "2"], ""));
    ok_stdout(&broker.cli(&["topic", "create", "dlq"], ""));
    for (name, extra) in [
        ("md", vec!["--max-deliveries", "2", "--lock-duration", "1s"]),
        ("ttl", vec!["--ttl", "1s"]),
        ("rj", vec![]),
    ] {
        let mut args = vec![
            "subscription",
            "create",
            "src",
            name,
            "--filter-type",
            name,
            "--dead-letter",
            "dlq",
        ];
        args.extend(extra);
        ok_stdout(&broker.cli(&args, ""));
    }
    ok_stdout(&broker.cli(
        &[
            "subscription",
            "create",
            "src",
            "nodl",
            "--filter-type",
            "nodl",
        ],
        "",
    ));
    for kind in ["md", "ttl", "rj", "nodl"] {
        publish(
            &broker,
            "src",
            &[format!("{kind}-event")],
            &["--type", kind, "--subject", "s/1", "--header", "trace=abc"],
        );
    }
    let ttl_published = Instant::now();

    // Reject: dead-lettered before the reject returns.
    let rj = receive(&broker, "src", "rj", 10, "5s");
    assert_eq!(rj.len(), 1);
    assert!(settle(&broker, "reject", "src", "rj", &[], &[&token(&rj[0])])[0].1);
    let dead = consume_all(&broker, "dlq");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let check =
        |d: &serde_json::Value, sub: &str, reason: &str, count: u64, source: &serde_json::Value| {
            let h = &d["headers"];
            assert_eq!(h["deadletterreason"], reason, "{d}");
            assert_eq!(h["deadlettersubscription"], sub, "{d}");
            assert_eq!(h["deliverycount"], count.to_string(), "{d}");
            assert_eq!(h["deadlettertopic"], "src", "{d}");
            assert_eq!(
                h["deadletterpartition"],
                source["partition"].to_string(),
                "{d}"
            );
            assert_eq!(h["deadletteroffset"], source["offset"].to_string(), "{d}");
            assert_eq!(h["trace"], "abc", "the event's own headers are kept: {d}");
            assert_eq!(d["type"], sub, "{d}");
            assert_eq!(d["subject"], "s/1", "{d}");
            assert_eq!(d["value"], format!("{sub}-event"), "{d}");
        };
    check(&dead[0], "rj", "rejected", 1, &rj[0]);
    // The rejected event is settled: never delivered again.
    assert!(receive(&broker, "src", "rj", 10, "0s").is_empty());

    // Max deliveries: two deliveries, two expired locks, then the dead-letter topic.
    let md1 = receive(&broker, "src", "md", 10, "5s");
    assert_eq!(md1[0]["delivery_count"], 1);
    let md2 = receive(&broker, "src", "md", 10, "5s");
    assert_eq!(md2.len(), 1);
    assert_eq!(md2[0]["delivery_count"], 2);
    wait_until(
        "the exhausted event in the dead-letter topic",
        Duration::from_secs(10),
        || consume_all(&broker, "dlq").len() == 2,
    );
    let dead = consume_all(&broker, "dlq");
    let md = dead
        .iter()
        .find(|d| d["headers"]["deadlettersubscription"] == "md")
        .expect("md dead letter");
    check(md, "md", "max-deliveries", 2, &md1[0]);
    assert!(receive(&broker, "src", "md", 10, "0s").is_empty());

    // TTL: an event older than the TTL is dead-lettered instead of delivered.
    let wait = Duration::from_millis(1_200).saturating_sub(ttl_published.elapsed());
    std::thread::sleep(wait);
    assert!(
        receive(&broker, "src", "ttl", 10, "0s").is_empty(),
        "expired events are not delivered"
    );
    wait_until(
        "the expired event in the dead-letter topic",
        Duration::from_secs(10),
        || consume_all(&broker, "dlq").len() == 3,
    );
    let dead = consume_all(&broker, "dlq");
    let ttl = dead
        .iter()
        .find(|d| d["headers"]["deadlettersubscription"] == "ttl")
        .expect("ttl dead letter");
    assert_eq!(ttl["headers"]["deadletterreason"], "ttl-expired", "{ttl}");
    assert_eq!(ttl["headers"]["deliverycount"], "0", "{ttl}");
    assert_eq!(ttl["value"], "ttl-event");

    // Without a dead-letter topic, a rejected event is dropped and counted.
    let nodl = receive(&broker, "src", "nodl", 10, "5s");
    assert!(settle(&broker, "reject", "src", "nodl", &[], &[&token(&nodl[0])])[0].1);
    assert_eq!(consume_all(&broker, "dlq").len(), 3);
    let list = ok_stdout(&broker.cli(&["subscription", "list", "src", "--format", "json"], ""));
    let rows: HashMap<String, serde_json::Value> = list
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (v["name"].as_str().expect("name").to_string(), v)
        })
        .collect();
    assert_eq!(rows["nodl"]["dropped"], 1, "{list}");
    for sub in ["md", "ttl", "rj"] {
        assert_eq!(rows[sub]["dead_lettered"], 1, "{list}");
    }
}

/// Issue 16, finding 7: dead letters go out in batches within `--max-batch-bytes`, so that
/// one settle can reject more than fits in one batch; an event whose dead letter would not
/// fit even alone is dropped and counted, never left locked.
#[test]
fn rejecting_more_than_one_batch_holds_dead_letters_every_event() {
    let limit: usize = 2 << 20;
    let broker = Broker::start("dl-split", 1, &["--max-batch-bytes", "2MiB"]);
    ok_stdout(&broker.cli(&["topic", "create", "big", "--partitions", "1"], ""));
    ok_stdout(&broker.cli(&["topic", "create", "big-dlq", "--partitions", "1"], ""));
    ok_stdout(&broker.cli(
        &[
            "subscription",
            "create",
            "big",
            "all",
            "--dead-letter",
            "big-dlq",
        ],
        "",
    ));
    // 80 events of 60 kB: 4.8 MB of dead letters, three batches at least.
    let values: Vec<String> = (0..80)
        .map(|i| format!("{i:03}-{}", "x".repeat(60_000)))
        .collect();
    publish(&broker, "big", &values, &[]);
    // One event that fits a batch, but whose dead letter (seven headers more) does not.
    let huge = "h".repeat(limit - 64 - 34 - 36 - 100);
    publish(&broker, "big", &[huge.clone()], &[]);

    let mut events = Vec::new();
    wait_until("every event received", Duration::from_secs(30), || {
        events.extend(receive(&broker, "big", "all", 1000, "1s"));
        events.len() >= 81
    });
    assert_eq!(events.len(), 81);
    let tokens: Vec<String> = events.iter().map(token).collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    for (_, ok, line) in settle(&broker, "reject", "big", "all", &[], &refs) {
        assert!(ok, "every reject is settled: {line}");
    }

    let dead = consume_all(&broker, "big-dlq");
    let mut got: Vec<String> = dead.iter().map(value).collect();
    got.sort();
    assert_eq!(
        got, values,
        "every event but the oversized one is dead-lettered"
    );
    assert!(dead
        .iter()
        .all(|d| d["headers"]["deadletterreason"] == "rejected"));
    let list = ok_stdout(&broker.cli(&["subscription", "list", "big", "--format", "json"], ""));
    let row: serde_json::Value = serde_json::from_str(list.trim()).expect("json");
    assert_eq!(row["dead_lettered"], 80, "{list}");
    assert_eq!(
        row["dropped"], 1,
        "the oversized dead letter is counted: {list}"
    );
    assert_eq!(row["locked"], 0, "nothing stays locked: {list}");
    assert!(broker.log_text().contains("over --max-batch-bytes"));
    assert!(receive(&broker, "big", "all", 10, "0s").is_empty());
}

#[test]
fn kill9_mid_receive_and_ack_loses_no_ack_and_no_event() {
    const EVENTS: usize = 3_000;
    let mut broker = Broker::start("subs-kill9", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "q", "--partitions", "4"], ""));
    ok_stdout(&broker.cli(
        &["subscription", "create", "q", "s", "--lock-duration", "2s"],
        "",
    ));
    let values: Vec<String> = (0..EVENTS).map(|i| format!("ev-{i:05}")).collect();
    publish(&broker, "q", &values, &["--type", "x"]);

    // Outcome per value: confirmed acked, or ack sent without an answer.
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let unsure: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (acked, unsure, stop) = (Arc::clone(&acked), Arc::clone(&unsure), Arc::clone(&stop));
        with_client(broker.addr(), move |client| {
            Box::pin(async move {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(events) = client
                        .receive("q", "s", 25, Duration::from_millis(100))
                        .await
                    else {
                        return;
                    };
                    let names: Vec<String> = events
                        .iter()
                        .map(|e| {
                            String::from_utf8_lossy(e.record().expect("record").value).into_owned()
                        })
                        .collect();
                    let tokens: Vec<String> = events.iter().map(|e| e.lock_token.clone()).collect();
                    unsure.lock().expect("lock").extend(names.iter().cloned());
                    let Ok(results) = client.ack("q", "s", &tokens).await else {
                        return; // the broker died with these acks in flight
                    };
                    let mut a = acked.lock().expect("lock");
                    let mut u = unsure.lock().expect("lock");
                    for (name, r) in names.iter().zip(results) {
                        u.remove(name);
                        if r.is_ok() {
                            a.insert(name.clone());
                        }
                    }
                }
            })
        })
    };
    wait_until(
        "a third of the events acked",
        Duration::from_secs(60),
        || acked.lock().expect("lock").len() >= EVENTS / 3,
    );
    broker.kill9();
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");
    let acked = acked.lock().expect("lock").clone();
    let unsure = unsure.lock().expect("lock").clone();
    assert!(acked.len() < EVENTS, "the kill came before the end");

    broker.restart();
    // Everything not acknowledged comes back (events locked at the kill once their lock
    // ends); nothing acknowledged does.
    let mut after: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = receive(&broker, "q", "s", 1000, "3s");
        if events.is_empty() {
            break; // nothing for longer than a lock duration
        }
        assert!(Instant::now() < deadline, "redelivery did not settle");
        let tokens: Vec<String> = events.iter().map(token).collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        for (_, ok, line) in settle(&broker, "ack", "q", "s", &[], &refs) {
            assert!(ok, "{line}");
        }
        for e in &events {
            *after.entry(value(e)).or_default() += 1;
        }
    }
    for v in &values {
        let back = after.contains_key(v);
        if acked.contains(v) {
            assert!(!back, "{v} was acknowledged before the kill and came back");
        } else if !unsure.contains(v) {
            assert!(back, "{v} was never acknowledged and did not come back");
        }
    }
    assert!(after.values().all(|&n| n == 1), "each event came back once");
    assert_eq!(
        acked.len() + after.len() + unsure.iter().filter(|v| !after.contains_key(*v)).count(),
        EVENTS
    );
    eprintln!(
        "kill -9: {} acked before, {} in flight, {} delivered after restart",
        acked.len(),
        unsure.len(),
        after.len()
    );
}

#[test]
fn consumer_group_resumes_from_committed_offsets() {
    let mut broker = Broker::start("subs-groups", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "log", "--partitions", "3"], ""));
    let values: Vec<String> = (0..300).map(|i| format!("m-{i:03}")).collect();
    publish(&broker, "log", &values[..200], &[]);
    let consume = |broker: &Broker, count: &str| -> Vec<String> {
        let out = broker.cli(
            &[
                "consume",
                "log",
                "--group",
                "g",
                "--count",
                count,
                "--idle-timeout",
                "1s",
            ],
            "",
        );
        ok_stdout(&out).lines().map(str::to_string).collect()
    };
    let first = consume(&broker, "120");
    assert_eq!(first.len(), 120);
    broker.kill9();
    broker.restart();
    publish(&broker, "log", &values[200..], &[]);
    let rest = consume(&broker, "1000");
    let mut all: Vec<String> = first.into_iter().chain(rest).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "no message twice across the restart");
    assert_eq!(all, values, "every message once");
    // Another group starts from the beginning.
    let other = broker.cli(
        &["consume", "log", "--group", "h", "--idle-timeout", "1s"],
        "",
    );
    assert_eq!(ok_stdout(&other).lines().count(), 300);
}

/// Issue 16, finding 9: the consumer groups a partition holds offsets for are bounded
/// (`--max-groups-per-partition`), so a client can not grow the broker's memory with group
/// names; groups already there go on committing, and what is refused is never seen.
#[test]
fn consumer_groups_per_partition_are_bounded() {
    let broker = Broker::start("groups-bound", 1, &["--max-groups-per-partition", "3"]);
    ok_stdout(&broker.cli(&["topic", "create", "g", "--partitions", "1"], ""));
    let outcomes = with_client(broker.addr(), |client| {
        Box::pin(async move {
            let mut outcomes = Vec::new();
            for (group, offset) in [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("a", 5)] {
                let result = client
                    .commit_offsets(group, "g", &[(0, offset)])
                    .await
                    .expect("commit request");
                outcomes.push(result[0].1.clone().map_err(|e| (e.code, e.message)));
            }
            let mut fetched = Vec::new();
            for group in ["a", "b", "c", "d"] {
                let result = client
                    .fetch_offsets(group, "g", &[0])
                    .await
                    .expect("fetch request");
                fetched.push(result[0].1.clone().expect("fetch"));
            }
            (outcomes, fetched)
        })
    })
    .join()
    .expect("client thread");
    let (commits, fetched) = outcomes;
    assert!(commits[..3].iter().all(Result::is_ok), "{commits:?}");
    match &commits[3] {
        Err((code, message)) => {
            assert_eq!(*code, corebus::protocol::wire::ErrorCode::InvalidArgument);
            assert!(message.contains("--max-groups-per-partition"), "{message}");
        }
        Ok(()) => panic!("a fourth group must be refused"),
    }
    assert!(
        commits[4].is_ok(),
        "a known group commits again: {commits:?}"
    );
    assert_eq!(fetched, vec![Some(5), Some(2), Some(3), None]);
}

#[test]
fn a_partition_or_subscription_state_that_can_not_be_opened_is_offline_and_the_rest_is_served() {
    let mut broker = Broker::start("subs-offline", 1, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "t", "--partitions", "3"], ""));
    ok_stdout(&broker.cli(&["subscription", "create", "t", "s"], ""));
    for p in 0..3 {
        let values: Vec<String> = (0..5).map(|i| format!("p{p}-{i}")).collect();
        publish(&broker, "t", &values, &["--partition", &p.to_string()]);
    }
    assert!(broker.terminate().success());
    let dir = broker.data_dir.join("topics").join("t");
    // Partition 1: its segment can not be opened (a directory where the file should be).
    let segment = dir.join("1").join("00000000000000000000.log");
    std::fs::remove_file(&segment).expect("remove segment");
    std::fs::create_dir(&segment).expect("a directory in its place");
    // Partition 2: the subscription's state holds a record with a valid checksum that does
    // not decode.
    let payload = [0xffu8; 3];
    let mut record = (payload.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    let state = dir.join("2").join("subscriptions").join("s.state");
    assert!(
        state.exists(),
        "the subscription's state of partition 2 is at {state:?}"
    );
    std::fs::write(&state, record).expect("damage the state");

    broker.restart();
    let log = broker.log_text();
    assert!(log.contains("partition t/1 could not be opened"), "{log}");
    assert!(
        log.contains("subscription s of t/2 could not be opened"),
        "{log}"
    );
    // The rest is served: produce and fetch on partition 0, events of partitions 0 and 2.
    publish(&broker, "t", &["p0-5".to_string()], &["--partition", "0"]);
    let out = broker.cli(
        &[
            "consume",
            "t",
            "--partition",
            "0",
            "--idle-timeout",
            "300ms",
        ],
        "",
    );
    assert_eq!(ok_stdout(&out).lines().count(), 6);
    let out = broker.cli(
        &[
            "consume",
            "t",
            "--partition",
            "1",
            "--idle-timeout",
            "300ms",
        ],
        "",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("partition t/1 is offline"),
        "{stderr}"
    );
    let events = receive(&broker, "t", "s", 100, "0s");
    let partitions: std::collections::BTreeSet<u64> = events
        .iter()
        .filter_map(|e| e["partition"].as_u64())
        .collect();
    assert_eq!(events.len(), 6, "the events of partition 0: {events:?}");
    assert_eq!(partitions, [0].into_iter().collect());
}

/// A flipped bit inside a subscription's state, with valid writes after it, is damage to
/// acknowledged state, not a torn tail: the file is refused and left as it is, that
/// subscription's partition is offline, and the rest is served.
#[test]
fn damage_inside_a_subscription_state_is_refused_not_cut() {
    let mut broker = Broker::start("subs-state-damage", 1, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "t", "--partitions", "2"], ""));
    ok_stdout(&broker.cli(&["subscription", "create", "t", "s"], ""));
    let values: Vec<String> = (0..5).map(|i| format!("p0-{i}")).collect();
    publish(&broker, "t", &values, &["--partition", "0"]);
    // Partition 0's state: the snapshot, then a write for the locks and one per ack.
    let events = receive(&broker, "t", "s", 100, "0s");
    assert_eq!(events.len(), 5);
    for event in &events[..3] {
        let acked = settle(&broker, "ack", "t", "s", &[], &[&token(event)]);
        assert!(acked[0].1, "{acked:?}");
    }
    let values: Vec<String> = (0..5).map(|i| format!("p1-{i}")).collect();
    publish(&broker, "t", &values, &["--partition", "1"]);
    assert!(broker.terminate().success());

    let state = broker.data_dir.join("topics/t/0/subscriptions/s.state");
    let mut bytes = std::fs::read(&state).expect("the state of partition 0");
    // Each write is `u32 flags|len, u32 crc, body`: damage the body of the second.
    let mut starts = vec![0usize];
    while let Some(word) = bytes
        .get(starts[starts.len() - 1]..)
        .and_then(|b| b.get(..4))
    {
        let len = (u32::from_le_bytes([word[0], word[1], word[2], word[3]]) & 0x3fff_ffff) as usize;
        starts.push(starts[starts.len() - 1] + 8 + len);
    }
    assert!(
        starts.len() >= 5,
        "a snapshot and at least three writes: {starts:?}"
    );
    bytes[starts[1] + 12] ^= 0x01;
    std::fs::write(&state, &bytes).expect("damage the state");

    broker.restart();
    let log = broker.log_text();
    assert!(
        log.contains("subscription s of t/0 could not be opened"),
        "{log}"
    );
    assert!(log.contains("not a torn tail"), "{log}");
    assert_eq!(
        std::fs::read(&state).expect("state"),
        bytes,
        "left as it is"
    );
    let events = receive(&broker, "t", "s", 100, "0s");
    let values: Vec<String> = events.iter().map(value).collect();
    assert_eq!(
        values,
        (0..5).map(|i| format!("p1-{i}")).collect::<Vec<_>>()
    );
    // With nothing else to deliver, a receive reports the damage.
    let out = broker.cli(&["receive", "t", "s", "--max", "10", "--wait", "0s"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("is offline"),
        "{stderr}"
    );
}

/// Events that retention removes before a subscription reads them are counted as lost (in
/// the subscription's figures and its metric), and delivery goes on from the log start.
#[test]
fn events_removed_by_retention_before_delivery_are_counted_as_lost() {
    let broker = Broker::start(
        "subs-lost",
        1,
        &[
            "--segment-bytes",
            "64KiB",
            "--retention-check-interval",
            "100ms",
        ],
    );
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
    ok_stdout(&broker.cli(&["subscription", "create", "trim", "s"], ""));
    let input: String = (0..5_000)
        .map(|i| format!("{i:06}-{}\n", "x".repeat(80)))
        .collect();
    ok_stdout(&broker.cli(&["publish", "trim", "--batch-records", "50"], &input));
    // Wait until retention has removed the oldest segments.
    wait_until("retention", Duration::from_secs(20), || {
        let out = broker.cli(
            &["consume", "trim", "--from", "earliest", "--count", "1"],
            "",
        );
        let first = String::from_utf8_lossy(&out.stdout).into_owned();
        !first.is_empty() && !first.starts_with("000000")
    });
    // The subscription never read the removed events: it starts at the log start it meets,
    // and counts every offset below it as lost.
    let events = receive(&broker, "trim", "s", 10, "0s");
    let first = events.first().map(value).expect("an event");
    let first: u64 = first[..6].parse().expect("a numbered value");
    assert!(first > 0, "retention removed offset 0");
    let list = ok_stdout(&broker.cli(&["subscription", "list", "trim", "--format", "json"], ""));
    let row: serde_json::Value = serde_json::from_str(list.trim()).expect("json");
    assert_eq!(row["lost"].as_u64(), Some(first), "{row}");
}
