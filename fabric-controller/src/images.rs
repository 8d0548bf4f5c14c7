//! The Images service: files stored by content under `<data_dir>/images/blobs/<sha256>`,
//! named images (one file per role) in the store under `images/<name>`.
//!
//! Every bound user lists and pulls every image (a VM of any project may boot any image).
//! Pushing is owned: an image belongs to the project named at its first push, or to no
//! project (cluster-wide) when a cluster-wide operator pushed it without one, as every
//! image stored before images had owners does. A push to an existing image needs an
//! operator of its project or a cluster-wide operator ([`push_owner`]), checked again in
//! the transaction that points the name at the new file, so that no one replaces the
//! kernel another project's VMs boot.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fabric_proto::v1::images_server::Images;
use fabric_proto::v1::pull_image_response::Part as PullPart;
use fabric_proto::v1::push_image_request::Part as PushPart;
use fabric_proto::v1::{
    BootImage, DeleteImageRequest, DeleteImageResponse, Image, ImageFile, ImageFileRole,
    ListImagesRequest, ListImagesResponse, PullImageHeader, PullImageRequest, PullImageResponse,
    PushImageRequest, PushImageResponse,
};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::authz::Grants;
use crate::controller::unavailable;
use crate::store::{Compare, Store, Txn, TxnOutcome};
use crate::validate::{check_image_name, check_sha256};
use fabric_proto::v1::Role;

/// Largest chunk in a stream, both ways.
const CHUNK: usize = 1 << 20;
/// Largest file accepted.
const MAX_FILE: u64 = 64 << 30;
/// Pushes received at once; more are refused (RESOURCE_EXHAUSTED) rather than queued.
pub const MAX_CONCURRENT_PUSHES: usize = 8;
/// How long a push may go without a message before it is dropped.
pub const PUSH_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefix of a push's file while it is received.
const PARTIAL_PREFIX: &str = ".push-";

pub struct ImageStore {
    blobs: PathBuf,
    store: Arc<dyn Store>,
    pushes: Arc<tokio::sync::Semaphore>,
    /// Bytes the stored blobs take plus those reserved by pushes in progress, and the quota.
    used: std::sync::Mutex<u64>,
    quota: u64,
    /// Held for writing while files are collected; for reading while a file is stored and
    /// attached to its image, and while CreateVm resolves an image and commits the VM, so
    /// that no file is collected between being stored (or resolved) and being referred to.
    pub collecting: tokio::sync::RwLock<()>,
    /// Where pushes and deletions are audited (set by the server at start; tests without
    /// it audit nothing).
    audit: std::sync::OnceLock<Arc<crate::controller::Controller>>,
}

/// Bytes reserved for a push in progress, given back when it ends unless stored.
struct Reservation<'a> {
    store: &'a ImageStore,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut used = self.store.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(self.bytes);
    }
}

