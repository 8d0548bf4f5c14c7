//! The host's certificate: got once with a join token, then renewed before it expires, all
//! without a restart and without touching the VMs.
//!
//! - [`join`]: on a first start with `ca.pem` but no `host.pem` in `tls_dir`, the agent makes
//!   its own key (written 0600 before anything is sent), sends a CSR and the token to the
//!   controller over TLS without a client certificate (trusting only `ca.pem`, which the
//!   operator copied: the CA pin) and writes the certificate it gets to `host.pem`. The token
//!   is never logged.
//! - [`run_renewal`]: at two thirds of the certificate's lifetime, a new key and a CSR go
//!   to HostLink.RenewCertificate over the current mutual-TLS channel; the new pair is
//!   written beside the current one and renamed over it, key first ([`recover_renewal`]
//!   completes a renewal a crash cut short), and a channel built from the new
//!   files replaces the old one ([`ControllerChannel`]). The Agent service's listener reads
//!   the new files by itself (`ReloadingCert`). Failures are retried with backoff; a
//!   certificate that expired is an error in the log, and the VMs keep running: the host
//!   then fences by the lease rules, as when the controller is unreachable.

use std::time::Duration;

use anyhow::Context;
use fabric_proto::tls::{self, Identity, TlsFiles};
use fabric_proto::v1::host_link_client::HostLinkClient;
use fabric_proto::v1::{JoinHostRequest, RenewCertificateRequest};
use tonic::transport::Channel;

use crate::config::JoinToken;
use crate::connect::{anonymous_channel, lazy_channel, Address};

/// Retry delays of a join the controller could not answer, and of a failed renewal.
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// The next retry delay after `delay`, at most [`MAX_RETRY`] and at most a tenth of what is
/// left of `left` (a certificate with seconds to live is retried within seconds), never
/// under 200 ms.
pub fn next_retry(delay: Duration, left: Duration) -> Duration {
    (delay * 2)
        .min(MAX_RETRY)
        .min(left / 10)
        .max(Duration::from_millis(200))
}

/// A refusal that retrying cannot change (the token is bad, spent, expired, for another
/// host; the controller cannot sign): the agent stops with it.
fn is_final(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::Unimplemented
    )
}

