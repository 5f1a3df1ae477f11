//! The data directory's superblock: a small checksummed file that says "this is a corebus
//! data directory, format N".
//!
//! It also works around a glommio 0.9 bug: glommio probes a device on the first DmaFile it
//! opens there, and if that file is empty every later DMA read on the device fails with
//! EOPNOTSUPP (os error 95). Each shard therefore opens and reads back the (never empty)
//! superblock before any other DmaFile, which doubles as a direct-I/O self-test.

use std::path::Path;

use glommio::io::DmaFile;

use super::StorageError;

/// File name of the superblock inside the data directory.
pub const FILE_NAME: &str = "corebus.superblock";
const MAGIC: &[u8; 8] = b"COREBUS\0";
const FORMAT_VERSION: u32 = 1;
const SIZE: usize = 4096;

fn encode() -> Vec<u8> {
    let mut block = vec![0u8; SIZE];
    block[..8].copy_from_slice(MAGIC);
    block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&block[..SIZE - 4]);
    block[SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    block
}

fn check(block: &[u8], path: &Path) -> Result<(), StorageError> {
    let corrupt =
        |what: &str| StorageError::Corrupt(format!("superblock {}: {what}", path.display()));
    if block.len() < SIZE {
        return Err(corrupt("shorter than 4096 bytes"));
    }
    if &block[..8] != MAGIC {
        return Err(corrupt("not a corebus data directory (bad magic)"));
    }
    let stored = u32::from_le_bytes([
        block[SIZE - 4],
        block[SIZE - 3],
        block[SIZE - 2],
        block[SIZE - 1],
    ]);
    if crc32c::crc32c(&block[..SIZE - 4]) != stored {
        return Err(corrupt("checksum mismatch"));
    }
    let version = u32::from_le_bytes([block[8], block[9], block[10], block[11]]);
    if version != FORMAT_VERSION {
        return Err(corrupt(&format!(
            "format version {version}, this broker reads {FORMAT_VERSION}"
        )));
    }
    Ok(())
}

/// Creates the data directory and its superblock if they do not exist (plain blocking I/O:
/// runs once, before the shards start), making both durable.
pub fn ensure(data_dir: &Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| StorageError::io(format!("creating {}", data_dir.display()), &e))?;
    let path = data_dir.join(FILE_NAME);
    if path.exists() {
        return Ok(());
    }
    super::atomic_file::replace(&path, &encode())
        .map_err(|e| StorageError::io(format!("writing {}", path.display()), &e))
}

/// Opens the superblock with direct I/O and checks it. Call on every shard before opening
/// any other DmaFile.
pub async fn verify(data_dir: &Path) -> Result<(), StorageError> {
    let path = data_dir.join(FILE_NAME);
    let file = DmaFile::open(&path).await.map_err(|e| {
        StorageError::glommio(format!("opening {} with O_DIRECT", path.display()), e)
    })?;
    let block = file
        .read_at_aligned(0, SIZE)
        .await
        .map_err(|e| StorageError::glommio(format!("direct read of {}", path.display()), e))?;
    let result = check(&block, &path);
    let _ = file.close().await;
    result
}