/// A push's partial file, removed when the push ends without being stored, also when the
/// client goes away mid-stream (the handler's future is then dropped, not finished).
struct Partial {
    path: PathBuf,
    keep: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn image_key(name: &str) -> String {
    format!("images/{name}")
}

impl ImageStore {
    /// The image store under `data_dir`, its files limited to `quota_mib`.
    pub fn new(
        data_dir: &std::path::Path,
        store: Arc<dyn Store>,
        quota_mib: u64,
    ) -> std::io::Result<ImageStore> {
        let blobs = data_dir.join("images").join("blobs");
        std::fs::create_dir_all(&blobs)?;
        let mut used = 0u64;
        for entry in std::fs::read_dir(&blobs)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(PARTIAL_PREFIX)
            {
                // Pushes cut short by a crash left their partial files.
                let _ = std::fs::remove_file(entry.path());
            } else if let Ok(meta) = entry.metadata() {
                used = used.saturating_add(meta.len());
            }
        }
        Ok(ImageStore {
            blobs,
            store,
            pushes: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PUSHES)),
            used: std::sync::Mutex::new(used),
            quota: quota_mib.saturating_mul(1 << 20),
            collecting: tokio::sync::RwLock::new(()),
            audit: std::sync::OnceLock::new(),
        })
    }

    /// Forgets image `name` and collects the files nothing refers to any more.
    pub async fn delete(&self, name: &str) -> Result<(Vec<String>, u64), Status> {
        let _collecting = self.collecting.write().await;
        let Some((_, rev)) = self.get(name).await? else {
            return Err(Status::not_found(format!("no image named {name:?}")));
        };
        let txn = Txn::new()
            .when(Compare::ModRevision(image_key(name), rev))
            .delete(image_key(name));
        let store = self.store.clone();
        let outcome = tokio::task::spawn_blocking(move || store.txn(txn))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(unavailable)?;
        if !matches!(outcome, TxnOutcome::Committed(_)) {
            return Err(Status::aborted("the image changed concurrently; retry"));
        }
        self.collect().await
    }

    /// Removes every stored file that no image and no VM refers to; what it removed and the
    /// bytes freed. The caller holds `collecting` for writing.
    async fn collect(&self) -> Result<(Vec<String>, u64), Status> {
        let store = self.store.clone();
        let referenced = tokio::task::spawn_blocking(move || referenced_digests(store.as_ref()))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let mut removed = Vec::new();
        let mut freed = 0u64;
        let entries = std::fs::read_dir(&self.blobs)
            .map_err(|e| Status::internal(format!("cannot list the image files: {e}")))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || referenced.contains(&name) {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(entry.path()).is_ok() {
                freed += len;
                removed.push(name);
            }
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(freed);
        drop(used);
        if !removed.is_empty() {
            tracing::info!(
                files = removed.len(),
                freed_bytes = freed,
                "image files collected"
            );
        }
        Ok((removed, freed))
    }

    /// Reserves `bytes` within the quota, or says why not.
    fn reserve(&self, bytes: u64) -> Result<Reservation<'_>, Status> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.saturating_add(bytes) > self.quota {
            return Err(Status::resource_exhausted(format!(
                "image quota: {bytes} more bytes would take the images to {} of {} MiB \
                 (--image-quota-mib); delete images or raise the quota",
                used.saturating_add(bytes) >> 20,
                self.quota >> 20
            )));
        }
        *used += bytes;
        Ok(Reservation { store: self, bytes })
    }

    fn blob(&self, digest: &str) -> PathBuf {
        self.blobs.join(digest)
    }

    /// The size of a stored file, MiB rounded up; INVALID_ARGUMENT naming `field` when the
    /// store has no file of that digest (a VM could never get it to its host).
    pub async fn file_mib(&self, field: &str, digest: &str) -> Result<u64, Status> {
        match tokio::fs::metadata(self.blob(digest)).await {
            Ok(meta) if meta.is_file() => Ok(meta.len().div_ceil(1 << 20)),
            Ok(_) => Err(Status::invalid_argument(format!(
                "{field} {digest}: no such file in the image store (push it first)"
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Status::invalid_argument(
                format!("{field} {digest}: no such file in the image store (push it first)"),
            )),
            Err(e) => Err(Status::unavailable(format!("image store: {e}"))),
        }
    }

    /// The host disk space a VM with this (resolved) spec may take, MiB: its rootfs and
    /// image disks as copied, its sparse disks full, its logs.
    pub async fn vm_disk_mib(&self, spec: &fabric_proto::v1::VmSpec) -> Result<u64, Status> {
        use fabric_proto::v1::disk_spec::Source;
        let mut total = crate::placement::spec_disk_mib(spec);
        if let Some(image) = &spec.image {
            if !image.rootfs_sha256.is_empty() {
                let size = self
                    .file_mib("spec.image.rootfs_sha256", &image.rootfs_sha256)
                    .await?;
                total = total.saturating_add(size);
            }
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            if let Some(Source::ImageSha256(digest)) = &disk.source {
                let size = self
                    .file_mib(&format!("spec.disks[{i}].image_sha256"), digest)
                    .await?;
                total = total.saturating_add(size);
            }
        }
        Ok(total)
    }

    async fn get(&self, name: &str) -> Result<Option<(Image, u64)>, Status> {
        let store = self.store.clone();
        let key = image_key(name);
        let kv = tokio::task::spawn_blocking(move || store.get(&key))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(unavailable)?;
        match kv {
            Some(kv) => Ok(Some((
                Image::decode(kv.value.as_slice()).map_err(|e| Status::internal(e.to_string()))?,
                kv.mod_revision,
            ))),
            None => Ok(None),
        }
    }

    /// Fills a boot image's empty digests from its named image.
    pub async fn resolve(&self, image: &mut BootImage) -> Result<(), Status> {
        if image.name.is_empty() {
            return Ok(());
        }
        let (stored, _) = self.get(&image.name).await?.ok_or_else(|| {
            Status::invalid_argument(format!("spec.image.name {:?}: no such image", image.name))
        })?;
        let digest_of = |role: ImageFileRole| {
            stored
                .files
                .iter()
                .find(|f| f.role() == role)
                .map(|f| f.sha256.clone())
        };
        if image.kernel_sha256.is_empty() {
            image.kernel_sha256 = digest_of(ImageFileRole::Kernel).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "spec.image.name {:?}: the image has no kernel",
                    image.name
                ))
            })?;
        }
        if image.initramfs_sha256.is_empty() {
            image.initramfs_sha256 = digest_of(ImageFileRole::Initramfs).unwrap_or_default();
        }
        if image.rootfs_sha256.is_empty() {
            image.rootfs_sha256 = digest_of(ImageFileRole::Rootfs).unwrap_or_default();
        }
        Ok(())
    }

    /// Points `name`'s `role` at a stored file, if `grants` may push to the image as it is
    /// when the change commits (a new image belongs to the project [`push_owner`] gives).
    async fn attach(
        &self,
        name: &str,
        file: ImageFile,
        grants: &Grants,
        asked: &str,
    ) -> Result<Image, Status> {
        loop {
            let current = self.get(name).await?;
            let owner = push_owner(grants, name, asked, current.as_ref().map(|(i, _)| i))?;
            let (mut image, compare) = match current {
                Some((image, rev)) => (image, Compare::ModRevision(image_key(name), rev)),
                None => (
                    Image {
                        name: name.to_string(),
                        files: Vec::new(),
                        project: owner,
                    },
                    Compare::Absent(image_key(name)),
                ),
            };
            image.files.retain(|f| f.role != file.role);
            image.files.push(file.clone());
            image.files.sort_by_key(|f| f.role);
            let txn = Txn::new()
                .when(compare)
                .put(image_key(name), image.encode_to_vec());
            let store = self.store.clone();
            let outcome = tokio::task::spawn_blocking(move || store.txn(txn))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(unavailable)?;
            if let TxnOutcome::Committed(_) = outcome {
                return Ok(image);
            }
        }
    }
}

