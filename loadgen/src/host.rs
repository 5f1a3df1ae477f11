//! Where the machine's CPU time went during the measured window, from `/proc/stat`.
//!
//! On a shared VM the host can take a large share of our cores (`steal`): one 64-producer
//! run on the development VM measured 25% steal and 18.5k msgs/s, runs minutes later under 5%
//! and 26-39k. A figure is only comparable with another when the host left the cores alone,
//! so the report says how much it took.

/// Cumulative CPU times of one CPU, in clock ticks, as `/proc/stat` gives them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Ticks {
    busy: u64,
    iowait: u64,
    idle: u64,
    steal: u64,
}

impl Ticks {
    fn total(&self) -> u64 {
        self.busy + self.iowait + self.idle + self.steal
    }
}

/// A reading of every CPU's times.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    cpus: Vec<(usize, Ticks)>,
}

/// Reads every CPU's times now; empty where `/proc/stat` cannot be read.
pub fn sample() -> Sample {
    std::fs::read_to_string("/proc/stat")
        .map(|text| parse(&text))
        .unwrap_or_default()
}

/// Parses the `cpuN` lines of `/proc/stat`: user nice system idle iowait irq softirq steal
/// (guest time is already counted in user).
fn parse(text: &str) -> Sample {
    let mut cpus = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(name) = fields.next() else { continue };
        let Some(Ok(cpu)) = name.strip_prefix("cpu").map(str::parse::<usize>) else {
            continue; // the "cpu" total line, or not a CPU line
        };
        let v: Vec<u64> = fields.take(8).map_while(|f| f.parse().ok()).collect();
        if v.len() < 8 {
            continue;
        }
        let ticks = Ticks {
            busy: v[0] + v[1] + v[2] + v[5] + v[6],
            idle: v[3],
            iowait: v[4],
            steal: v[7],
        };
        cpus.push((cpu, ticks));
    }
    Sample { cpus }
}

/// Shares of one CPU's time over a window, in percent.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CpuShare {
    /// The CPU's number.
    pub cpu: usize,
    /// Running anything: user, system, interrupts.
    pub busy_pct: f64,
    /// Idle with I/O outstanding.
    pub iowait_pct: f64,
    /// Idle.
    pub idle_pct: f64,
    /// Taken by the hypervisor for other guests.
    pub steal_pct: f64,
}

/// Each CPU's shares between two samples (CPUs missing from either are left out).
pub fn shares(before: &Sample, after: &Sample) -> Vec<CpuShare> {
    let mut out = Vec::new();
    for (cpu, end) in &after.cpus {
        let Some((_, start)) = before.cpus.iter().find(|(c, _)| c == cpu) else {
            continue;
        };
        let d = Ticks {
            busy: end.busy.saturating_sub(start.busy),
            iowait: end.iowait.saturating_sub(start.iowait),
            idle: end.idle.saturating_sub(start.idle),
            steal: end.steal.saturating_sub(start.steal),
        };
        let total = d.total();
        if total == 0 {
            continue;
        }
        let pct = |v: u64| (v as f64 * 1000.0 / total as f64).round() / 10.0;
        out.push(CpuShare {
            cpu: *cpu,
            busy_pct: pct(d.busy),
            iowait_pct: pct(d.iowait),
            idle_pct: pct(d.idle),
            steal_pct: pct(d.steal),
        });
    }
    out
}

/// The largest steal share among `cpus`, in percent (0 without readings).
pub fn max_steal(cpus: &[CpuShare]) -> f64 {
    cpus.iter().map(|c| c.steal_pct).fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "cpu  10 0 10 100 0 0 0 0 0 0\n\
                          cpu0 5 0 5 50 0 0 0 0 0 0\n\
                          cpu1 5 0 5 50 0 0 0 0 0 0\n\
                          intr 12345\n";
    const AFTER: &str = "cpu  100 0 100 200 0 0 0 0 0 0\n\
                         cpu0 35 5 10 60 10 2 8 30 0 0\n\
                         cpu1 55 0 5 100 0 0 0 0 0 0\n";

    #[test]
    fn shares_split_each_cpus_window_into_busy_iowait_idle_and_steal() {
        let s = shares(&parse(BEFORE), &parse(AFTER));
        assert_eq!(s.len(), 2);
        // cpu0: busy 30+5+5+2+8 = 50, idle 10, iowait 10, steal 30 of 100 ticks
        assert_eq!(
            s[0],
            CpuShare {
                cpu: 0,
                busy_pct: 50.0,
                iowait_pct: 10.0,
                idle_pct: 10.0,
                steal_pct: 30.0
            }
        );
        assert_eq!(s[1].busy_pct, 50.0);
        assert_eq!(s[1].steal_pct, 0.0);
        assert_eq!(max_steal(&s), 30.0);
    }

    #[test]
    fn unreadable_or_short_lines_give_no_shares() {
        assert!(shares(&parse(""), &parse(AFTER)).is_empty());
        assert!(parse("cpu0 1 2 3\n").cpus.is_empty());
        assert_eq!(max_steal(&[]), 0.0);
    }
}