/// Gets this host's certificate with `token` (see the module doc). Returns once `host.pem`
/// is written; fails on a refusal, naming it.
pub async fn join(
    address: &Address,
    files: &TlsFiles,
    name: &str,
    token: &JoinToken,
) -> anyhow::Result<()> {
    let channel = anonymous_channel(address, files).map_err(anyhow::Error::msg)?;
    let (csr_pem, key_pem) = tls::new_csr().map_err(anyhow::Error::msg)?;
    // The key is on disk before the token is spent: a certificate returned is never one
    // whose key is lost.
    tls::write_private(&files.key, &key_pem)
        .with_context(|| format!("cannot write {}", files.key.display()))?;
    let mut client = HostLinkClient::new(channel);
    let mut retry = MIN_RETRY;
    tracing::info!(name, controller = ?address, "joining the cluster with a join token");
    let certificate = loop {
        let request = JoinHostRequest {
            token: token.expose().to_string(),
            host_name: name.to_string(),
            csr_pem: csr_pem.clone(),
        };
        match client.join_host(request).await {
            Ok(response) => break response.into_inner().certificate_pem,
            Err(status) if is_final(&status) => {
                let _ = std::fs::remove_file(&files.key);
                anyhow::bail!(
                    "the controller refused to join this host ({:?}): {}",
                    status.code(),
                    status.message()
                );
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), "cannot join yet; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    };
    check_issued(&certificate, files, name)?;
    tls::write_private(&files.cert, &certificate)
        .with_context(|| format!("cannot write {}", files.cert.display()))?;
    let (_, not_after) = tls::validity(&certificate).map_err(anyhow::Error::msg)?;
    tracing::info!(
        name,
        cert = %files.cert.display(),
        valid_s = not_after
            .duration_since(fabric_proto::clock::now())
            .unwrap_or_default()
            .as_secs(),
        "joined: host certificate written"
    );
    Ok(())
}

/// The certificate the controller returned is of this cluster's CA's making and for
/// host/`name` (a controller that answered otherwise is not trusted with the files).
fn check_issued(certificate: &str, files: &TlsFiles, name: &str) -> anyhow::Result<()> {
    let cluster = files.cluster().map_err(anyhow::Error::msg)?;
    let identity = tls::identity_of_pem(certificate, &cluster)
        .map_err(|e| anyhow::anyhow!("the controller's answer: {e}"))?;
    if identity != Identity::Host(name.to_string()) {
        anyhow::bail!("the controller returned a certificate for {identity}, not host/{name}");
    }
    Ok(())
}

/// Renews the host's certificate at two thirds of its lifetime, for ever (see the module
/// doc); each new channel goes to `channels`.
pub async fn run_renewal(
    address: Address,
    files: TlsFiles,
    name: String,
    channels: tokio::sync::watch::Sender<Channel>,
) {
    let mut retry = MIN_RETRY;
    let mut expired_said = false;
    loop {
        let validity = std::fs::read_to_string(&files.cert)
            .map_err(|e| format!("{}: {e}", files.cert.display()))
            .and_then(|pem| tls::validity(&pem));
        let (not_before, not_after) = match validity {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the host certificate's validity; trying again in a minute");
                tokio::time::sleep(MAX_RETRY).await;
                continue;
            }
        };
        let now = fabric_proto::clock::now();
        let wait = tls::renewal_delay(not_before, not_after, now);
        if !wait.is_zero() {
            tracing::debug!(
                renew_in_ms = wait.as_millis() as u64,
                "host certificate renewal scheduled"
            );
            tokio::time::sleep(wait).await;
            retry = MIN_RETRY;
            continue;
        }
        let left = not_after
            .duration_since(fabric_proto::clock::now())
            .unwrap_or_default();
        match renew_once(&address, &files, &name, &channels).await {
            Ok(valid) => {
                tracing::info!(
                    cert = %files.cert.display(),
                    valid_s = valid.as_secs(),
                    "host certificate renewed"
                );
                retry = MIN_RETRY;
                expired_said = false;
            }
            Err(e) => {
                if left.is_zero() {
                    if !expired_said {
                        tracing::error!(
                            error = %format!("{e:#}"),
                            cert = %files.cert.display(),
                            "the host certificate HAS EXPIRED and cannot be renewed: the controller refuses this host until it is (give it a new one: fabricctl host token create, remove host.pem, restart with the token); the VMs run until the lease ends"
                        );
                        expired_said = true;
                    }
                } else {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        expires_in_s = left.as_secs(),
                        retry_ms = retry.as_millis() as u64,
                        "host certificate renewal failed; retrying"
                    );
                }
                tokio::time::sleep(retry).await;
                retry = next_retry(retry, if left.is_zero() { MAX_RETRY * 10 } else { left });
            }
        }
    }
}

/// One renewal: a new key and CSR, the controller's certificate, the files replaced (key
/// first, each by a rename), the new channel sent. The new certificate's remaining validity.
async fn renew_once(
    address: &Address,
    files: &TlsFiles,
    name: &str,
    channels: &tokio::sync::watch::Sender<Channel>,
) -> anyhow::Result<Duration> {
    let (csr_pem, key_pem) = tls::new_csr().map_err(anyhow::Error::msg)?;
    let mut client = HostLinkClient::new(channels.borrow().clone());
    let certificate = tokio::time::timeout(
        Duration::from_secs(15),
        client.renew_certificate(RenewCertificateRequest { csr_pem }),
    )
    .await
    .context("RenewCertificate timed out")?
    .map_err(|s| anyhow::anyhow!("the controller refused ({:?}): {}", s.code(), s.message()))?
    .into_inner()
    .certificate_pem;
    check_issued(&certificate, files, name)?;
    let (_, not_after) = tls::validity(&certificate).map_err(anyhow::Error::msg)?;
    replace_pair(files, &key_pem, &certificate)?;
    let channel = lazy_channel(address, Some(files)).map_err(anyhow::Error::msg)?;
    channels.send_replace(channel);
    Ok(not_after
        .duration_since(fabric_proto::clock::now())
        .unwrap_or_default())
}

/// The files a renewal writes first: the new key and certificate beside the current ones.
fn next_files(files: &TlsFiles) -> (std::path::PathBuf, std::path::PathBuf) {
    let next = |path: &std::path::Path| {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".next");
        path.with_file_name(name)
    };
    (next(&files.key), next(&files.cert))
}