/// The project a push by `grants` to image `name` (stored as `existing`) leaves the image
/// in, or why the caller may not push to it. `asked` is the header's project.
///
/// - An existing image keeps its owner; pushing to it needs operator in that project, or
///   cluster-wide (always, for a cluster-wide image); `asked`, when given, must be the owner.
/// - A new image belongs to `asked` (the caller must operate there); without one, to the
///   caller's only project when it operates in exactly one, or to no project (cluster-wide)
///   when the caller is a cluster-wide operator.
pub fn push_owner(
    grants: &Grants,
    name: &str,
    asked: &str,
    existing: Option<&Image>,
) -> Result<String, Status> {
    if !asked.is_empty() {
        fabric_proto::tls::check_name("project", asked).map_err(Status::invalid_argument)?;
    }
    if let Some(image) = existing {
        let owner = image.project.as_str();
        let allowed = if owner.is_empty() {
            grants.everywhere(Role::Operator)
        } else {
            grants.can(Role::Operator, owner)
        };
        if !allowed {
            let scope = if owner.is_empty() {
                "is cluster-wide: pushing to it needs a cluster-wide operator".to_string()
            } else {
                format!("belongs to project {owner}: pushing to it needs operator there")
            };
            return Err(Status::permission_denied(format!("image {name:?} {scope}")));
        }
        if !asked.is_empty() && asked != owner {
            return Err(Status::invalid_argument(format!(
                "image {name:?} belongs to {}, not project {asked}",
                if owner.is_empty() {
                    "no project (cluster-wide)".to_string()
                } else {
                    format!("project {owner}")
                }
            )));
        }
        return Ok(owner.to_string());
    }
    if !asked.is_empty() {
        if !grants.can(Role::Operator, asked) {
            return Err(Status::permission_denied(format!(
                "a new image in project {asked} needs operator there"
            )));
        }
        return Ok(asked.to_string());
    }
    if grants.everywhere(Role::Operator) {
        return Ok(String::new());
    }
    let operated: Vec<&str> = grants
        .projects
        .iter()
        .filter(|(_, role)| **role >= Role::Operator)
        .map(|(project, _)| project.as_str())
        .collect();
    match operated.as_slice() {
        [only] => Ok(only.to_string()),
        [] => Err(Status::permission_denied(
            "pushing an image needs operator in a project or cluster-wide",
        )),
        several => Err(Status::invalid_argument(format!(
            "you operate in projects {}: name the new image's project (--project)",
            several.join(", ")
        ))),
    }
}

