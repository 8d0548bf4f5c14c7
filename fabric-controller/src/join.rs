//! Hosts join with one-time tokens and renew their certificates (issue 16).
//!
//! A token is `fabric-join.<id>.<secret>`: `id` (16 hex) names its record, stored under
//! `join-tokens/<id>`, which keeps only the SHA-256 of `secret` (64 hex), the host name the
//! token is for, its expiry and, once used, when. A token is accepted once: the record is
//! marked used, with a compare on its revision, and that is durable before the certificate is
//! returned, so no crash or race lets one token yield two certificates. At most
//! [`MAX_JOIN_TOKENS`] records exist at once (used ones count until they expire); expired
//! ones are removed whenever tokens are created, listed or presented. A token lives at most
//! [`MAX_TOKEN_TTL`].
//!
//! Certificates are signed with the cluster CA's key, read from the controller's TLS
//! directory (`ca-key.pem`, where `fabricctl pki init` writes it) at each issue; the
//! identity is always `host/<the token's name>` (join) or the caller's own (renewal), never a
//! name from the CSR.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use fabric_proto::tls::{self, Identity};
use fabric_proto::v1::{EventKind, JoinToken};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::controller::{unavailable, Controller};
use crate::store::{Compare, Txn, TxnOutcome};

/// What every token starts with.
pub const TOKEN_PREFIX: &str = "fabric-join";
/// Store keys of join tokens.
pub const TOKEN_KEY_PREFIX: &str = "join-tokens/";
/// Token records at once (used ones count until they expire).
pub const MAX_JOIN_TOKENS: usize = 256;
/// The longest a token may be valid.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);
/// A token's validity when the request gives none.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The default lifetime of the certificates the controller issues to hosts.
pub const DEFAULT_HOST_CERT_LIFETIME: Duration = Duration::from_secs(86_400);

const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

fn token_key(id: &str) -> String {
    format!("{TOKEN_KEY_PREFIX}{id}")
}

/// The id and secret of a token's text, or why it is not a token. Only the exact form is
/// accepted: `fabric-join.` + 16 lower-case hex + `.` + 64 lower-case hex.
pub fn parse_token(text: &str) -> Result<(&str, &str), String> {
    let bad = || format!("not a join token (expected {TOKEN_PREFIX}.<id>.<secret>)");
    let rest = text
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(bad)?;
    let (id, secret) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(id, ID_HEX) || !hex(secret, SECRET_HEX) {
        return Err(bad());
    }
    Ok((id, secret))
}

/// Refused joins (a bad, spent, expired or unknown token) answered in a burst, and per
/// second after it, across all callers: beyond, JoinHost answers RESOURCE_EXHAUSTED before
/// reading the store or logging, so a flood of guesses costs neither (nor holds up the
/// join-token lock real joins take).
pub const REFUSED_JOIN_BURST: f64 = 20.0;
pub const REFUSED_JOINS_PER_SECOND: f64 = 5.0;

/// The token bucket of refused joins.
#[derive(Debug)]
pub struct RefusedJoins {
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl Default for RefusedJoins {
    fn default() -> RefusedJoins {
        RefusedJoins {
            state: std::sync::Mutex::new((REFUSED_JOIN_BURST, std::time::Instant::now())),
        }
    }
}

impl RefusedJoins {
    fn refill(state: &mut (f64, std::time::Instant)) {
        let now = std::time::Instant::now();
        let earned = now.duration_since(state.1).as_secs_f64() * REFUSED_JOINS_PER_SECOND;
        state.0 = (state.0 + earned).min(REFUSED_JOIN_BURST);
        state.1 = now;
    }

    /// Whether another refusal may be answered in full now.
    pub fn has_room(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::refill(&mut state);
        state.0 >= 1.0
    }

