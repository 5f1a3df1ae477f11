//! Running client-side code (CLI, load generator, tests) on a glommio executor.

use std::future::Future;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

/// DMA memory for client executors: clients do no direct I/O.
const CLIENT_IO_MEMORY_BYTES: usize = 2 << 20;

/// Runs `fut` to completion on a fresh single-threaded glommio executor, pinned to `cpu` if
/// given.
pub fn block_on<T, F>(cpu: Option<usize>, fut: F) -> Result<T, String>
where
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    block_on_polling(cpu, Duration::ZERO, fut)
}

/// Like [`block_on`], but when idle the executor keeps polling for up to `spin` before it
/// sleeps: for a load generator on a core of its own, whose wake-ups would otherwise count in
/// the latency it measures.
pub fn block_on_polling<T, F>(cpu: Option<usize>, spin: Duration, fut: F) -> Result<T, String>
where
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let placement = match cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    let executor = LocalExecutorBuilder::new(placement)
        .name("corebus-client")
        .io_memory(CLIENT_IO_MEMORY_BYTES)
        .spin_before_park(spin)
        .make()
        .map_err(|e| format!("starting a glommio executor: {e}"))?;
    Ok(executor.run(fut))
}
