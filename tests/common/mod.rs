//! Test harness: the real `corebus` binary on real ports with a real data directory.
//!
//! Every wait has a deadline and polls a condition; nothing sleeps and hopes.

#![allow(dead_code)]

pub mod log;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The broker binary under test.
pub const COREBUS: &str = env!("CARGO_BIN_EXE_corebus");

/// How long a broker may take to start.
const START_DEADLINE: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh directory on the real disk (not tmpfs: O_DIRECT needs a real filesystem).
pub fn fresh_dir(name: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// A port `p` such that `p..=p+span` can all be bound right now. Ports come from below the
/// kernel's ephemeral range, so that a client retrying a connection to a stopped broker can
/// never connect to itself on the broker's port (a TCP self-connect would hold the port).
fn free_port_span(span: u16) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()) as u64
        + u64::from(std::process::id()) * 7919;
    for attempt in 0..500u64 {
        let p = 20_000 + ((seed + attempt * 104_729) % 12_000) as u16;
        let all_free = (0..=span).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok());
        if all_free {
            return p;
        }
    }
    panic!("no free port span found");
}

/// Polls `cond` until it holds or `deadline` passes.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running broker process.
pub struct Broker {
    child: Option<Child>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Public port; shard i is on port + 1 + i.
    pub port: u16,
    /// Number of shards.
    pub shards: u16,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    starts: u32,
    owns_data_dir: bool,
}

impl Broker {
    /// Starts a broker with `shards` shards on a fresh data directory.
    pub fn start(name: &str, shards: u16, extra: &[&str]) -> Self {
        Self::start_with(name, shards, extra, &[], None)
    }

    /// Starts a broker with extra environment variables, on `data_dir` if given (kept after
    /// the test) or on a fresh directory.
    pub fn start_with(
        name: &str,
        shards: u16,
        extra: &[&str],
        env: &[(&str, &str)],
        data_dir: Option<PathBuf>,
    ) -> Self {
        let owns_data_dir = data_dir.is_none();
        let data_dir = data_dir.unwrap_or_else(|| fresh_dir(name));
        let log = fresh_dir(&format!("{name}-log")).join("broker.log");
        let mut broker = Self {
            child: None,
            log,
            data_dir,
            port: 0,
            shards,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            starts: 0,
            owns_data_dir,
        };
        broker.launch_on_free_port();
        broker
    }

    /// Changes the environment used by the next restart.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    fn launch_on_free_port(&mut self) {
        for _ in 0..5 {
            self.port = free_port_span(self.shards + 1);
            if self.launch() {
                return;
            }
        }
        panic!("broker did not start: {}", self.log_text());
    }

    /// Starts the process; true once it printed its ready line, false if it exited.
    fn launch(&mut self) -> bool {
        self.starts += 1;
        let log = std::fs::File::create(&self.log).expect("log file");
        let child = Command::new(COREBUS)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--shards")
            .arg(self.shards.to_string())
            .arg("--io-memory")
            .arg("16MiB")
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn corebus serve");
        self.child = Some(child);
        let end = Instant::now() + START_DEADLINE;
        loop {
            if self.log_text().contains("corebus ready") {
                return true;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            assert!(
                Instant::now() < end,
                "broker did not become ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the broker wrote to stderr since its last start.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `127.0.0.1:port` of the public port.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:port` of shard `i`'s own port.
    pub fn shard_addr(&self, i: u16) -> String {
        format!("127.0.0.1:{}", self.port + 1 + i)
    }

    /// SIGKILLs the broker and waits for it to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the broker and waits (with a deadline) for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("broker running");
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "broker did not exit after SIGTERM: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the broker again on the same data directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the broker first");
        let end = Instant::now() + Duration::from_secs(20);
        while !self.launch() {
            assert!(
                Instant::now() < end,
                "broker did not restart: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The broker's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs the CLI against this broker's public port.
    pub fn cli(&self, args: &[&str], stdin: &str) -> Output {
        cli_at(&self.addr(), args, stdin)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
        if self.owns_data_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs `corebus ARGS` with `COREBUS_ADDR=addr`, feeding `stdin`.
pub fn cli_at(addr: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(COREBUS)
        .args(args)
        .env("COREBUS_ADDR", addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn corebus cli");
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.to_string();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().expect("cli output");
    let _ = feeder.join();
    out
}

/// Asserts the command succeeded and returns its stdout.
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends one raw frame payload (length prefix added) and reads one reply frame (prefix
/// included), or `None` if the broker closed the connection.
pub fn raw_round_trip(stream: &mut TcpStream, payload: &[u8]) -> Option<Vec<u8>> {
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(payload);
    stream.write_all(&frame).ok()?;
    read_frame(stream)
}

/// Reads one whole frame (prefix included), `None` at end of stream.
pub fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let n = u32::from_le_bytes(len) as usize;
    let mut frame = len.to_vec();
    frame.resize(4 + n, 0);
    stream.read_exact(&mut frame[4..]).ok()?;
    Some(frame)
}

/// One consumed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumed {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Value.
    pub value: String,
}

/// Parses `consume --format json` output.
pub fn parse_consumed(stdout: &str) -> Vec<Consumed> {
    stdout
        .lines()
        .map(|row| {
            let v: serde_json::Value = serde_json::from_str(row).expect("json line");
            Consumed {
                partition: v["partition"].as_u64().expect("partition") as u32,
                offset: v["offset"].as_u64().expect("offset"),
                value: v["value"].as_str().expect("value").to_string(),
            }
        })
        .collect()
}

/// Parses `publish --print-acks` output into (line, partition, offset).
pub fn parse_acks(stdout: &str) -> Vec<(usize, u32, u64)> {
    stdout
        .lines()
        .filter_map(|row| {
            let mut parts = row.split_whitespace();
            Some((
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Runs a shell command as part of a test's setup, failing the test with its output.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes from a hex string (whitespace ignored).
pub fn hex(text: &str) -> Vec<u8> {
    let digits: String = text.split_whitespace().collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digits"))
        .collect()
}
