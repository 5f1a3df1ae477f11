//! Checks of the machine a broker runs on: kernel and io_uring, locked-memory limit, the data
//! directory's filesystem and direct I/O, CPUs, and quick disk probes. `corebus doctor` runs
//! them all and explains each; `corebus serve` runs the fatal ones and refuses to start on a
//! failure, with the same message.
//!
//! Plain blocking I/O: these run before any executor starts.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

/// Locked memory glommio needs per shard for its rings (measured: an executor fails to start
/// below about 512 KiB on Linux 6.x).
pub const MEMLOCK_PER_SHARD_BYTES: u64 = 512 * 1024;

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Pass,
    /// Works, but not as well as it could.
    Warn,
    /// The broker cannot run (safely) like this.
    Fail,
}

/// One check's result, with what to do about it.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when there is nothing to do).
    pub fix: String,
}

impl Check {
    fn new(
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            status,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    /// One line for humans, plus the fix on the next line if there is one.
    pub fn render(&self) -> String {
        let tag = match self.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let mut line = format!("{tag}  {:<16} {}", self.name, self.detail);
        if !self.fix.is_empty() {
            line.push_str(&format!("\n      fix: {}", self.fix));
        }
        line
    }
}

/// The kernel release, e.g. (6, 18).
fn kernel_version() -> Option<(u32, u32, String)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim().to_string();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, release))
}

/// Kernel recent enough for glommio's io_uring use (5.8+).
pub fn kernel() -> Check {
    match kernel_version() {
        Some((major, minor, release)) if (major, minor) >= (5, 8) => Check::new(
            "kernel",
            Status::Pass,
            format!("Linux {release} (io_uring needs 5.8+)"),
            "",
        ),
        Some((_, _, release)) => Check::new(
            "kernel",
            Status::Fail,
            format!("Linux {release} is older than 5.8"),
            "run corebus on Linux 5.8 or newer",
        ),
        None => Check::new(
            "kernel",
            Status::Warn,
            "could not read the kernel version",
            "",
        ),
    }
}

/// io_uring can be set up (not missing, not disabled, not blocked by seccomp).
pub fn io_uring() -> Check {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: io_uring_setup(entries, params) writes into the 120-byte params struct we own.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: closing the ring descriptor we just created.
        unsafe { libc::close(fd as i32) };
        return Check::new("io_uring", Status::Pass, "available", "");
    }
    let err = std::io::Error::last_os_error();
    let (detail, fix) = match err.raw_os_error() {
        Some(libc::ENOSYS) => (
            "not in this kernel (ENOSYS)".to_string(),
            "use a kernel built with CONFIG_IO_URING".to_string(),
        ),
        Some(libc::EPERM) if disabled > 0 => (
            format!("disabled by sysctl kernel.io_uring_disabled={disabled}"),
            "sysctl -w kernel.io_uring_disabled=0".to_string(),
        ),
        Some(libc::EPERM) => (
            "blocked (EPERM): a container's seccomp profile forbids io_uring".to_string(),
            "run the container with a seccomp profile that allows io_uring_setup/enter/register"
                .to_string(),
        ),
        _ => (format!("io_uring_setup failed: {err}"), String::new()),
    };
    Check::new("io_uring", Status::Fail, detail, fix)
}

/// RLIMIT_MEMLOCK covers glommio's rings, and (better) its DMA pool.
pub fn memlock(shards: usize, io_memory_bytes: usize) -> Check {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Check::new("memlock", Status::Warn, "could not read RLIMIT_MEMLOCK", "");
    }
    if limit.rlim_cur == libc::RLIM_INFINITY {
        return Check::new("memlock", Status::Pass, "unlimited", "");
    }
    let have = limit.rlim_cur;
    let need = MEMLOCK_PER_SHARD_BYTES * shards as u64;
    let pool = io_memory_bytes as u64 * shards as u64;
    if have < need {
        return Check::new(
            "memlock",
            Status::Fail,
            format!(
                "RLIMIT_MEMLOCK is {} KiB; {shards} shard(s) need at least {} KiB for their io_uring rings",
                have >> 10,
                need >> 10
            ),
            "raise it: `ulimit -l unlimited`, LimitMEMLOCK=infinity in the systemd unit, or /etc/security/limits.conf",
        );
    }
    if have < pool {
        return Check::new(
            "memlock",
            Status::Warn,
            format!(
                "RLIMIT_MEMLOCK is {} KiB: the {} MiB DMA pools work but are not registered with io_uring",
                have >> 10,
                pool >> 20
            ),
            "raise LimitMEMLOCK to at least the pool size for registered buffers",
        );
    }
    Check::new("memlock", Status::Pass, format!("{} KiB", have >> 10), "")
}

/// Filesystem type names for the magic numbers we recognize.
fn filesystem_name(magic: i64) -> &'static str {
    match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x2FC1_2FC1 => "zfs",
        0x6969 => "nfs",
        0x794c_7630 => "overlayfs",
        _ => "unknown",
    }
}

