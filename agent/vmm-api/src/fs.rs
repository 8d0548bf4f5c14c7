//! Small-file replacement shared by the agent's records and the lease file.

use std::path::Path;

/// Writes `data` to `path` through a temporary file in the same directory, fsynced, then
/// renamed over `path`: a reader sees the old or the new contents, never a mix.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // A full disk must not also be left with the half-written copy.
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| format!("cannot write {}: {e}", path.display()))
}
