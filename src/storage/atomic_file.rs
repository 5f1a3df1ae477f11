//! Replacing a small file atomically and durably, the one way every metadata file of the
//! broker is written (partition checkpoints, state logs when compacted, the superblock, the
//! catalog): the new bytes go to `NAME.tmp`, which is fsynced and renamed over `NAME`, and
//! then the directory is fsynced. A crash at any point leaves the old file or the new one,
//! never a mix; once this returns, the new one survives a power cut. Blocking I/O: call it
//! from glommio's blocking pool, or before the shards start.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::disk_trace::{self, Op, WriteData};

/// The temporary file a replacement of `path` writes first.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` (see the module docs).
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let mut file = std::fs::File::create(&tmp)?;
    let fd = file.as_raw_fd();
    disk_trace::instant(|| Op::Open {
        fd,
        path: disk_trace::path_string(&tmp),
        create: true,
        truncate: true,
    });
    disk_trace::traced(
        || Op::Write {
            fd,
            offset: 0,
            direct: false,
            data: WriteData::of(bytes),
        },
        || file.write_all(bytes),
    )?;
    disk_trace::traced(|| Op::Sync { fd }, || file.sync_all())?;
    drop(file);
    disk_trace::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// `fsync` of a directory: makes the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    disk_trace::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("atomic-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("catalog.json");
        replace(&path, b"first, longer contents").expect("first");
        replace(&path, b"second").expect("second");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        assert!(!temp_path(&path).exists());
        assert_eq!(temp_path(&path), dir.join("catalog.json.tmp"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