/// The Images gRPC service over the shared [`ImageStore`].
#[derive(Clone)]
pub struct ImagesService {
    pub images: Arc<ImageStore>,
    /// Whose VMs a host may pull images for: a host's certificate pulls only the image files
    /// of VMs assigned to it (admins and users pull any).
    pub controller: Arc<crate::controller::Controller>,
}

impl ImageStore {
    /// Audits pushes and deletions in `controller`'s audit log from now on.
    pub fn audit_with(&self, controller: Arc<crate::controller::Controller>) {
        let _ = self.audit.set(controller);
    }
}

impl std::ops::Deref for ImagesService {
    type Target = ImageStore;
    fn deref(&self) -> &ImageStore {
        &self.images
    }
}

/// Every digest an image or a VM refers to.
fn referenced_digests(store: &dyn Store) -> Result<std::collections::HashSet<String>, Status> {
    use fabric_proto::v1::{disk_spec, Vm};
    let mut digests = std::collections::HashSet::new();
    let (images, _) = store.list("images/").map_err(unavailable)?;
    for kv in images {
        let image =
            Image::decode(kv.value.as_slice()).map_err(|e| Status::internal(e.to_string()))?;
        digests.extend(image.files.into_iter().map(|f| f.sha256));
    }
    let (vms, _) = store.list("vms/").map_err(unavailable)?;
    for kv in vms {
        let vm = Vm::decode(kv.value.as_slice()).map_err(|e| Status::internal(e.to_string()))?;
        let Some(spec) = vm.spec else { continue };
        if let Some(image) = spec.image {
            digests.extend(
                [
                    image.kernel_sha256,
                    image.initramfs_sha256,
                    image.rootfs_sha256,
                ]
                .into_iter()
                .filter(|d| !d.is_empty()),
            );
        }
        for disk in spec.disks {
            if let Some(disk_spec::Source::ImageSha256(d)) = disk.source {
                digests.insert(d);
            }
        }
    }
    Ok(digests)
}

/// The next message of a push, or an error when none comes within [`PUSH_IDLE_TIMEOUT`].
async fn next_part(
    stream: &mut Streaming<PushImageRequest>,
) -> Result<Option<PushImageRequest>, Status> {
    tokio::time::timeout(PUSH_IDLE_TIMEOUT, stream.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "no data for {} s: push dropped",
                PUSH_IDLE_TIMEOUT.as_secs()
            ))
        })?
}

type PullStream = Pin<Box<dyn Stream<Item = Result<PullImageResponse, Status>> + Send>>;

