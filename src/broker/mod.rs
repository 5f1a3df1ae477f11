//! The broker: shards, their mesh, the network front and request handlers.
//!
//! [`run`] is the whole life of a broker process: prepare the data directory, start one
//! pinned executor per shard, wait until every shard is serving, and on SIGTERM/SIGINT stop
//! accepting, flush every log and exit.

pub mod config;
pub mod figures;
pub mod handlers;
pub mod http;
pub mod mesh;
pub mod messages;
pub mod metadata;
pub mod preflight;
pub mod server;
pub mod shard;
pub mod shard_metrics;
pub mod stats;
pub mod subscription_registry;
pub mod subscriptions;

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

pub use config::BrokerConfig;
use messages::ShardMessage;
use shard::Shard;

use crate::storage::superblock;

/// Capacity of each shard-to-shard channel.
const MESH_CHANNEL_CAPACITY: usize = 1024;
/// How often each shard checks for a shutdown request.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);
/// Longest a shard waits for in-flight requests after it stopped accepting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// Asks the running broker to stop (what SIGTERM does).
pub fn request_shutdown() {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

/// Runs a broker until it is asked to stop. Prints one `corebus ready` line on stderr when
/// every shard is accepting.
pub fn run(config: BrokerConfig) -> Result<(), String> {
    config.validate()?;
    let failures: Vec<String> =
        preflight::fatal_checks(&config.data_dir, config.shards, config.io_memory_bytes)
            .iter()
            .filter(|c| c.status == preflight::Status::Fail)
            .map(preflight::Check::render)
            .collect();
    if !failures.is_empty() {
        return Err(format!(
            "refusing to start (see `corebus doctor`):\n{}",
            failures.join("\n")
        ));
    }
    superblock::ensure(&config.data_dir).map_err(|e| e.to_string())?;
    install_signal_handlers();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let placement = if let Some(list) = &config.cpus {
        let online = glommio::CpuSet::online().map_err(|e| format!("reading the CPU list: {e}"))?;
        let mut sets = Vec::with_capacity(list.len());
        for &cpu in list {
            let set = online.clone().filter(|l| l.cpu == cpu);
            if set.is_empty() {
                return Err(format!("--cpus: CPU {cpu} is not online"));
            }
            sets.push(set);
        }
        PoolPlacement::Custom(sets)
    } else if config.shards <= cpus {
        PoolPlacement::MaxSpread(config.shards, None)
    } else {
        tracing::warn!(
            "{} shards on {cpus} CPUs: shards are not pinned",
            config.shards
        );
        PoolPlacement::Unbound(config.shards)
    };
    report_io_memory(&config);
    let config = Arc::new(config);
    let mesh = MeshBuilder::<ShardMessage, _>::full(config.shards, MESH_CHANNEL_CAPACITY);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, String>>();
    let shard_config = Arc::clone(&config);
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles = LocalExecutorPoolBuilder::new(placement)
        .name("corebus-shard")
        .io_memory(config.io_memory_bytes)
        .ring_depth(1024)
        .on_all_shards(
            move || async move { run_shard(shard_config, mesh, ready_tx, connections).await },
        )
        .map_err(|e| format!("starting shard executors: {e}"))?;
    let mut failure = None;
    for _ in 0..config.shards {
        match ready_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert("a shard stopped during start".to_string());
                break;
            }
        }
    }
    if failure.is_some() {
        request_shutdown();
    } else {
        tracing::info!(
            "corebus ready: listening on {} (shard ports {}..={}), {} shards, data dir {}, durability {}",
            config.listen,
            config.shard_port(0),
            config.shard_port(config.shards - 1),
            config.shards,
            config.data_dir.display(),
            config.durability.as_str()
        );
    }
    for result in handles.join_all() {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(e) => {
                failure.get_or_insert(format!("shard executor failed: {e}"));
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("clean shutdown");
            Ok(())
        }
    }
}

fn report_io_memory(config: &BrokerConfig) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0;
    if ok
        && limit.rlim_cur != libc::RLIM_INFINITY
        && (limit.rlim_cur as usize) < config.io_memory_bytes
    {
        tracing::warn!(
            "DMA pool of {} MiB per shard is above RLIMIT_MEMLOCK ({} KiB): it works but is \
             not registered with io_uring (raise LimitMEMLOCK for registered buffers)",
            config.io_memory_bytes >> 20,
            limit.rlim_cur >> 10
        );
    }
}

async fn run_shard(
    config: Arc<BrokerConfig>,
    mesh: MeshBuilder<ShardMessage, glommio::channels::channel_mesh::Full>,
    ready: mpsc::Sender<Result<usize, String>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
) -> Result<(), String> {
    let started = start_shard(config, mesh).await;
    let (shard, receivers, listeners) = match started {
        Ok(parts) => parts,
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    let mesh_task = glommio::spawn_local(mesh::serve_mesh(Rc::clone(&shard), receivers));
    let maintenance = glommio::spawn_local(Rc::clone(&shard).run_maintenance());
    let counts = server::ConnectionCounts::new(connections);
    let sweeper = glommio::spawn_local(Rc::clone(&shard).run_subscription_sweeper());
    let accepts: Vec<_> = listeners
        .into_iter()
        .map(|l| glommio::spawn_local(server::accept_loop(Rc::clone(&shard), l, counts.clone())))
        .collect();
    let metrics_endpoint = match (shard.id, shard.config.metrics_listen) {
        (0, Some(addr)) => match glommio::net::TcpListener::bind(addr) {
            Ok(listener) => Some(glommio::spawn_local(http::serve_metrics(
                Rc::clone(&shard),
                listener,
            ))),
            Err(e) => {
                let why = format!("binding the metrics endpoint {addr}: {e}");
                let _ = ready.send(Err(why.clone()));
                return Err(why);
            }
        },
        _ => None,
    };
    let _ = ready.send(Ok(shard.id));
    while !SHUTDOWN.load(Ordering::SeqCst) {
        glommio::timer::sleep(SHUTDOWN_POLL).await;
    }
    drop(accepts); // stop accepting
    drop(metrics_endpoint);
    drop(maintenance);
    drop(sweeper);
    shard.close_logs().await;
    let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
    while shard.requests_in_flight() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    drop(mesh_task);
    Ok(())
}

async fn start_shard(
    config: Arc<BrokerConfig>,
    mesh: MeshBuilder<ShardMessage, glommio::channels::channel_mesh::Full>,
) -> Result<
    (
        Rc<Shard>,
        glommio::channels::channel_mesh::Receivers<ShardMessage>,
        Vec<glommio::net::TcpListener>,
    ),
    String,
> {
    let (senders, receivers) = mesh
        .join()
        .await
        .map_err(|e| format!("joining the shard mesh failed: {e}"))?;
    superblock::verify(&config.data_dir)
        .await
        .map_err(|e| format!("data dir self-test failed: {e}"))?;
    let shard = Shard::start(config, senders).await?;
    let listeners = server::bind(&shard)?;
    Ok((shard, receivers, listeners))
}