    /// Counts one refusal.
    pub fn spend(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::refill(&mut state);
        state.0 = (state.0 - 1.0).max(0.0);
    }
}

/// The most a certificate is back-dated (its notBefore before its issue), here and by
/// `fabricctl pki issue`: for clocks a little apart.
pub const MAX_BACKDATE: Duration = Duration::from_secs(60);

/// The store keys of the join tokens made for host `name`.
pub fn token_keys_of(store: &dyn crate::store::Store, name: &str) -> Result<Vec<String>, String> {
    let (tokens, _) = store.list(TOKEN_KEY_PREFIX).map_err(|e| e.to_string())?;
    Ok(tokens
        .into_iter()
        .filter(|kv| {
            serde_json::from_slice::<TokenRecord>(&kv.value).is_ok_and(|r| r.host_name == name)
        })
        .map(|kv| kv.key)
        .collect())
}

/// The SHA-256 of a token's secret, as stored.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `secret` is the one whose hash is `stored`, compared in constant time.
pub fn secret_matches(secret: &str, stored: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let hash = secret_hash(secret);
    stored.len() == hash.len() && bool::from(hash.as_slice().ct_eq(stored))
}

/// A token's stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub host_name: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub created_by: String,
    /// Unix seconds; None while unused.
    pub used_at: Option<u64>,
}

impl TokenRecord {
    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    fn info(&self, id: &str) -> JoinToken {
        let ts = |s: u64| prost_types::Timestamp {
            seconds: s.min(i64::MAX as u64) as i64,
            nanos: 0,
        };
        JoinToken {
            id: id.to_string(),
            host_name: self.host_name.clone(),
            expires_at: Some(ts(self.expires_at)),
            created_by: self.created_by.clone(),
            used_at: self.used_at.map(ts),
        }
    }
}

/// A token's validity from a request's `ttl_seconds` (0: the default).
pub fn token_ttl(ttl_seconds: u64) -> Result<Duration, String> {
    match ttl_seconds {
        0 => Ok(DEFAULT_TOKEN_TTL),
        s if s <= MAX_TOKEN_TTL.as_secs() => Ok(Duration::from_secs(s)),
        s => Err(format!(
            "ttl {s} s: at most {} s (7 days)",
            MAX_TOKEN_TTL.as_secs()
        )),
    }
}

fn unix_now() -> u64 {
    fabric_proto::clock::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_hex(bytes: usize) -> Result<String, Status> {
    let mut buf = vec![0u8; bytes];
    tls::random_bytes(&mut buf).map_err(Status::internal)?;
    Ok(hex::encode(buf))
}

/// What the controller needs to sign hosts' certificates.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// The controller's TLS directory: `ca.pem` and, to sign, `ca-key.pem`.
    pub tls_dir: PathBuf,
    pub cluster: String,
    /// How long an issued host certificate is valid.
    pub host_cert_lifetime: Duration,
}

impl Issuer {
    /// A certificate for `host/name` and the key of `csr_pem`.
    pub fn issue_host(
        &self,
        name: &str,
        csr_pem: &str,
        not_before: Option<u64>,
    ) -> Result<String, Status> {
        if csr_pem.len() > tls::MAX_CSR_PEM {
            return Err(Status::invalid_argument(format!(
                "the certificate signing request has {} bytes; at most {}",
                csr_pem.len(),
                tls::MAX_CSR_PEM
            )));
        }
        let key_path = self.tls_dir.join(tls::CA_KEY_FILE);
        let cert_path = self.tls_dir.join(tls::CA_FILE);
        let key_pem = match std::fs::read_to_string(&key_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::failed_precondition(format!(
                    "the controller cannot sign certificates: {} is missing (put the CA key fabricctl pki init made there)",
                    key_path.display()
                )))
            }
            Err(e) => {
                return Err(Status::failed_precondition(format!(
                    "the controller cannot read {}: {e}",
                    key_path.display()
                )))
            }
        };
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| {
            Status::failed_precondition(format!("cannot read {}: {e}", cert_path.display()))
        })?;
        let ca = tls::Issued { cert_pem, key_pem };
        // A little back-dating covers clocks a bit apart, without eating a short lifetime,
        // and never to before the host was reinstated (certificates from before are refused).
        let mut backdate = (self.host_cert_lifetime / 10).min(MAX_BACKDATE);
        if let Some(at) = not_before {
            backdate = backdate.min(Duration::from_secs(unix_now().saturating_sub(at)));
        }
        let identity = Identity::Host(name.to_string());
        tls::issue_for_csr(
            &ca,
            &self.cluster,
            &tls::Request {
                identity: &identity,
                dns_names: &[],
                ips: &[],
                backdate,
                lifetime: self.host_cert_lifetime + backdate,
            },
            csr_pem,
        )
        .map_err(|e| {
            if e.starts_with("certificate signing request") {
                Status::invalid_argument(e)
            } else {
                tracing::error!(error = %e, "cannot sign a host certificate");
                Status::internal(format!("cannot sign: {e}"))
            }
        })
    }
}

