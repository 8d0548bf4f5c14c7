//! `fabricctl image push`: which files go under which role (a directory built by
//! images/build.sh names its own), and the upload itself: a header with the size and sha256,
//! then the data in 1 MiB chunks. The file is read twice (hash, then send) so that the header
//! can come first; the controller checks both before it stores anything.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::ValueEnum;
use fabric_proto::v1::images_client::ImagesClient;
use fabric_proto::v1::push_image_request::Part;
use fabric_proto::v1::{
    Image, ImageFileRole, PushImageHeader, PushImageRequest, PushImageResponse,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::RpcError;

/// Largest data message the Images service accepts.
pub const CHUNK: usize = 1 << 20;

/// The long help of `image push`.
pub const PUSH_HELP: &str = "\
Upload image files under a name, in 1 MiB chunks with the size and sha256 declared first.

A FILE needs --role. A DIR is the output of images/build.sh (images/out): its vmlinuz is \
pushed as the kernel, initramfs.cpio.gz as the initramfs and rootfs.ext4 as the rootfs \
(the last two when present); when the directory has a manifest.json, each file's sha256 \
must match it.

Pushing a role again points the name at the new file; VMs created earlier keep the digests \
they were created with.

  fabricctl image push images/out --name alpine
  fabricctl image push ./bzImage --name custom --role kernel";

/// What a pushed file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Kernel,
    Initramfs,
    Rootfs,
    Disk,
}

impl From<Role> for ImageFileRole {
    fn from(role: Role) -> ImageFileRole {
        match role {
            Role::Kernel => ImageFileRole::Kernel,
            Role::Initramfs => ImageFileRole::Initramfs,
            Role::Rootfs => ImageFileRole::Rootfs,
            Role::Disk => ImageFileRole::Disk,
        }
    }
}

/// The files of images/build.sh's output directory, by role.
const BUILD_LAYOUT: [(&str, ImageFileRole, bool); 3] = [
    ("vmlinuz", ImageFileRole::Kernel, true),
    ("initramfs.cpio.gz", ImageFileRole::Initramfs, false),
    ("rootfs.ext4", ImageFileRole::Rootfs, false),
];

/// One file to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushFile {
    pub path: PathBuf,
    pub role: ImageFileRole,
    /// The sha256 the directory's manifest.json declares for it, if any.
    pub manifest_sha256: Option<String>,
}

/// The files named by the command line, each with its role. A name holds one file per role,
/// so two files for one role are refused rather than silently keeping the last.
pub fn plan(paths: &[PathBuf], role: Option<Role>) -> anyhow::Result<Vec<PushFile>> {
    let mut files: Vec<PushFile> = Vec::new();
    for path in paths {
        let metadata = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if metadata.is_dir() {
            if role.is_some() {
                anyhow::bail!(
                    "{}: --role is for files; a directory pushes vmlinuz, initramfs.cpio.gz and rootfs.ext4 under their roles",
                    path.display()
                );
            }
            files.extend(plan_directory(path)?);
        } else {
            let role = role.with_context(|| {
                format!(
                    "{}: give --role kernel, initramfs, rootfs or disk",
                    path.display()
                )
            })?;
            files.push(PushFile {
                path: path.clone(),
                role: role.into(),
                manifest_sha256: None,
            });
        }
    }
    for (i, file) in files.iter().enumerate() {
        if let Some(other) = files[..i].iter().find(|f| f.role == file.role) {
            anyhow::bail!(
                "{} and {}: both are the {}; an image holds one file per role",
                other.path.display(),
                file.path.display(),
                super::render::image_role(file.role as i32)
            );
        }
    }
    Ok(files)
}

fn plan_directory(dir: &Path) -> anyhow::Result<Vec<PushFile>> {
    let manifest_path = dir.join("manifest.json");
    let manifest: Option<serde_json::Value> = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => Some(
            serde_json::from_str(&text).with_context(|| format!("{}", manifest_path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("{}", manifest_path.display())),
    };
    let mut files = Vec::new();
    for (name, role, required) in BUILD_LAYOUT {
        let path = dir.join(name);
        if !path.is_file() {
            if required {
                anyhow::bail!(
                    "{}: no {name}; a directory must be laid out like images/out of images/build.sh",
                    dir.display()
                );
            }
            continue;
        }
        let manifest_sha256 = manifest
            .as_ref()
            .and_then(|m| m["files"][name]["sha256"].as_str())
            .map(str::to_string);
        files.push(PushFile {
            path,
            role,
            manifest_sha256,
        });
    }
    Ok(files)
}

/// sha256 and size of a file.
fn digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok((hex::encode(hasher.finalize()), size));
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
}

