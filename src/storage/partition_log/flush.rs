//! The group commit: one flush task per log writes everything pending with a few large
//! aligned writes, makes it durable, then acknowledges it and lets readers see it.

use std::rc::Rc;

use glommio::io::DmaFile;

use super::append::StoredBatch;
use super::reader::CachedBatch;
use super::{device_failed, LogState, PartitionLog};
use crate::record::batch::HEADER_PREFIX_LEN;
use crate::storage::disk_trace::{self, Op};
use crate::storage::dma::{self, align_down, align_up, ChunkFiller, ALIGN};
use crate::storage::probes::ProbePoint;
use crate::storage::shard_sync::WriteInFlight;
use crate::storage::{Durability, StorageError};

/// What made a flush durable.
enum SyncedBy {
    /// An `fdatasync` of the segment file (which also committed its metadata).
    OwnFile,
    /// The shard's shared call (see `storage::shard_sync`).
    Shard,
}

impl PartitionLog {
    /// Flushes pending batches until none are left: the group commit.
    pub(super) async fn flush_loop(self: Rc<Self>) {
        loop {
            let roll = {
                let mut st = self.state.borrow_mut();
                self.adopt_device_failure(&mut st);
                if let Some(why) = st.failed.clone().filter(|_| !st.pending.is_empty()) {
                    // Turned read-only (a sync failed elsewhere on the device) with appends
                    // waiting: they are refused, not left waiting.
                    drop(st);
                    self.fail_flush(StorageError::ReadOnly(why), false);
                    continue;
                }
                if st.pending.is_empty() || st.failed.is_some() {
                    st.flushing = false;
                    return;
                }
                self.roll_due(&st)
            };
            if roll {
                if let Err(e) = self.roll().await {
                    self.fail_flush(e, false);
                    continue;
                }
            }
            let (batches, bytes, file, start_pos, carry, needed, extent) = {
                let mut st = self.state.borrow_mut();
                let Some(active) = st.segments.back() else {
                    st.flushing = false;
                    return;
                };
                let (end, extent, file) = (active.end, active.extent, Rc::clone(&active.file));
                let mut batches = Vec::new();
                let mut bytes = 0usize;
                while let Some(next) = st.pending.front() {
                    let fits = end + (bytes + next.len()) as u64 <= self.config.segment_bytes;
                    if !batches.is_empty() && !fits {
                        break;
                    }
                    let Some(b) = st.pending.pop_front() else {
                        break;
                    };
                    bytes += b.len();
                    batches.push(b);
                }
                st.pending_bytes -= bytes;
                let needed = align_up(end + bytes as u64);
                (
                    batches,
                    bytes,
                    file,
                    align_down(end),
                    st.tail_block.clone(),
                    needed,
                    extent,
                )
            };
            self.state.borrow_mut().space_waiters.wake_next();
            if needed > extent.allocated() {
                if let Err(e) = self.grow_active(&file, needed, extent.allocated()).await {
                    self.fail_flush(e, false);
                    continue;
                }
            }
            self.prewrite_clear_of(needed).await;
            let mut filler = ChunkFiller::new(&file, carry.len() + bytes, self.config.max_io_bytes);
            filler.put(&carry);
            for b in &batches {
                filler.put(&b.header);
                filler.put(&b.body);
            }
            let new_end = start_pos + (carry.len() + bytes) as u64;
            let new_tail = filler.last_bytes((new_end % ALIGN) as usize);
            let metrics = &self.config.metrics;
            let started = std::time::Instant::now();
            metrics.flush_bytes.observe(bytes as f64);
            metrics.flush_batches.observe(batches.len() as f64);
            // Only rewritten blocks whose allocation is committed: no metadata to sync.
            let overwrite =
                extent.is_overwrite(needed) || self.config.probes.skips(ProbePoint::OverwriteCheck);
            let shared_sync = match &self.shard_sync {
                Some(shard)
                    if self.config.durability == Durability::Sync && shard.serves(overwrite) =>
                {
                    Some(shard.write_started())
                }
                _ => None,
            };
            let written = match self.config.probes.hit(ProbePoint::Write) {
                Some(e) => Err(StorageError::io(
                    format!("writing {}", self.active_path().display()),
                    &e,
                )),
                None => filler.write_at(start_pos).await,
            };
            if written.is_ok() {
                metrics.observe_write(started.elapsed().as_secs_f64());
            }
            let result = match written {
                // EIO: the device failed the write, and may lose what it had accepted.
                Err(e) => {
                    let fatal = e.is_device_failure();
                    Err((e, fatal))
                }
                Ok(()) if self.config.durability == Durability::Sync => {
                    match self.sync(&file, shared_sync).await {
                        Ok(SyncedBy::OwnFile) => {
                            self.mark_synced(&file, needed);
                            Ok(())
                        }
                        Ok(SyncedBy::Shard) => Ok(()),
                        Err(e) => Err((e, true)),
                    }
                }
                Ok(()) => Ok(()),
            };
            // Another sync on the device failed meanwhile: this write may be gone with it.
            let result = match (result, self.config.sync_health.failure()) {
                (Ok(()), Some(why)) => Err((device_failed(&why), true)),
                (result, _) => result,
            };
            match result {
                Ok(()) => {
                    metrics.observe_flush(started.elapsed().as_secs_f64());
                    self.complete_flush(batches, new_end, new_tail);
                    self.start_prewrite(&file, bytes as u64);
                    self.start_spare();
                }
                Err((error, fatal)) => {
                    metrics.flush_errors.set(metrics.flush_errors.get() + 1);
                    self.fail_flush(error, fatal);
                }
            }
        }
    }

