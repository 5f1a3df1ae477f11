//! Named failure probes: points in the storage layer where a test can make an operation fail
//! as the disk would, to check what the broker does then (as Redpanda's failure probes do).
//!
//! Probes are armed once at start from `COREBUS_FAILURE_PROBES`, a comma-separated list of
//! `POINT:ERROR:after=N` (fail the (N+1)-th and every later call) or `POINT:ERROR:once=N`
//! (fail only the (N+1)-th call). POINT is `write`, `fdatasync` or `next-segment` (making the
//! next segment's file in a roll); ERROR is `eio`, `enospc` or `emfile`.
//!
//! ERROR `skip` breaks the broker on purpose instead, to show that the power-loss simulator
//! (`storage::power_loss`) catches what it should: `fdatasync:skip` acknowledges flushes
//! without their own file's `fdatasync`; `overwrite-check:skip` treats every flush as an
//! overwrite of committed blocks, so that it shares the shard's disk flush even when its
//! blocks' allocation is not committed (the shared-flush precondition broken).
//! Unarmed probes cost one branch.

use std::cell::Cell;

/// A place in the storage layer where an error can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbePoint {
    /// The direct-I/O write of a flush.
    Write,
    /// The `fdatasync` after a flush.
    Fdatasync,
    /// Making the next segment's file in a roll (adopting the spare or creating one).
    NextSegment,
    /// Deciding whether a flush only overwrites committed blocks (only `skip` applies).
    OverwriteCheck,
}

#[derive(Clone, Copy, Debug)]
struct Arming {
    point: ProbePoint,
    errno: i32,
    skip: u64,
    repeat: bool,
}

/// The armed probes of one shard, with per-point call counters.
#[derive(Debug, Default)]
pub struct FailureProbes {
    armed: Vec<Arming>,
    writes: Cell<u64>,
    syncs: Cell<u64>,
    next_segments: Cell<u64>,
    skipped: Cell<u64>,
}

impl FailureProbes {
    /// Parses a probe specification (see the module docs).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut armed = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = item.split(':').collect();
            let [point, error, when] = parts.as_slice() else {
                return Err(format!(
                    "failure probe '{item}': expected POINT:ERROR:after=N"
                ));
            };
            let point = match *point {
                "write" => ProbePoint::Write,
                "fdatasync" => ProbePoint::Fdatasync,
                "next-segment" => ProbePoint::NextSegment,
                "overwrite-check" => ProbePoint::OverwriteCheck,
                other => return Err(format!("failure probe '{item}': unknown point '{other}'")),
            };
            let errno = match *error {
                "eio" => libc::EIO,
                "enospc" => libc::ENOSPC,
                "emfile" => libc::EMFILE,
                "skip" => SKIP,
                other => return Err(format!("failure probe '{item}': unknown error '{other}'")),
            };
            let (repeat, n) = if let Some(n) = when.strip_prefix("after=") {
                (true, n)
            } else if let Some(n) = when.strip_prefix("once=") {
                (false, n)
            } else {
                return Err(format!(
                    "failure probe '{item}': expected after=N or once=N"
                ));
            };
            let skip = n
                .parse()
                .map_err(|_| format!("failure probe '{item}': '{n}' is not a count"))?;
            armed.push(Arming {
                point,
                errno,
                skip,
                repeat,
            });
        }
        Ok(Self {
            armed,
            ..Self::default()
        })
    }

    /// Reads `COREBUS_FAILURE_PROBES`; no probes if unset.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("COREBUS_FAILURE_PROBES") {
            Ok(spec) => Self::parse(&spec),
            Err(_) => Ok(Self::default()),
        }
    }

    /// True when no probe is armed.
    pub fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }

    /// Counts a call at `point`; returns the error to inject, if any.
    pub fn hit(&self, point: ProbePoint) -> Option<std::io::Error> {
        if self.armed.is_empty() {
            return None;
        }
        let counter = match point {
            ProbePoint::Write => &self.writes,
            ProbePoint::Fdatasync => &self.syncs,
            ProbePoint::NextSegment => &self.next_segments,
            ProbePoint::OverwriteCheck => return None,
        };
        let n = counter.get();
        counter.set(n + 1);
        let fire = self.armed.iter().find(|a| {
            a.point == point && a.errno != SKIP && (n == a.skip || (a.repeat && n > a.skip))
        })?;
        tracing::warn!(
            "failure probe {point:?} fired on call {} (injected errno {})",
            n + 1,
            fire.errno
        );
        Some(std::io::Error::from_raw_os_error(fire.errno))
    }

    /// True when a `skip` probe at `point` says to leave the step out (see the module docs).
    pub fn skips(&self, point: ProbePoint) -> bool {
        if self.armed.is_empty() {
            return false;
        }
        let n = self.skipped.get();
        self.skipped.set(n + 1);
        self.armed.iter().any(|a| {
            a.point == point && a.errno == SKIP && (n == a.skip || (a.repeat && n > a.skip))
        })
    }
}

/// The `errno` field of a `skip` arming.
const SKIP: i32 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_after_the_given_calls() {
        let probes =
            FailureProbes::parse("fdatasync:eio:after=2, write:enospc:once=0").expect("parse");
        assert!(probes.hit(ProbePoint::Write).is_some());
        assert!(probes.hit(ProbePoint::Write).is_none());
        assert!(probes.hit(ProbePoint::Fdatasync).is_none());
        assert!(probes.hit(ProbePoint::Fdatasync).is_none());
        let e = probes.hit(ProbePoint::Fdatasync).expect("fires");
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(probes.hit(ProbePoint::Fdatasync).is_some());
        assert!(FailureProbes::parse("fsync:eio:after=1").is_err());
    }
}