/// The data directory is on a durable filesystem that supports O_DIRECT and fdatasync: a
/// block is written, synced and read back.
pub fn data_dir(dir: &Path) -> Check {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return Check::new(
            "data dir",
            Status::Fail,
            format!("cannot create {}: {e}", dir.display()),
            "choose a writable directory with --data-dir",
        );
    }
    let Ok(cpath) = CString::new(dir.as_os_str().as_bytes()) else {
        return Check::new("data dir", Status::Fail, "path holds a NUL byte", "");
    };
    // SAFETY: statfs fills the struct we pass for a NUL-terminated path.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let fs_type = if unsafe { libc::statfs(cpath.as_ptr(), &mut fs) } == 0 {
        filesystem_name(fs.f_type as i64)
    } else {
        "unknown"
    };
    if matches!(fs_type, "tmpfs" | "ramfs") {
        return Check::new(
            "data dir",
            Status::Fail,
            format!(
                "{} is on {fs_type}: memory, not a disk; nothing would survive a reboot",
                dir.display()
            ),
            "put --data-dir on xfs or ext4 on a real disk",
        );
    }
    match direct_io_round_trip(dir) {
        Ok(()) => Check::new(
            "data dir",
            Status::Pass,
            format!(
                "{} on {fs_type}: O_DIRECT write, fdatasync and read back work",
                dir.display()
            ),
            "",
        ),
        Err(e) => Check::new(
            "data dir",
            Status::Fail,
            format!("{} on {fs_type}: direct I/O fails: {e}", dir.display()),
            "put --data-dir on a filesystem with O_DIRECT support (xfs, ext4)",
        ),
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> std::io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len, 4096)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(std::io::Error::other("out of memory"));
        }
        Ok(Self { ptr, len })
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = std::alloc::Layout::from_size_align(self.len, 4096) {
            // SAFETY: allocated with this layout in `new`.
            unsafe { std::alloc::dealloc(self.ptr, layout) };
        }
    }
}

fn open_direct(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

fn direct_io_round_trip(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(".corebus-doctor-probe");
    let result = (|| {
        let file = open_direct(&path)?;
        let mut buf = AlignedBuf::new(4096)?;
        for (i, b) in buf.as_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        file.write_all_at(buf.as_mut(), 0)?;
        file.sync_data()?;
        let mut back = AlignedBuf::new(4096)?;
        file.read_exact_at(back.as_mut(), 0)?;
        if back.as_mut() != buf.as_mut() {
            return Err(std::io::Error::other("read back different bytes"));
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Shards against CPUs.
pub fn cpus(shards: usize) -> Check {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if shards > cpus {
        Check::new(
            "cpus",
            Status::Warn,
            format!("{shards} shards on {cpus} CPUs: shards share cores and are not pinned"),
            format!("use --shards {cpus} or fewer"),
        )
    } else {
        Check::new(
            "cpus",
            Status::Pass,
            format!("{shards} shard(s) on {cpus} CPU(s)"),
            "",
        )
    }
}

/// Direct-I/O sequential write bandwidth with a sync per 1 MiB write (as fio's
/// `--direct=1 --bs=1M --fdatasync=1`), and the latency of 4 KiB write + fdatasync.
pub fn disk_probe(dir: &Path) -> Check {
    match probe(dir) {
        Ok((mb_per_sec, p50_us, p99_us)) => Check::new(
            "disk probe",
            Status::Pass,
            format!(
                "O_DIRECT 1 MiB writes + fdatasync: {mb_per_sec:.0} MB/s; 4 KiB write + fdatasync: p50 {p50_us} us, p99 {p99_us} us"
            ),
            "",
        ),
        Err(e) => Check::new("disk probe", Status::Warn, format!("probe failed: {e}"), ""),
    }
}

fn probe(dir: &Path) -> std::io::Result<(f64, u64, u64)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(".corebus-doctor-bandwidth");
    let result = (|| {
        let file = open_direct(&path)?;
        let mut buf = AlignedBuf::new(1 << 20)?;
        buf.as_mut().fill(0x5a);
        let writes = 64u64;
        let started = Instant::now();
        for i in 0..writes {
            file.write_all_at(buf.as_mut(), i << 20)?;
            file.sync_data()?;
        }
        let mb_per_sec = (writes << 20) as f64 / 1e6 / started.elapsed().as_secs_f64();
        let mut small = AlignedBuf::new(4096)?;
        small.as_mut().fill(0xa5);
        let mut samples = Vec::with_capacity(200);
        for i in 0..200u64 {
            let t = Instant::now();
            file.write_all_at(small.as_mut(), (i % 64) << 12)?;
            file.sync_data()?;
            samples.push(t.elapsed().as_micros() as u64);
        }
        samples.sort_unstable();
        Ok((mb_per_sec, samples[100], samples[198]))
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// The checks whose failure stops `serve`.
pub fn fatal_checks(data: &Path, shards: usize, io_memory_bytes: usize) -> Vec<Check> {
    vec![
        kernel(),
        io_uring(),
        memlock(shards, io_memory_bytes),
        data_dir(data),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_low_memlock_limit_fails_with_the_numbers() {
        let check = memlock(1_000_000, 1);
        if check.detail != "unlimited" {
            assert_eq!(check.status, Status::Fail);
            assert!(check.detail.contains("need at least"), "{}", check.detail);
        }
    }

    #[test]
    fn the_build_dir_supports_direct_io() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let check = data_dir(&dir);
        assert_eq!(check.status, Status::Pass, "{}", check.render());
    }
}