/// Fills `buffer` as far as the file goes; returns the bytes read (0 at the end).
async fn read_chunk(file: &mut tokio::fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Pushes the files under `name` in order; returns the image after the last push and each
/// push's reply.
pub async fn push(
    images: &mut ImagesClient<Channel>,
    name: &str,
    project: &str,
    files: &[PushFile],
) -> anyhow::Result<(Image, Vec<PushImageResponse>)> {
    let mut replies = Vec::new();
    let mut image = Image::default();
    for file in files {
        let reply = push_one(images, name, project, file).await?;
        image = reply.image.clone().unwrap_or_default();
        replies.push(reply);
    }
    Ok((image, replies))
}

async fn push_one(
    images: &mut ImagesClient<Channel>,
    name: &str,
    project: &str,
    file: &PushFile,
) -> anyhow::Result<PushImageResponse> {
    let shown = file.path.display().to_string();
    let path = file.path.clone();
    let (sha256, size) = tokio::task::spawn_blocking(move || digest(&path))
        .await?
        .with_context(|| shown.clone())?;
    if let Some(expected) = &file.manifest_sha256 {
        if *expected != sha256 {
            anyhow::bail!(
                "{shown}: sha256 {sha256} differs from manifest.json's {expected}; rebuild with images/build.sh"
            );
        }
    }
    let header = PushImageRequest {
        part: Some(Part::Header(PushImageHeader {
            image_name: name.to_string(),
            role: file.role as i32,
            sha256,
            size_bytes: size,
            file_name: file
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            project: project.to_string(),
        })),
    };
    let mut source = tokio::fs::File::open(&file.path)
        .await
        .with_context(|| shown.clone())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // The reader feeds the request stream; its error, if any, explains a failed push better
    // than the controller's size mismatch does.
    let reader = tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return Ok(());
        }
        loop {
            let mut buffer = vec![0u8; CHUNK];
            let n = read_chunk(&mut source, &mut buffer).await?;
            if n == 0 {
                return Ok(());
            }
            buffer.truncate(n);
            let message = PushImageRequest {
                part: Some(Part::Data(buffer)),
            };
            if tx.send(message).await.is_err() {
                return Ok(());
            }
        }
    });
    let result = images
        .push_image(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let read: std::io::Result<()> = reader.await?;
    read.with_context(|| shown.clone())?;
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| RpcError(status).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(names: &[&str], manifest: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in names {
            std::fs::write(dir.path().join(name), name.as_bytes()).unwrap();
        }
        if let Some(manifest) = manifest {
            std::fs::write(dir.path().join("manifest.json"), manifest).unwrap();
        }
        dir
    }

    #[test]
    fn a_build_directory_names_its_roles() {
        let dir = layout(
            &["vmlinuz", "initramfs.cpio.gz", "rootfs.ext4", "vmlinux"],
            Some(r#"{"files": {"vmlinuz": {"sha256": "abc", "size": 7}}}"#),
        );
        let files = plan(&[dir.path().to_path_buf()], None).unwrap();
        let roles: Vec<_> = files
            .iter()
            .map(|f| (f.path.file_name().unwrap().to_str().unwrap(), f.role))
            .collect();
        assert_eq!(
            roles,
            [
                ("vmlinuz", ImageFileRole::Kernel),
                ("initramfs.cpio.gz", ImageFileRole::Initramfs),
                ("rootfs.ext4", ImageFileRole::Rootfs)
            ]
        );
        assert_eq!(files[0].manifest_sha256.as_deref(), Some("abc"));
        assert_eq!(files[1].manifest_sha256, None);
    }

    #[test]
    fn refusals_say_why() {
        let empty = layout(&["rootfs.ext4"], None);
        let err = plan(&[empty.path().to_path_buf()], None).unwrap_err();
        assert!(format!("{err:#}").contains("no vmlinuz"), "{err:#}");
        let dir = layout(&["vmlinuz", "bzImage"], None);
        let err = plan(&[dir.path().to_path_buf()], Some(Role::Kernel)).unwrap_err();
        assert!(
            format!("{err:#}").contains("--role is for files"),
            "{err:#}"
        );
        let file = dir.path().join("bzImage");
        let err = plan(std::slice::from_ref(&file), None).unwrap_err();
        assert!(format!("{err:#}").contains("give --role"), "{err:#}");
        let err = plan(&[dir.path().to_path_buf(), file], Some(Role::Kernel));
        assert!(err.is_err());
        let err = plan(
            &[dir.path().join("vmlinuz"), dir.path().join("bzImage")],
            Some(Role::Kernel),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("one file per role"), "{err:#}");
        let err = plan(&[dir.path().join("missing")], Some(Role::Disk)).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
    }

    #[test]
    fn digests_match_sha256() {
        let dir = layout(&["vmlinuz"], None);
        let (digest_hex, size) = digest(&dir.path().join("vmlinuz")).unwrap();
        assert_eq!(size, 7);
        assert_eq!(digest_hex, hex::encode(Sha256::digest(b"vmlinuz")));
    }
}
