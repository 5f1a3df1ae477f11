//! Work ahead of the appender, in the background: zero-filling the active segment past its
//! end (see `storage::prewrite`), growing its allocation, and making the next segment's file
//! ready (see `storage::spare`), so that flushes neither allocate nor wait for zeros.

use std::rc::Rc;

use futures::channel::oneshot;
use glommio::io::DmaFile;

use super::PartitionLog;
use crate::storage::dma::{self, align_up, ALIGN};
use crate::storage::prewrite;
use crate::storage::spare::{self, Spare};
use crate::storage::StorageError;

/// A log's zero-fill: the one in flight, if any, and the flushes waiting on its progress.
#[derive(Default)]
pub(super) struct ZeroFill {
    /// The zero-fill of the active segment in flight, if any: flushes must not write where
    /// its zeros are still to land, and the segment must not be sealed under it.
    running: Option<Prewriting>,
    /// Woken when a zero-fill writes a piece, stops writing, or ends.
    waiters: Vec<oneshot::Sender<()>>,
}

/// A zero-fill in flight (see `storage::prewrite`).
struct Prewriting {
    /// Where its zeros start.
    start: u64,
    /// Its zeros are written up to here (no zero write in flight below).
    zeroed_to: u64,
    /// A flush needs blocks it has not reached: stop after the piece in flight.
    stop: bool,
    /// It writes no more zeros (only its `fdatasync` may be left).
    stopped: bool,
}

/// Zero-fills in flight on a shard at most (each holds a 256 KiB buffer and a disk queue slot):
/// with a thousand small partitions they take turns. With 4, 1,000 partitions at 100k msgs/s
/// had most flushes run past their committed stretch (so each fdatasync'd its own file instead
/// of sharing the shard's disk flush); with 16, 86–95% of them shared it and the ack p50 went
/// from 250–300 ms to 140–190 ms.
const MAX_PREWRITES_IN_FLIGHT: u64 = 16;

impl PartitionLog {
    /// Waits until no zero write is in flight or still to come below `needed`. A zero-fill
    /// that has not got that far yet is told to stop after its current piece: the flush then
    /// writes into blocks that are not zero-filled (and syncs its own file) instead of
    /// waiting for the whole fill and its `fdatasync` (15-20 ms stalls at 200 MB/s).
    pub(super) async fn prewrite_clear_of(&self, needed: u64) {
        loop {
            let rx = {
                let mut st = self.state.borrow_mut();
                match &mut st.zero_fill.running {
                    Some(p) if p.start < needed && p.zeroed_to < needed && !p.stopped => {
                        if !p.stop {
                            p.stop = true;
                            let cut_short = &self.config.metrics.prewrites_cut_short;
                            cut_short.set(cut_short.get() + 1);
                        }
                        let (tx, rx) = oneshot::channel();
                        st.zero_fill.waiters.push(tx);
                        rx
                    }
                    _ => return,
                }
            };
            let _ = rx.await;
        }
    }

    /// Waits until no zero-fill is in flight at all (it is told to stop early).
    pub(super) async fn prewrite_finished(&self) {
        loop {
            let rx = {
                let mut st = self.state.borrow_mut();
                let Some(p) = &mut st.zero_fill.running else {
                    return;
                };
                p.stop = true;
                let (tx, rx) = oneshot::channel();
                st.zero_fill.waiters.push(tx);
                rx
            };
            let _ = rx.await;
        }
    }