impl ImagesService {
    /// Records the outcome of a push or deletion (through the audit queue: an image's
    /// commit is its own).
    fn audited<T>(
        &self,
        extensions: &tonic::Extensions,
        rpc: &str,
        image: &str,
        project: &str,
        digest: String,
        result: &Result<T, Status>,
    ) {
        let Some(controller) = self.audit.get() else {
            return;
        };
        let Ok(identity) = fabric_proto::tls::caller_of(extensions) else {
            return;
        };
        let (code, message) = match result {
            Ok(_) => (0, String::new()),
            Err(s) => (s.code() as i32, s.message().to_string()),
        };
        controller.audit.record(fabric_proto::v1::AuditEntry {
            identity: identity.to_string(),
            roles: controller.grants(&identity).describe(),
            rpc: format!("/{}/{rpc}", fabric_proto::IMAGES_SERVICE),
            target: format!("image/{}", image.chars().take(64).collect::<String>()),
            project: project.chars().take(64).collect(),
            code,
            message,
            request_sha256: digest,
            ..Default::default()
        });
    }

    async fn push(
        &self,
        request: Request<Streaming<PushImageRequest>>,
        header_out: &mut Option<fabric_proto::v1::PushImageHeader>,
    ) -> Result<Response<PushImageResponse>, Status> {
        let _push = self.pushes.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_CONCURRENT_PUSHES} image pushes are in progress: try again when one is done"
            ))
        })?;
        let grants = self
            .controller
            .grants(&fabric_proto::tls::caller(&request)?);
        let mut stream = request.into_inner();
        let header = match next_part(&mut stream).await? {
            Some(PushImageRequest {
                part: Some(PushPart::Header(header)),
            }) => {
                *header_out = Some(header.clone());
                header
            }
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be the header",
                ))
            }
        };
        check_image_name(&header.image_name).map_err(Status::invalid_argument)?;
        check_sha256("sha256", &header.sha256).map_err(Status::invalid_argument)?;
        let role = ImageFileRole::try_from(header.role)
            .ok()
            .filter(|r| *r != ImageFileRole::Unspecified)
            .ok_or_else(|| Status::invalid_argument(format!("role {}: unknown", header.role)))?;
        if header.size_bytes > MAX_FILE {
            return Err(Status::invalid_argument(format!(
                "size_bytes {}: at most {MAX_FILE}",
                header.size_bytes
            )));
        }
        // Refused before a byte is stored; checked again when the file is attached.
        let existing = self.get(&header.image_name).await?;
        push_owner(
            &grants,
            &header.image_name,
            &header.project,
            existing.as_ref().map(|(i, _)| i),
        )?;
        let mut reservation = self.reserve(header.size_bytes)?;
        let partial = self.blobs.join(format!(
            "{PARTIAL_PREFIX}{}-{}",
            header.sha256,
            crate::controller::new_id("p")
        ));
        let mut guard = Partial {
            path: partial.clone(),
            keep: false,
        };
        let result = async {
            // Created here, not on a blocking thread (tokio::fs): a handler dropped while
            // that thread ran would have its guard remove the file before it existed.
            let mut file = std::fs::File::create(&partial)
                .map(tokio::fs::File::from_std)
                .map_err(|e| Status::internal(format!("cannot store: {e}")))?;
            let mut hasher = Sha256::new();
            let mut size: u64 = 0;
            while let Some(message) = next_part(&mut stream).await? {
                let Some(PushPart::Data(data)) = message.part else {
                    return Err(Status::invalid_argument("a second header in the stream"));
                };
                if data.len() > CHUNK {
                    return Err(Status::invalid_argument("a data message over 1 MiB"));
                }
                size += data.len() as u64;
                if size > header.size_bytes {
                    return Err(Status::invalid_argument(format!(
                        "more data than the declared size_bytes {}",
                        header.size_bytes
                    )));
                }
                hasher.update(&data);
                file.write_all(&data)
                    .await
                    .map_err(|e| Status::internal(format!("cannot store: {e}")))?;
            }
            if size != header.size_bytes {
                return Err(Status::invalid_argument(format!(
                    "received {size} bytes, declared size_bytes {}",
                    header.size_bytes
                )));
            }
            let got = hex::encode(hasher.finalize());
            if got != header.sha256 {
                return Err(Status::invalid_argument(format!(
                    "sha256 mismatch: declared {}, the data has {got}",
                    header.sha256
                )));
            }
            file.sync_all()
                .await
                .map_err(|e| Status::internal(format!("cannot store: {e}")))?;
            Ok(size)
        }
        .await;
        let size = match result {
            Ok(size) => size,
            Err(status) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(status);
            }
        };
        // From storing the file to attaching it to its image, no collection may run (the
        // partial file, a dot file, is never collected).
        let _storing = self.collecting.read().await;
        let blob = self.blob(&header.sha256);
        let already_stored = blob.exists();
        if already_stored {
            let _ = tokio::fs::remove_file(&partial).await;
        } else {
            tokio::fs::rename(&partial, &blob)
                .await
                .map_err(|e| Status::internal(format!("cannot store: {e}")))?;
            guard.keep = true;
            // Stored: the bytes stay counted.
            reservation.bytes = 0;
        }
        let file = ImageFile {
            role: role as i32,
            sha256: header.sha256.clone(),
            size_bytes: size,
            file_name: header.file_name.chars().take(255).collect(),
            pushed_at: Some(prost_types::Timestamp::from(fabric_proto::clock::now())),
        };
        let image = self
            .attach(&header.image_name, file.clone(), &grants, &header.project)
            .await?;
        Ok(Response::new(PushImageResponse {
            image: Some(image),
            file: Some(file),
            already_stored,
        }))
    }

    async fn delete_named(
        &self,
        request: Request<DeleteImageRequest>,
    ) -> Result<Response<DeleteImageResponse>, Status> {
        let name = request.into_inner().name;
        check_image_name(&name).map_err(Status::invalid_argument)?;
        let (removed_sha256, freed_bytes) = self.delete(&name).await?;
        Ok(Response::new(DeleteImageResponse {
            removed_sha256,
            freed_bytes,
        }))
    }
}

