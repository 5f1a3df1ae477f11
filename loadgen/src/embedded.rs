//! An embedded broker: `corebus::broker::run` on its own thread (its shards pinned to
//! `--broker-cpu`), on a fresh data directory on a real disk and free ports, stopped and
//! removed after the run.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use corebus::broker::preflight::{self, Status};
use corebus::broker::{self, BrokerConfig};

use crate::args::Args;

/// A running embedded broker.
pub struct Embedded {
    /// Its public address.
    pub addr: String,
    data_dir: PathBuf,
    remove_data_dir: bool,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// A port `p` with `p` and `p + 1` free, below the ephemeral range.
fn free_ports() -> Result<u16, String> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()) as u64
        + u64::from(std::process::id());
    (0..500u64)
        .map(|i| 20_000 + ((seed + i * 7919) % 12_000) as u16)
        .find(|&p| (0..=1).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()))
        .ok_or_else(|| "no free port for the embedded broker".to_string())
}

/// A fresh directory on a real disk: $TMPDIR unless it is tmpfs, else the current directory.
fn default_data_dir() -> PathBuf {
    let name = format!("corebus-loadgen-{}", std::process::id());
    let tmp = std::env::temp_dir();
    if preflight::data_dir(&tmp).status == Status::Pass {
        tmp.join(name)
    } else {
        PathBuf::from(name)
    }
}

impl Embedded {
    /// Starts the broker and waits until it accepts connections.
    pub fn start(args: &Args) -> Result<Self, String> {
        let port = free_ports()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (data_dir, remove_data_dir) = match &args.data_dir {
            Some(dir) => (dir.clone(), false),
            None => (default_data_dir(), true),
        };
        let mut config = BrokerConfig::new(data_dir.clone(), addr);
        config.shards = 1;
        config.cpus = args.broker_cpu.map(|cpu| vec![cpu]);
        config.durability = args.durability;
        if let Some(group_commit) = args.broker_group_commit {
            config.group_commit = group_commit;
        }
        if let Some(bytes) = args.broker_cache_bytes {
            config.cache_bytes_per_partition = bytes as usize;
            config.cache_bytes_per_shard = bytes as usize;
        }
        let thread = std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || broker::run(config))
            .map_err(|e| format!("starting the embedded broker: {e}"))?;
        let mut embedded = Self {
            addr: addr.to_string(),
            data_dir,
            remove_data_dir,
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(addr).is_ok() && TcpStream::connect((addr.ip(), port + 1)).is_ok()
            {
                return Ok(embedded);
            }
            if embedded
                .thread
                .as_ref()
                .is_some_and(JoinHandle::is_finished)
            {
                return Err(embedded
                    .stop()
                    .err()
                    .unwrap_or_else(|| "the embedded broker stopped".into()));
            }
            if Instant::now() > deadline {
                let _ = embedded.stop();
                return Err("the embedded broker did not start within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where its data lives.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Stops the broker (as SIGTERM would) and removes its data directory.
    pub fn stop(&mut self) -> Result<(), String> {
        broker::request_shutdown();
        let result = match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the embedded broker panicked".to_string())?,
            None => Ok(()),
        };
        if self.remove_data_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        result
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}
