//! Running client-side code (CLI, load generator, tests) on a glommio executor.

use std::future::Future;

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
    let placement = match cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    let executor = LocalExecutorBuilder::new(placement)
        .name("corebus-client")
        .io_memory(CLIENT_IO_MEMORY_BYTES)
        .make()
        .map_err(|e| format!("starting a glommio executor: {e}"))?;
    Ok(executor.run(fut))
}
