//! What the run measures: HdrHistograms of publish→ack and end-to-end latency (µs), and
//! counters, all owned by the generator's single executor.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The run's clock: every timestamp is nanoseconds since this origin.
#[derive(Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
    /// Nanoseconds since the origin.
    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 100 s at 3 significant digits: constant, valid bounds.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant histogram bounds are valid")
}

/// Counters and histograms of a run.
pub struct Stats {
    /// Messages acknowledged after the warmup.
    pub produced: Cell<u64>,
    /// Bytes of values acknowledged after the warmup.
    pub produced_bytes: Cell<u64>,
    /// Batch bytes of those messages as sent (compressed, with batch and record headers).
    pub produced_wire_bytes: Cell<u64>,
    /// Messages acknowledged in total (verification).
    pub acked_total: Cell<u64>,
    /// Messages consumed after the warmup.
    pub consumed: Cell<u64>,
    /// Bytes of values consumed after the warmup.
    pub consumed_bytes: Cell<u64>,
    /// Messages consumed in total (verification).
    pub consumed_total: Cell<u64>,
    /// Bytes of values consumed in total, warmup included (a catch-up reads them all).
    pub consumed_total_bytes: Cell<u64>,
    /// Failed requests and verification errors.
    pub errors: Cell<u64>,
    /// First error messages, for the report.
    pub error_samples: RefCell<Vec<String>>,
    /// Publish → ack latency, µs.
    pub ack_latency: RefCell<Histogram<u64>>,
    /// Publish → consume latency, µs.
    pub e2e_latency: RefCell<Histogram<u64>>,
    /// Open loop: how much later than scheduled (intended time plus linger) the generator
    /// sent each batch, µs. Small next to the latencies means the generator kept up.
    pub send_lag: RefCell<Histogram<u64>>,
    /// Set once the warmup is over (ns on the run clock).
    pub measure_from_ns: Cell<u64>,
}

impl Stats {
    /// Empty stats; measuring starts at `measure_from_ns`.
    pub fn new(measure_from_ns: u64) -> Self {
        Self {
            produced: Cell::new(0),
            produced_bytes: Cell::new(0),
            produced_wire_bytes: Cell::new(0),
            acked_total: Cell::new(0),
            consumed: Cell::new(0),
            consumed_bytes: Cell::new(0),
            consumed_total: Cell::new(0),
            consumed_total_bytes: Cell::new(0),
            errors: Cell::new(0),
            error_samples: RefCell::new(Vec::new()),
            ack_latency: RefCell::new(histogram()),
            e2e_latency: RefCell::new(histogram()),
            send_lag: RefCell::new(histogram()),
            measure_from_ns: Cell::new(measure_from_ns),
        }
    }

    /// Counts an error, keeping the first few messages.
    pub fn error(&self, what: String) {
        self.errors.set(self.errors.get() + 1);
        let mut samples = self.error_samples.borrow_mut();
        if samples.len() < 10 {
            samples.push(what);
        }
    }

    /// Records a message acknowledged at `acked_ns` that was (meant to be) sent at `sent_ns`.
    pub fn acked(&self, sent_ns: u64, acked_ns: u64, bytes: usize) {
        self.acked_total.set(self.acked_total.get() + 1);
        if sent_ns < self.measure_from_ns.get() {
            return;
        }
        self.produced.set(self.produced.get() + 1);
        self.produced_bytes
            .set(self.produced_bytes.get() + bytes as u64);
        let micros = (acked_ns.saturating_sub(sent_ns) / 1000).max(1);
        let _ = self.ack_latency.borrow_mut().record(micros);
    }

    /// Records an acknowledged batch of `wire_bytes` (as sent: compressed, headers included)
    /// whose first message was sent at `sent_ns`.
    pub fn acked_batch(&self, sent_ns: u64, wire_bytes: usize) {
        if sent_ns >= self.measure_from_ns.get() {
            self.produced_wire_bytes
                .set(self.produced_wire_bytes.get() + wire_bytes as u64);
        }
    }

    /// Records an open-loop batch scheduled for `due_ns` and sent at `sent_ns`.
    pub fn sent_late(&self, due_ns: u64, sent_ns: u64) {
        if due_ns < self.measure_from_ns.get() {
            return;
        }
        let micros = (sent_ns.saturating_sub(due_ns) / 1000).max(1);
        let _ = self.send_lag.borrow_mut().record(micros);
    }

    /// Records a message consumed at `now_ns` that was sent at `sent_ns`.
    pub fn consumed(&self, sent_ns: u64, now_ns: u64, bytes: usize) {
        self.consumed_total.set(self.consumed_total.get() + 1);
        self.consumed_total_bytes
            .set(self.consumed_total_bytes.get() + bytes as u64);
        if sent_ns < self.measure_from_ns.get() {
            return;
        }
        self.consumed.set(self.consumed.get() + 1);
        self.consumed_bytes
            .set(self.consumed_bytes.get() + bytes as u64);
        let micros = (now_ns.saturating_sub(sent_ns) / 1000).max(1);
        let _ = self.e2e_latency.borrow_mut().record(micros);
    }
}

/// Percentiles of a histogram, in µs: p50, p90, p99, p99.9, p99.99, max.
pub fn percentiles(h: &Histogram<u64>) -> [(&'static str, u64); 6] {
    [
        ("p50", h.value_at_quantile(0.5)),
        ("p90", h.value_at_quantile(0.9)),
        ("p99", h.value_at_quantile(0.99)),
        ("p999", h.value_at_quantile(0.999)),
        ("p9999", h.value_at_quantile(0.9999)),
        ("max", h.max()),
    ]
}

/// Prints a progress line every second on stderr until `stop` is set.
pub async fn progress(stats: std::rc::Rc<Stats>, stop: std::rc::Rc<Cell<bool>>) {
    let started = Instant::now();
    let (mut last_acked, mut last_consumed) = (0u64, 0u64);
    while !stop.get() {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        let (acked, consumed) = (stats.acked_total.get(), stats.consumed_total.get());
        let p99 = stats.ack_latency.borrow().value_at_quantile(0.99);
        eprintln!(
            "[{:>4.0}s] produce {:>9} msg/s | consume {:>9} msg/s | ack p99 {:>7} us | errors {}",
            started.elapsed().as_secs_f64(),
            acked - last_acked,
            consumed - last_consumed,
            p99,
            stats.errors.get()
        );
        last_acked = acked;
        last_consumed = consumed;
    }
}