    /// After a flush of `flushed` bytes into `file` (the active segment): starts zero-filling
    /// ahead of the end in the background when the policy says so.
    pub(super) fn start_prewrite(self: &Rc<Self>, file: &Rc<DmaFile>, flushed: u64) {
        let range = {
            let mut st = self.state.borrow_mut();
            let in_flight = &self.config.metrics.prewrites_in_flight;
            if st.zero_fill.running.is_some()
                || st.closed
                || in_flight.get() >= MAX_PREWRITES_IN_FLIGHT
            {
                return;
            }
            let lead = self.prewrite_lead();
            let Some(active) = st.segments.back_mut() else {
                return;
            };
            let flushed_to = align_up(active.end);
            active.extent.wrote(flushed_to);
            // Up to the segment's size: a stretch past the allocation is allocated first,
            // here in the background, so that no flush waits for an allocation and then for
            // the zero-fill behind it (seen as 10-25 ms acks every 32 MiB at 100 MB/s).
            let Some(range) = self.config.prewrite.due(
                lead,
                flushed,
                active.end,
                active.extent.written_to(),
                self.config.segment_bytes,
            ) else {
                return;
            };
            let allocated = active.extent.allocated();
            st.zero_fill.running = Some(Prewriting {
                start: range.0,
                zeroed_to: range.0,
                stop: false,
                stopped: false,
            });
            in_flight.set(in_flight.get() + 1);
            (range, allocated)
        };
        let (log, file) = (Rc::clone(self), Rc::clone(file));
        // glommio may run a spawned task right away: no borrow is held here.
        glommio::spawn_local(async move {
            let ((start, end), allocated) = range;
            // A failed allocation (a full disk) is reported by the flush that needs the space.
            let allocated =
                end <= allocated || log.grow_active(&file, end, allocated).await.is_ok();
            // Flushes waiting for the zeros to pass their blocks learn of each piece.
            let progress = |at: u64| {
                let mut st = log.state.borrow_mut();
                let go = match &mut st.zero_fill.running {
                    Some(p) => {
                        p.zeroed_to = at;
                        p.stopped = p.stop || at >= end;
                        !p.stopped
                    }
                    None => false,
                };
                for tx in st.zero_fill.waiters.drain(..) {
                    let _ = tx.send(());
                }
                go
            };
            let result = if allocated {
                prewrite::zero_fill_until(&file, start, end, progress)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            };
            let in_flight = &log.config.metrics.prewrites_in_flight;
            in_flight.set(in_flight.get().saturating_sub(1));
            let mut st = log.state.borrow_mut();
            st.zero_fill.running = None;
            match result {
                Ok(None) => {}
                Err(e) if e.is_device_failure() => {
                    drop(st);
                    log.device_failed(&format!("zero-filling ahead in {}: {e}", log.dir.display()));
                    st = log.state.borrow_mut();
                }
                Ok(Some(zeroed_to)) => {
                    let prewritten = &log.config.metrics.prewritten_bytes;
                    prewritten.set(prewritten.get() + (zeroed_to - start));
                    if let Some(active) = st.segments.back_mut() {
                        if Rc::ptr_eq(&active.file, &file) {
                            // The zero-fill ends with an fdatasync of the file.
                            active.extent.synced(zeroed_to);
                        }
                    }
                }
                // Only speed is lost: flushes write into unwritten blocks as without it.
                Err(e) => tracing::warn!("prewriting {}: {e}", log.dir.display()),
            }
            for tx in st.zero_fill.waiters.drain(..) {
                let _ = tx.send(());
            }
        })
        .detach();
    }

    /// How far this log keeps written ahead (its share of the shard's prewrite budget).
    fn prewrite_lead(&self) -> u64 {
        let open_logs = self.config.metrics.open_logs.get();
        self.config.prewrite.lead(open_logs)
    }

    /// When the active segment is close to full, makes the next segment's file ready in the
    /// background (see `storage::spare`).
    pub(super) fn start_spare(self: &Rc<Self>) {
        let bytes = {
            let mut st = self.state.borrow_mut();
            let in_flight = &self.config.metrics.prewrites_in_flight;
            let absent = matches!(st.spare, Spare::Absent);
            if !absent || st.closed || in_flight.get() >= MAX_PREWRITES_IN_FLIGHT {
                return;
            }
            let lead = self.prewrite_lead();
            let Some(active) = st.segments.back() else {
                return;
            };
            if !spare::due(lead, active.end, self.config.segment_bytes) {
                return;
            }
            st.spare = Spare::Preparing;
            in_flight.set(in_flight.get() + 1);
            align_up(lead.min(self.config.segment_bytes))
        };
        let log = Rc::clone(self);
        // glommio may run a spawned task right away: no borrow is held here.
        glommio::spawn_local(async move {
            let result = spare::prepare(&log.dir, bytes).await;
            let metrics = &log.config.metrics;
            let in_flight = &metrics.prewrites_in_flight;
            in_flight.set(in_flight.get().saturating_sub(1));
            let spare = match result {
                Ok(file) => {
                    let prewritten = &metrics.prewritten_bytes;
                    prewritten.set(prewritten.get() + bytes);
                    Spare::Ready {
                        file,
                        prepared: bytes,
                    }
                }
                Err(e) if e.is_device_failure() => {
                    log.device_failed(&format!(
                        "making the next segment's file ready in {}: {e}",
                        log.dir.display()
                    ));
                    Spare::Failed
                }
                Err(e) => {
                    tracing::warn!(
                        "making the next segment's file ready in {}: {e}; the roll creates it",
                        log.dir.display()
                    );
                    Spare::Failed
                }
            };
            log.state.borrow_mut().spare = spare;
        })
        .detach();
    }

    /// Preallocates more of the active segment (in steps), so that flushes write into
    /// allocated space and a full disk shows up here, before anything is written.
    pub(super) async fn grow_active(
        &self,
        file: &DmaFile,
        needed: u64,
        allocated: u64,
    ) -> Result<(), StorageError> {
        let step = self.config.preallocate_bytes.max(ALIGN);
        let target = align_up(
            needed
                .max(allocated + step)
                .min(self.config.segment_bytes.max(needed)),
        );
        dma::pre_allocate(file, target).await.map_err(|e| {
            StorageError::glommio(
                format!(
                    "preallocating {target} bytes of {}",
                    self.active_path().display()
                ),
                e,
            )
        })?;
        // A flush and a prewrite may both grow the file: the allocation only ever grows.
        if let Some(active) = self.state.borrow_mut().segments.back_mut() {
            if std::ptr::eq(&*active.file, file) {
                active.extent.grew(target);
            }
        }
        Ok(())
    }
}
