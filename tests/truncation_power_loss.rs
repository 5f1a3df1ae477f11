//! A truncation under power loss: a log is written, cut back into an earlier segment, and
//! grown again, with its disk trace on; `storage::power_loss` makes the disk images a power
//! cut could leave at points of that history, and the log is reopened on each.
//!
//! What must hold at every cut: before the truncation began, the log as it was; while it
//! runs, the log as it was cut back to some batch boundary at or after the requested one
//! (never a gap, never a batch cut in two); after it returned, nothing past the cut comes
//! back, and every batch acknowledged since is there.
//!
//! The only test of its binary: the trace is process-wide and switched on at the first
//! storage operation. `COREBUS_CRASH_SEED` repeats a run.

mod common;

use std::collections::BTreeSet;
use std::rc::Rc;

use common::log::{
    append_batches, prime_direct_io, small_segments, try_read_records, value, PER_BATCH,
};
use corebus::storage::disk_trace;
use corebus::storage::power_loss::{History, Rng};
use corebus::storage::segment;
use corebus::storage::{LogConfig, PartitionLog};

/// Cuts checked, each on its own image.
const CUTS: usize = 120;

fn config() -> Rc<LogConfig> {
    small_segments(16)
}

/// What the traced run did: where it cut, and how far each part of the log reached.
struct Run {
    cut: u64,
    old_end: u64,
    new_end: u64,
}

/// Checks the records served from the image of one cut; returns what is wrong.
fn check(run: &Run, history: &History, served: &[(u64, String)], at: usize) -> Option<String> {
    let note = |prefix: &str| {
        history
            .notes()
            .iter()
            .find(|(_, text)| text.starts_with(prefix))
            .map(|(i, _)| *i)
    };
    let began = note("truncate ")?;
    let returned = note("truncated")?;
    let kind_at = |o: u64| {
        if o < run.cut || at <= returned {
            "old"
        } else {
            "new"
        }
    };
    for (i, (offset, v)) in served.iter().enumerate() {
        if *offset != i as u64 || *v != value(kind_at(*offset), *offset) {
            return Some(format!("offset {offset} serves {v:?}"));
        }
    }
    let len = served.len() as u64;
    // The end of what was acknowledged before the cut, of the log as it was (before the
    // truncation began) or as it grew again (after it returned).
    let acked = |after: usize| {
        history
            .acks()
            .iter()
            .filter(|a| a.at >= after && a.at < at)
            .map(|a| a.last + 1)
            .max()
            .unwrap_or(0)
    };
    let (low, high) = if at <= began {
        (acked(0), run.old_end)
    } else if at <= returned {
        (run.cut, run.old_end)
    } else {
        (acked(returned).max(run.cut), run.new_end)
    };
    if len < low || len > high || len % PER_BATCH != 0 {
        return Some(format!(
            "{len} records served; between {low} and {high}, whole batches, expected"
        ));
    }
    None
}

#[test]
fn a_truncation_cut_short_by_a_power_loss_leaves_a_prefix_and_never_comes_back() {
    let seed = std::env::var("COREBUS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| corebus::clock::now_ms() as u64);
    eprintln!("seed {seed} (COREBUS_CRASH_SEED={seed} repeats it)");
    let data = common::fresh_dir("truncation-pl");
    let trace = common::fresh_dir("truncation-pl-trace").join("disk.trace");
    std::env::set_var(disk_trace::ENV, &trace);
    let traced_dir = data.clone();
    let run = corebus::runtime::block_on(None, async move {
        prime_direct_io().await;
        let log = PartitionLog::open(&traced_dir, config())
            .await
            .expect("open");
        append_batches(&log, "old", 300).await;
        let old_end = log.high_watermark();
        let bases = segment::list(&traced_dir).expect("segments");
        // Two segments or more after the one cut: their removals must go last first.
        assert!(bases.len() >= 4, "the log spans segments: {bases:?}");
        let cut = bases[1] + 4 * PER_BATCH;
        log.truncate(cut).await.expect("truncate");
        disk_trace::instant(|| disk_trace::Op::Note {
            text: "truncated".into(),
        });
        append_batches(&log, "new", 200).await;
        let new_end = log.high_watermark();
        drop(log);
        Run {
            cut,
            old_end,
            new_end,
        }
    })
    .expect("executor");
    let bytes = std::fs::read(&trace).expect("read the trace");
    let events = disk_trace::read(&bytes).expect("parse the trace");
    let history = History::new(&events).expect("analyse the trace");
    eprintln!("the history: {:?}", history.summary());
    let began = history
        .notes()
        .iter()
        .find(|(_, t)| t.starts_with("truncate "))
        .map(|(i, _)| *i)
        .expect("the truncation is in the trace");
    // Every event of the truncation and what follows it soon, then a sample of the rest.
    let mut rng = Rng::new(seed);
    let mut cuts: BTreeSet<usize> =
        (began.saturating_sub(3)..history.events().min(began + 60)).collect();
    let interesting: Vec<usize> = history
        .interesting_cuts()
        .into_iter()
        .filter(|&c| c + 3 >= began)
        .collect();
    while cuts.len() < CUTS && !interesting.is_empty() {
        cuts.insert(interesting[rng.below(interesting.len() as u64) as usize]);
    }
    let root = data.to_string_lossy().into_owned();
    let mut problems = Vec::new();
    let checked = cuts.len();
    for at in cuts {
        let image_seed = seed ^ (at as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let image = history.image(at, &root, &mut Rng::new(image_seed));
        let dir = common::fresh_dir("truncation-pl-cut");
        image.write(&root, &dir).expect("write the image");
        let opened = dir.clone();
        let served = corebus::runtime::block_on(None, async move {
            prime_direct_io().await;
            let log = PartitionLog::open(&opened, config())
                .await
                .map_err(|e| e.to_string())?;
            try_read_records(&log).await
        })
        .expect("executor");
        let wrong = match served {
            Ok(served) => check(&run, &history, &served, at),
            Err(e) => Some(format!("the log does not open: {e}")),
        };
        match wrong {
            Some(w) => problems.push(format!("cut at event {at} (seed {seed}): {w}")),
            None => {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {checked} cuts wrong, the first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let _ = std::fs::remove_dir_all(&data);
}