impl Controller {
    /// From now on the controller signs hosts' certificates with `issuer`.
    pub fn set_issuer(&self, issuer: Issuer) {
        let _ = self.issuer.set(issuer);
    }

    fn issuer(&self) -> Result<&Issuer, Status> {
        self.issuer.get().ok_or_else(|| {
            Status::failed_precondition(
                "the controller has no CA: it was started without --tls-dir",
            )
        })
    }

    /// The stored tokens, expired ones removed from the store on the way.
    async fn live_tokens(&self) -> Result<Vec<(String, TokenRecord)>, Status> {
        let store = self.store.clone();
        let (records, _) = tokio::task::spawn_blocking(move || store.list(TOKEN_KEY_PREFIX))
            .await
            .map_err(|e| Status::internal(format!("store task: {e}")))?
            .map_err(unavailable)?;
        let now = unix_now();
        let mut live = Vec::new();
        let mut sweep = Txn::new();
        for kv in records {
            let id = kv.key.trim_start_matches(TOKEN_KEY_PREFIX).to_string();
            match serde_json::from_slice::<TokenRecord>(&kv.value) {
                Ok(record) if !record.expired(now) => live.push((id, record)),
                Ok(_) => sweep = sweep.delete(kv.key),
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "an unreadable join token record: removed");
                    sweep = sweep.delete(kv.key);
                }
            }
        }
        if !sweep.ops.is_empty() {
            let swept = sweep.ops.len();
            self.commit(sweep).await?;
            tracing::info!(swept, "expired join tokens removed");
        }
        Ok(live)
    }

    /// Makes a join token for host `host_name`, valid `ttl_seconds` (0: an hour): its text
    /// (shown once) and its record.
    pub async fn create_join_token(
        &self,
        host_name: &str,
        ttl_seconds: u64,
        by: &str,
    ) -> Result<(String, JoinToken), Status> {
        tls::check_name("host", host_name).map_err(Status::invalid_argument)?;
        let ttl = token_ttl(ttl_seconds).map_err(Status::invalid_argument)?;
        if self.is_revoked(host_name) {
            return Err(Status::failed_precondition(format!(
                "host/{host_name} is revoked: reinstate it before it may join"
            )));
        }
        let _serialized = self.join_tokens.lock().await;
        let live = self.live_tokens().await?;
        if live.len() >= MAX_JOIN_TOKENS {
            return Err(Status::resource_exhausted(format!(
                "{} join tokens exist, the most allowed: wait for some to expire",
                live.len()
            )));
        }
        let id = random_hex(ID_HEX / 2)?;
        let secret = random_hex(SECRET_HEX / 2)?;
        let record = TokenRecord {
            host_name: host_name.to_string(),
            secret_sha256: hex::encode(secret_hash(&secret)),
            expires_at: unix_now() + ttl.as_secs(),
            created_by: by.to_string(),
            used_at: None,
        };
        let value = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
        match self
            .commit(
                Txn::new()
                    .when(Compare::Absent(token_key(&id)))
                    .put(token_key(&id), value),
            )
            .await?
        {
            TxnOutcome::Committed(_) => {}
            TxnOutcome::Failed(_) => {
                return Err(Status::aborted("a token id was drawn twice: try again"))
            }
        }
        tracing::info!(token_id = %id, host = host_name, by, ttl_s = ttl.as_secs(), "join token created");
        Ok((format!("{TOKEN_PREFIX}.{id}.{secret}"), record.info(&id)))
    }

    /// The join tokens not yet expired, without secrets, by id.
    pub async fn list_join_tokens(&self) -> Result<Vec<JoinToken>, Status> {
        let _serialized = self.join_tokens.lock().await;
        let mut tokens: Vec<JoinToken> = self
            .live_tokens()
            .await?
            .iter()
            .map(|(id, record)| record.info(id))
            .collect();
        tokens.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(tokens)
    }

    /// Spends `token` for a certificate of `host/<its host>` for the key of `csr_pem`;
    /// `host_name` (the name the agent will register as) must be the token's host.
    pub async fn join_host(
        &self,
        token: &str,
        host_name: &str,
        csr_pem: &str,
    ) -> Result<String, Status> {
        if token.is_empty() {
            return Err(Status::unauthenticated(
                "a join token is required (fabricctl host token create)",
            ));
        }
        if !self.refused_joins.has_room() {
            return Err(Status::resource_exhausted(format!(
                "too many refused joins: at most {REFUSED_JOINS_PER_SECOND} a second after a burst of {REFUSED_JOIN_BURST}; retry in a few seconds"
            )));
        }
        let (id, secret) = parse_token(token).map_err(|e| {
            self.refused_joins.spend();
            Status::unauthenticated(e)
        })?;
        tls::check_name("host", host_name).map_err(Status::invalid_argument)?;
        let issuer = self.issuer()?;
        let _serialized = self.join_tokens.lock().await;
        let key = token_key(id);
        let store = self.store.clone();
        let lookup = key.clone();
        let stored = tokio::task::spawn_blocking(move || store.get(&lookup))
            .await
            .map_err(|e| Status::internal(format!("store task: {e}")))?
            .map_err(unavailable)?;
        let refused = |why: &str| {
            self.refused_joins.spend();
            tracing::warn!(token_id = id, host = host_name, why, "join refused");
            Status::unauthenticated(format!("join token refused: {why}"))
        };
        let Some(kv) = stored else {
            return Err(refused("unknown token or wrong secret"));
        };
        let mut record: TokenRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| Status::internal(format!("{key}: {e}")))?;
        let stored_hash = hex::decode(&record.secret_sha256).unwrap_or_default();
        if !secret_matches(secret, &stored_hash) {
            return Err(refused("unknown token or wrong secret"));
        }
        let now = unix_now();
        if let Some(used) = record.used_at {
            return Err(refused(&format!(
                "already used, {} s ago",
                now.saturating_sub(used)
            )));
        }
        if record.expired(now) {
            self.commit(Txn::new().delete(key.clone())).await?;
            return Err(refused(&format!(
                "expired {} s ago",
                now.saturating_sub(record.expires_at)
            )));
        }
        if record.host_name != host_name {
            tracing::warn!(token_id = id, token_host = %record.host_name, host = host_name, "join with another host's token refused");
            return Err(Status::permission_denied(format!(
                "the join token is for host {:?}, not {host_name:?}",
                record.host_name
            )));
        }
        if self.is_revoked(host_name) {
            return Err(Status::permission_denied(format!(
                "host/{host_name} is revoked"
            )));
        }
        // Signed before the token is spent (a bad CSR spends nothing), returned only once it
        // is spent durably.
        let certificate = issuer.issue_host(host_name, csr_pem, self.reinstated_at(host_name))?;
        record.used_at = Some(now);
        let value = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
        match self
            .commit(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .put(key, value),
            )
            .await?
        {
            TxnOutcome::Committed(_) => {}
            TxnOutcome::Failed(_) => return Err(refused("already used")),
        }
        self.events.emit(fabric_proto::v1::Event {
            kind: EventKind::HostIdentity as i32,
            message: format!("host/{host_name} joined with token {id}"),
            ..Default::default()
        });
        tracing::info!(
            token_id = id,
            host = host_name,
            "host joined: certificate issued"
        );
        Ok(certificate)
    }

    /// A new certificate of the caller's own identity, for the key of `csr_pem`.
    pub fn renew_certificate(&self, caller: &Identity, csr_pem: &str) -> Result<String, Status> {
        let Identity::Host(name) = caller else {
            return Err(Status::permission_denied(format!(
                "{caller} may not renew a host certificate: a host renews its own"
            )));
        };
        if self.is_revoked(name) {
            return Err(Status::permission_denied(format!("host/{name} is revoked")));
        }
        let issuer = self.issuer()?;
        let spacing = renewal_spacing(issuer.host_cert_lifetime);
        {
            let mut renewed = self.renewed.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            if let Some(last) = renewed.get(name.as_str()) {
                let since = now.duration_since(*last);
                if since < spacing {
                    return Err(Status::resource_exhausted(format!(
                        "host/{name} renewed its certificate {} ms ago: at most once per {} ms",
                        since.as_millis(),
                        spacing.as_millis()
                    )));
                }
            }
            // Forget hosts that have not renewed for a long time (bounded by host names).
            renewed.retain(|_, at| now.duration_since(*at) < issuer.host_cert_lifetime * 2);
            renewed.insert(name.clone(), now);
        }
        let certificate = issuer.issue_host(name, csr_pem, self.reinstated_at(name))?;
        tracing::info!(host = %name, "host certificate renewed");
        Ok(certificate)
    }
}

