//! The host's content-addressed image cache: `<data_dir>/images/<sha256>`, filled from the
//! controller's Images service and verified before use. A file in the cache is complete and
//! verified by construction: downloads go to a temporary name and are renamed only after the
//! digest matched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fabric_proto::v1::images_client::ImagesClient;
use fabric_proto::v1::pull_image_response::Part;
use fabric_proto::v1::PullImageRequest;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Marks a cached file as just used (its modification time), for [`trim`].
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Removes the least recently used cached files (by modification time) until the cache holds
/// at most `budget` bytes; a file used less than `min_age` ago stays whatever the size (it
/// may be about to be opened). Downloads in progress (dot files) are not counted. Returns
/// what it removed.
pub fn trim(dir: &Path, budget: u64, min_age: Duration) -> Vec<String> {
    let now = std::time::SystemTime::now();
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter_map(|e| {
                    let meta = e.metadata().ok().filter(|m| m.is_file())?;
                    Some((meta.modified().ok()?, meta.len(), e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    files.sort();
    let mut evicted = Vec::new();
    for (modified, len, path) in files {
        if total <= budget {
            break;
        }
        if now.duration_since(modified).unwrap_or_default() < min_age {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total = total.saturating_sub(len);
            evicted.push(
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
    }
    evicted
}

/// Checks that `digest` is a sha256 as fabric.v1 writes them: 64 lowercase hex characters.
pub fn check_sha256(digest: &str) -> Result<(), String> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(format!(
            "{digest:?} is not a sha256 (64 lowercase hex characters)"
        ))
    }
}

/// The cache.
pub struct ImageCache {
    dir: PathBuf,
    channel: crate::connect::ControllerChannel,
    /// One download at a time per digest.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// What the cache is trimmed to after a download, bytes.
    budget_bytes: u64,
}

/// A cached file used this recently is never evicted: a VM start may be about to open it.
pub const EVICT_AFTER: Duration = Duration::from_secs(120);

impl ImageCache {
    /// The cache in `dir`, trimmed to `budget_mib`; downloads a crash cut short are removed.
    pub fn new(
        dir: PathBuf,
        channel: crate::connect::ControllerChannel,
        budget_mib: u64,
    ) -> ImageCache {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".partial-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        ImageCache {
            dir,
            channel,
            locks: Mutex::new(HashMap::new()),
            budget_bytes: budget_mib.saturating_mul(1 << 20),
        }
    }

    pub fn path_of(&self, digest: &str) -> PathBuf {
        self.dir.join(digest)
    }

    /// The cached file with this digest, downloaded first if needed.
    pub async fn ensure(&self, digest: &str) -> Result<PathBuf, String> {
        check_sha256(digest)?;
        let path = self.path_of(digest);
        if path.is_file() {
            touch(&path);
            return Ok(path);
        }
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(digest.to_string()).or_default().clone()
        };
        let _held = lock.lock().await;
        if path.is_file() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let partial = self.dir.join(format!(".partial-{digest}"));
        let result = self.download(digest, &partial).await;
        match result {
            Ok(()) => {
                std::fs::rename(&partial, &path)
                    .map_err(|e| format!("cannot store image {digest}: {e}"))?;
                let evicted = trim(&self.dir, self.budget_bytes, EVICT_AFTER);
                if !evicted.is_empty() {
                    tracing::info!(evicted = ?evicted, budget_mib = self.budget_bytes >> 20, "image cache trimmed");
                }
                Ok(path)
            }
            Err(err) => {
                let _ = std::fs::remove_file(&partial);
                Err(err)
            }
        }
    }

    async fn download(&self, digest: &str, partial: &Path) -> Result<(), String> {
        let short = &digest[..12];
        let mut client = ImagesClient::new(self.channel.current());
        let response = client
            .pull_image(PullImageRequest {
                sha256: digest.to_string(),
                offset: 0,
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => {
                    format!("image sha256 {digest} not found on the controller")
                }
                _ => format!("cannot pull image {short}: {}", status.message()),
            })?;
        let mut stream = response.into_inner();
        let header = match stream.message().await {
            Ok(Some(fabric_proto::v1::PullImageResponse {
                part: Some(Part::Header(header)),
            })) => header,
            Ok(_) => {
                return Err(format!(
                    "pull of image {short}: the stream did not start with a header"
                ))
            }
            Err(status) => return Err(format!("pull of image {short}: {}", status.message())),
        };
        if header.sha256 != digest || header.offset != 0 {
            return Err(format!(
                "pull of image {short}: the controller sent {} at offset {} instead",
                header.sha256, header.offset
            ));
        }
        // The host offers VMs its disk less this budget: a file larger than the whole budget
        // would take space VMs were promised.
        if header.size_bytes > self.budget_bytes {
            return Err(format!(
                "image {short} is {} MiB, more than this host's image cache (image_cache_mib = {})",
                header.size_bytes.div_ceil(1 << 20),
                self.budget_bytes >> 20
            ));
        }
        let mut file = tokio::fs::File::create(partial)
            .await
            .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        loop {
            let message = stream
                .message()
                .await
                .map_err(|status| format!("pull of image {short}: {}", status.message()))?;
            let Some(message) = message else { break };
            let Some(Part::Data(data)) = message.part else {
                return Err(format!(
                    "pull of image {short}: a second header in the stream"
                ));
            };
            received += data.len() as u64;
            if received > header.size_bytes {
                return Err(format!(
                    "pull of image {short}: more than the announced {} bytes",
                    header.size_bytes
                ));
            }
            hasher.update(&data);
            file.write_all(&data)
                .await
                .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
            crate::testhook::kill_point("during-pull");
        }
        if received != header.size_bytes {
            return Err(format!(
                "pull of image {short}: {received} bytes received, {} announced",
                header.size_bytes
            ));
        }
        let got = hex::encode(hasher.finalize());
        if got != digest {
            return Err(format!(
                "image sha256 mismatch: asked for {digest}, received data with sha256 {got}"
            ));
        }
        file.sync_all()
            .await
            .map_err(|e| format!("cannot sync {}: {e}", partial.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_trimmed_least_recently_used_first_and_never_what_was_just_used() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        for (name, age_s) in [
            ("old", 3600),
            ("older", 7200),
            ("recent", 10),
            ("newer", 1800),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; 1000]).unwrap();
            let file = std::fs::File::options().append(true).open(&path).unwrap();
            file.set_modified(now - Duration::from_secs(age_s)).unwrap();
        }
        std::fs::write(dir.path().join(".partial-x"), vec![0u8; 5000]).unwrap();
        // 4,000 bytes cached, 2,000 allowed: the two oldest go.
        let mut evicted = trim(dir.path(), 2000, Duration::from_secs(60));
        evicted.sort();
        assert_eq!(evicted, ["old", "older"]);
        // Below the budget only by evicting a file used 10 s ago: it stays.
        assert_eq!(trim(dir.path(), 0, Duration::from_secs(60)), ["newer"]);
        assert!(dir.path().join("recent").exists() && dir.path().join(".partial-x").exists());
    }

    #[test]
    fn digests_are_checked() {
        check_sha256(&"a".repeat(64)).unwrap();
        for bad in [
            "",
            "A".repeat(64).as_str(),
            &"a".repeat(63),
            &"g".repeat(64),
            "../../etc/passwd",
        ] {
            assert!(check_sha256(bad).is_err(), "{bad}");
        }
    }
}
