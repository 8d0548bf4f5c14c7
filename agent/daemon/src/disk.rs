//! A VM's private disks: copies of cached images, made copy-on-write where the filesystem can
//! (reflink, `FICLONE`), otherwise as sparse copies that skip the image's holes; and new
//! zero-filled sparse disks.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::copy_file_range;
use nix::unistd::{lseek, Whence};

/// Copies `src` to a new file `dst` (which must not exist), sharing blocks if possible.
pub fn copy_image(src: &Path, dst: &Path) -> Result<(), String> {
    let tmp = dst.with_extension("partial");
    let result = (|| {
        let from = File::open(src).map_err(|e| format!("cannot open {}: {e}", src.display()))?;
        let to = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        crate::testhook::kill_point("during-copy");
        // SAFETY: FICLONE takes the source fd by value and touches no memory of ours; both
        // descriptors are open files that outlive the call.
        let cloned = unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd()) }.is_ok();
        if !cloned {
            sparse_copy(&from, &to)
                .map_err(|e| format!("cannot copy {} to {}: {e}", src.display(), tmp.display()))?;
        }
        to.sync_all()
            .map_err(|e| format!("cannot sync {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, dst).map_err(|e| format!("cannot rename to {}: {e}", dst.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// FICLONE's argument is the source descriptor itself, not a pointer.
nix::ioctl_write_int_bad!(ficlone, libc::FICLONE);

/// Copies the data extents of `from` into `to` with copy_file_range, leaving holes as holes.
fn sparse_copy(from: &File, to: &File) -> std::io::Result<()> {
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut offset: i64 = 0;
    let end = len as i64;
    while offset < end {
        let data = match lseek(from, offset, Whence::SeekData) {
            Ok(data) => data,
            Err(Errno::ENXIO) => break, // only a hole is left
            Err(errno) => return Err(errno.into()),
        };
        let hole = lseek(from, data, Whence::SeekHole).map_or(end, |hole| hole.min(end));
        let mut src_off = data;
        let mut dst_off = data;
        while src_off < hole {
            let chunk = (hole - src_off) as usize;
            let n = copy_file_range(from, Some(&mut src_off), to, Some(&mut dst_off), chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "source shrank during the copy",
                ));
            }
        }
        offset = hole;
    }
    Ok(())
}

/// Creates a zero-filled sparse disk of `size_mib` at `path` (kept if it already exists).
pub fn create_sparse(path: &Path, size_mib: u64) -> Result<(), String> {
    if path.exists() {
        return Ok(());
    }
    let size = size_mib
        .checked_mul(1024 * 1024)
        .ok_or_else(|| format!("disk size {size_mib} MiB is too large"))?;
    let file = File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.set_len(size)
        .map_err(|e| format!("cannot size {} to {size_mib} MiB: {e}", path.display()))
}

/// The space files under `dir` take on disk (allocated blocks, so a sparse file counts what
/// it holds), bytes, looking `depth` directory levels down; what cannot be read counts 0.
/// Symbolic links are not followed.
pub fn allocated_bytes(dir: &Path, depth: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0u64;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if depth > 0 {
                total = total.saturating_add(allocated_bytes(&entry.path(), depth - 1));
            }
        } else {
            total = total.saturating_add(meta.blocks().saturating_mul(512));
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_keep_contents_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[0xab; 8192]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let dst = dir.path().join("dst.img");
        copy_image(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // 64 MiB apparent, a few blocks allocated (or shared).
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 4 << 20);
        assert!(
            copy_image(&dir.path().join("missing"), &dir.path().join("x"))
                .unwrap_err()
                .contains("missing")
        );
        create_sparse(&dir.path().join("new.img"), 10).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("new.img")).unwrap().len(),
            10 << 20
        );
    }
}