/// The shortest time between two renewals of one host: a tenth of the certificates'
/// lifetime, at most a minute (agents renew at two thirds of it).
pub fn renewal_spacing(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn only_the_exact_token_form_parses() {
        let good = format!("fabric-join.0123456789abcdef.{SECRET}");
        assert_eq!(parse_token(&good), Ok(("0123456789abcdef", SECRET)));
        for bad in [
            String::new(),
            "fabric-join".into(),
            format!("fabric-join..{SECRET}"),
            format!("fabric-join.0123456789abcde.{SECRET}"),
            format!("fabric-join.0123456789ABCDEF.{SECRET}"),
            format!("fabric-join.0123456789abcdef.{SECRET}0"),
            format!("fabric-join.0123456789abcdef.{}", &SECRET[1..]),
            format!("fabric-join.0123456789abcdef.{SECRET}.x"),
            format!("fabric-joinx0123456789abcdef.{SECRET}"),
            format!("other.0123456789abcdef.{SECRET}"),
            format!("fabric-join.0123456789abcdef/{SECRET}"),
            format!("fabric-join.0123456789abcdeg.{SECRET}"),
        ] {
            assert!(parse_token(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_secret_is_checked_against_its_hash() {
        let stored = secret_hash(SECRET);
        assert!(secret_matches(SECRET, &stored));
        let mut other = SECRET.to_string();
        other.replace_range(63.., "0");
        assert!(!secret_matches(&other, &stored));
        assert!(!secret_matches(SECRET, &stored[..31]));
        assert!(!secret_matches(SECRET, &[]));
        // The hash, not the secret, is what is kept.
        assert_ne!(hex::encode(stored), SECRET);
    }

    #[test]
    fn refused_joins_are_answered_in_a_burst_then_at_a_rate() {
        let bucket = RefusedJoins::default();
        for _ in 0..REFUSED_JOIN_BURST as usize {
            assert!(bucket.has_room());
            bucket.spend();
        }
        assert!(!bucket.has_room(), "the burst is spent");
        std::thread::sleep(Duration::from_secs_f64(1.5 / REFUSED_JOINS_PER_SECOND));
        assert!(bucket.has_room(), "the rate refills it");
    }

    #[test]
    fn renewals_are_spaced() {
        assert_eq!(
            renewal_spacing(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        assert_eq!(
            renewal_spacing(Duration::from_secs(8)),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn tokens_expire_and_their_ttl_is_bounded() {
        let record = TokenRecord {
            host_name: "h1".into(),
            secret_sha256: String::new(),
            expires_at: 1000,
            created_by: "local-root".into(),
            used_at: None,
        };
        assert!(!record.expired(999));
        assert!(record.expired(1000));
        assert!(record.expired(5000));
        assert_eq!(token_ttl(0), Ok(DEFAULT_TOKEN_TTL));
        assert_eq!(token_ttl(1), Ok(Duration::from_secs(1)));
        assert_eq!(token_ttl(7 * 86_400), Ok(MAX_TOKEN_TTL));
        assert!(token_ttl(7 * 86_400 + 1).is_err());
        assert!(token_ttl(u64::MAX).is_err());
        let info = record.info("abc");
        assert_eq!(info.host_name, "h1");
        assert_eq!(info.expires_at.map(|t| t.seconds), Some(1000));
        assert!(info.used_at.is_none());
    }
}