/// Replaces the key and certificate so that a crash at any point leaves a matching pair, or
/// one [`recover_renewal`] completes at the next start: the new key, then the new
/// certificate, are written beside the current ones (`*.next`, each complete or absent),
/// then renamed over them, key first.
fn replace_pair(files: &TlsFiles, key_pem: &str, certificate: &str) -> anyhow::Result<()> {
    let (next_key, next_cert) = next_files(files);
    tls::write_private(&next_key, key_pem)
        .with_context(|| format!("cannot write {}", next_key.display()))?;
    tls::write_private(&next_cert, certificate)
        .with_context(|| format!("cannot write {}", next_cert.display()))?;
    std::fs::rename(&next_key, &files.key)
        .with_context(|| format!("cannot replace {}", files.key.display()))?;
    std::fs::rename(&next_cert, &files.cert)
        .with_context(|| format!("cannot replace {}", files.cert.display()))?;
    Ok(())
}

/// At start, before the files are read: completes a renewal a crash cut short. A written
/// `*.next` certificate means the pair was complete: whatever of it is not in place yet is
/// renamed in. A `*.next` key alone means the certificate never came: it is removed, and the
/// current pair stands.
pub fn recover_renewal(files: &TlsFiles) -> anyhow::Result<()> {
    let (next_key, next_cert) = next_files(files);
    if next_cert.exists() {
        if next_key.exists() {
            std::fs::rename(&next_key, &files.key)
                .with_context(|| format!("cannot replace {}", files.key.display()))?;
        }
        std::fs::rename(&next_cert, &files.cert)
            .with_context(|| format!("cannot replace {}", files.cert.display()))?;
        tracing::warn!(cert = %files.cert.display(), "completed a certificate renewal a stop had cut short");
    } else if next_key.exists() {
        std::fs::remove_file(&next_key)
            .with_context(|| format!("cannot remove {}", next_key.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every point a renewal can stop at leaves, after [`recover_renewal`], a key and a
    /// certificate of the same pair.
    #[test]
    fn a_renewal_cut_short_anywhere_leaves_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_dir(dir.path(), "host");
        let (next_key, next_cert) = next_files(&files);
        // Steps of replace_pair, as files: (next key, next cert, key renamed, cert renamed).
        for stop in 0..=4 {
            std::fs::write(&files.key, "old key").unwrap();
            std::fs::write(&files.cert, "old cert").unwrap();
            let _ = std::fs::remove_file(&next_key);
            let _ = std::fs::remove_file(&next_cert);
            if stop >= 1 {
                std::fs::write(&next_key, "new key").unwrap();
            }
            if stop >= 2 {
                std::fs::write(&next_cert, "new cert").unwrap();
            }
            if stop >= 3 {
                std::fs::rename(&next_key, &files.key).unwrap();
            }
            if stop >= 4 {
                std::fs::rename(&next_cert, &files.cert).unwrap();
            }
            recover_renewal(&files).unwrap();
            let pair = (
                std::fs::read_to_string(&files.key).unwrap(),
                std::fs::read_to_string(&files.cert).unwrap(),
            );
            let expected = if stop >= 2 {
                ("new key", "new cert")
            } else {
                ("old key", "old cert")
            };
            assert_eq!(
                (pair.0.as_str(), pair.1.as_str()),
                expected,
                "stopped after step {stop}"
            );
            assert!(!next_key.exists() && !next_cert.exists(), "step {stop}");
        }
    }

    #[test]
    fn retries_back_off_within_the_time_left() {
        let hour = Duration::from_secs(3600);
        assert_eq!(next_retry(MIN_RETRY, hour), Duration::from_secs(2));
        assert_eq!(next_retry(Duration::from_secs(40), hour), MAX_RETRY);
        // Seconds left: retried within a tenth of them, never faster than 200 ms.
        assert_eq!(
            next_retry(Duration::from_secs(8), Duration::from_secs(5)),
            Duration::from_millis(500)
        );
        assert_eq!(
            next_retry(MIN_RETRY, Duration::ZERO),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn refusals_that_a_retry_cannot_change_are_final() {
        assert!(is_final(&tonic::Status::unauthenticated("used")));
        assert!(is_final(&tonic::Status::permission_denied("other host")));
        assert!(is_final(&tonic::Status::failed_precondition("no CA key")));
        assert!(!is_final(&tonic::Status::unavailable("down")));
        assert!(!is_final(&tonic::Status::deadline_exceeded("slow")));
    }
}