    /// Makes a flush's completed write durable: by the shard's shared call when the write was
    /// announced to it (`shared`), else by an `fdatasync` of `file`.
    async fn sync(
        &self,
        file: &DmaFile,
        shared: Option<WriteInFlight>,
    ) -> Result<SyncedBy, StorageError> {
        let context = || format!("fdatasync of {}", self.active_path().display());
        if let Some(e) = self.config.probes.hit(ProbePoint::Fdatasync) {
            return Err(StorageError::io(context(), &e));
        }
        let started = std::time::Instant::now();
        let metrics = &self.config.metrics;
        let result = match shared {
            Some(write) => {
                metrics
                    .shard_synced_flushes
                    .set(metrics.shard_synced_flushes.get() + 1);
                write.synced().await.map(|()| SyncedBy::Shard)
            }
            None if self.config.probes.skips(ProbePoint::Fdatasync) => Ok(SyncedBy::OwnFile),
            None => {
                metrics
                    .file_synced_flushes
                    .set(metrics.file_synced_flushes.get() + 1);
                dma::fdatasync(file)
                    .await
                    .map(|()| SyncedBy::OwnFile)
                    .map_err(|e| StorageError::glommio(context(), e))
            }
        };
        metrics.observe_sync(started.elapsed().as_secs_f64());
        result
    }

    /// An `fdatasync` of `file` committed its blocks below `to` (block-aligned): flushes that
    /// only overwrite them may share the shard's disk flush from now on.
    fn mark_synced(&self, file: &Rc<DmaFile>, to: u64) {
        let mut st = self.state.borrow_mut();
        if let Some(active) = st.segments.back_mut() {
            if Rc::ptr_eq(&active.file, file) {
                active.extent.synced(to);
            }
        }
    }