#[tonic::async_trait]
impl Images for ImagesService {
    async fn push_image(
        &self,
        request: Request<Streaming<PushImageRequest>>,
    ) -> Result<Response<PushImageResponse>, Status> {
        let extensions = request.extensions().clone();
        let mut header = None;
        let result = self.push(request, &mut header).await;
        let (image, project, digest) = header
            .map(|h: fabric_proto::v1::PushImageHeader| {
                (
                    h.image_name.clone(),
                    h.project.clone(),
                    crate::audit::digest(&h),
                )
            })
            .unwrap_or_default();
        // The project of the image as pushed (its owner), else the one the header asked.
        let project = match &result {
            Ok(reply) => reply
                .get_ref()
                .image
                .as_ref()
                .map_or(project, |i| i.project.clone()),
            Err(_) => project,
        };
        self.audited(&extensions, "PushImage", &image, &project, digest, &result);
        result
    }

    async fn delete_image(
        &self,
        request: Request<DeleteImageRequest>,
    ) -> Result<Response<DeleteImageResponse>, Status> {
        let extensions = request.extensions().clone();
        let digest = crate::audit::digest(request.get_ref());
        let name = request.get_ref().name.clone();
        let result = self.delete_named(request).await;
        self.audited(&extensions, "DeleteImage", &name, "", digest, &result);
        result
    }

    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let name = request.into_inner().name;
        let store = self.store.clone();
        let prefix = if name.is_empty() {
            "images/".to_string()
        } else {
            image_key(&name)
        };
        let (kvs, _) = tokio::task::spawn_blocking(move || store.list(&prefix))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(unavailable)?;
        let images = kvs
            .iter()
            .filter_map(|kv| Image::decode(kv.value.as_slice()).ok())
            .filter(|i| name.is_empty() || i.name == name)
            .collect();
        Ok(Response::new(ListImagesResponse { images }))
    }

    type PullImageStream = PullStream;

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullStream>, Status> {
        let caller = fabric_proto::tls::caller(&request)?;
        let req = request.into_inner();
        check_sha256("sha256", &req.sha256).map_err(Status::invalid_argument)?;
        if let fabric_proto::tls::Identity::Host(name) = &caller {
            if !self.controller.host_may_pull(name, &req.sha256) {
                // The same answer as for a file that does not exist: a host learns nothing
                // of images it has no VM of.
                tracing::warn!(host = %name, sha256 = %req.sha256, "a pull of an image no VM of the host uses refused");
                let status = Status::not_found(format!(
                    "no image file with sha256 {} for a VM of host {name}",
                    req.sha256
                ));
                self.controller.audit_refusal(
                    &caller,
                    "/fabric.v1.Images/PullImage",
                    &format!("sha256/{}", req.sha256),
                    &status,
                );
                return Err(status);
            }
        }
        let path = self.blob(&req.sha256);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!(
                    "no image file with sha256 {}",
                    req.sha256
                )))
            }
            Err(e) => return Err(Status::internal(format!("cannot read: {e}"))),
        };
        let size = file
            .metadata()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        if req.offset > size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end ({size} bytes)",
                req.offset
            )));
        }
        file.seek(std::io::SeekFrom::Start(req.offset))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let header = PullImageResponse {
            part: Some(PullPart::Header(PullImageHeader {
                sha256: req.sha256.clone(),
                size_bytes: size,
                offset: req.offset,
            })),
        };
        tokio::spawn(async move {
            if tx.send(Ok(header)).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        let message = PullImageResponse {
                            part: Some(PullPart::Data(buf[..n].to_vec())),
                        };
                        if tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("read: {e}")))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(bindings: &[(Option<&str>, Role)]) -> Grants {
        let mut g = Grants::default();
        for (project, role) in bindings {
            g.add(*project, *role);
        }
        g
    }

    fn image(project: &str) -> Image {
        Image {
            name: "base".into(),
            files: Vec::new(),
            project: project.into(),
        }
    }

    /// Who may push to a new or existing image, and which project a new one gets.
    #[test]
    fn the_owner_of_a_push() {
        use tonic::Code::{InvalidArgument as Invalid, PermissionDenied as Denied};
        let op1 = grants(&[(Some("p1"), Role::Operator)]);
        let op1_view2 = grants(&[(Some("p1"), Role::Operator), (Some("p2"), Role::Viewer)]);
        let op12 = grants(&[(Some("p1"), Role::Operator), (Some("p2"), Role::Operator)]);
        let viewer = grants(&[(None, Role::Viewer)]);
        let cluster_op = grants(&[(None, Role::Operator)]);
        let admin = Grants::admin();
        let p1 = image("p1");
        let shared = image("");
        type Case<'a> = (
            &'a Grants,
            &'a str,
            Option<&'a Image>,
            Result<&'a str, tonic::Code>,
        );
        let cases: &[Case] = &[
            // New images.
            (&op1, "", None, Ok("p1")),
            (&op1_view2, "", None, Ok("p1")),
            (&op1, "p1", None, Ok("p1")),
            (&op1, "p2", None, Err(Denied)),
            (&op12, "", None, Err(Invalid)),
            (&op12, "p2", None, Ok("p2")),
            (&viewer, "", None, Err(Denied)),
            (&cluster_op, "", None, Ok("")),
            (&admin, "p7", None, Ok("p7")),
            (&op1, "Bad/Name", None, Err(Invalid)),
            // Existing images keep their owner.
            (&op1, "", Some(&p1), Ok("p1")),
            (&op12, "", Some(&p1), Ok("p1")),
            (&op1, "p2", Some(&p1), Err(Invalid)),
            (
                &grants(&[(Some("p2"), Role::Operator)]),
                "",
                Some(&p1),
                Err(Denied),
            ),
            (
                &grants(&[(Some("p2"), Role::Operator)]),
                "p1",
                Some(&p1),
                Err(Denied),
            ),
            (
                &grants(&[(Some("p1"), Role::Viewer)]),
                "",
                Some(&p1),
                Err(Denied),
            ),
            (&cluster_op, "", Some(&p1), Ok("p1")),
            (&op1, "", Some(&shared), Err(Denied)),
            (&cluster_op, "", Some(&shared), Ok("")),
            (&admin, "", Some(&shared), Ok("")),
        ];
        for (i, (grants, asked, existing, want)) in cases.iter().enumerate() {
            let got = push_owner(grants, "base", asked, *existing).map_err(|s| s.code());
            assert_eq!(got.as_deref().map_err(|c| *c), *want, "case {i}");
        }
    }
}