    /// Makes a finished flush visible: acknowledges, indexes and caches its batches.
    fn complete_flush(&self, batches: Vec<StoredBatch>, new_end: u64, new_tail: Vec<u8>) {
        let acked = batches.first().zip(batches.last());
        let acked = acked.map(|(first, last)| (first.base_offset, last.last_offset));
        let mut st = self.state.borrow_mut();
        let interval = self.config.index_interval_bytes;
        let now = crate::clock::now_ms();
        let Some(active) = st.segments.back_mut() else {
            return;
        };
        let mut pos = active.end;
        active.first_append_ms.get_or_insert(now);
        for b in &batches {
            active.record_batch(
                pos,
                b.len() as u64,
                b.base_offset,
                b.last_offset,
                b.retention_timestamp_ms(),
                interval,
            );
            pos += b.len() as u64;
        }
        debug_assert_eq!(pos, new_end, "flush must end where its bytes end");
        // The stamped headers of the whole flush in one allocation, shared by the cache.
        let mut headers = bytes::BytesMut::with_capacity(batches.len() * HEADER_PREFIX_LEN);
        for b in &batches {
            headers.extend_from_slice(&b.header);
        }
        let mut headers = headers.freeze();
        for b in batches {
            debug_assert_eq!(
                b.base_offset, st.high_watermark,
                "offsets must be contiguous"
            );
            st.high_watermark = b.last_offset + 1;
            st.messages_in += b.last_offset - b.base_offset + 1;
            st.bytes_in += b.len() as u64;
            st.cache.push(CachedBatch {
                header: headers.split_to(HEADER_PREFIX_LEN),
                body: b.body,
                base_offset: b.base_offset,
                last_offset: b.last_offset,
            });
        }
        st.tail_block = new_tail;
        let open_logs = self.config.metrics.open_logs.get().max(1) as usize;
        let cache_limit = self
            .config
            .cache_bytes
            .min(self.config.cache_budget_bytes / open_logs);
        st.cache.trim(cache_limit);
        if let Some((first, last)) = acked {
            disk_trace::instant(|| Op::Acked {
                dir: disk_trace::path_string(&self.dir),
                first,
                last,
            });
        }
        let hw = st.high_watermark;
        while st.ack_waiters.front().is_some_and(|(last, _)| *last < hw) {
            if let Some((_, tx)) = st.ack_waiters.pop_front() {
                let _ = tx.send(Ok(()));
            }
        }
        for tx in st.data_waiters.drain(..) {
            let _ = tx.send(());
        }
    }

    /// A failed flush: nothing it covered is acknowledged. Every batch not yet durable is
    /// refused and its offsets are given back, so that the log stays contiguous. An
    /// fdatasync failure is fatal: the log turns read-only and never retries the sync (the
    /// kernel may have dropped the dirty pages, so a later "successful" sync proves nothing).
    fn fail_flush(&self, error: StorageError, fatal: bool) {
        let mut st = self.state.borrow_mut();
        let hw = st.high_watermark;
        st.next_offset = hw;
        st.pending.clear();
        st.pending_bytes = 0;
        if fatal {
            self.config
                .sync_health
                .poison(&format!("{}: {error}", self.dir.display()));
            tracing::error!(
                "FATAL storage error in {}: {error}; the partition is now read-only and the \
                 sync is not retried; restart the broker after checking the disk",
                self.dir.display()
            );
            st.failed = Some(error.to_string());
        } else {
            tracing::warn!(
                "flush of {} failed: {error}; producers get an error",
                self.dir.display()
            );
        }
        for (_, tx) in st.ack_waiters.drain(..) {
            let _ = tx.send(Err(error.clone()));
        }
        st.space_waiters.wake_next();
    }

    /// A sync failed on the device outside a flush (a zero-fill, a spare): the shard's logs
    /// turn read-only, this one at once.
    pub(super) fn device_failed(&self, what: &str) {
        self.config.sync_health.poison(what);
        let mut st = self.state.borrow_mut();
        self.adopt_device_failure(&mut st);
    }

    /// Turns this log read-only once a sync on the shard's device has failed (see
    /// `storage::sync_health`).
    pub(super) fn adopt_device_failure(&self, st: &mut LogState) {
        if st.failed.is_none() {
            if let Some(why) = self.config.sync_health.failure() {
                st.failed = Some(device_failed(&why).to_string());
            }
        }
    }
}
