//! Mutual TLS between Fabric's processes: the cluster's certificate authority, the identities
//! its certificates carry, the servers' accepting side and the clients' configuration.
//!
//! Every certificate the cluster CA issues carries exactly one identity, as a URI SAN:
//! `spiffe://<cluster>/controller`, `spiffe://<cluster>/host/<name>` or
//! `spiffe://<cluster>/user/<name>` ([`Identity`]). A server learns its caller's identity from
//! the certificate the caller presented in the handshake ([`PeerInfo`], in every request's
//! extensions); a caller on a Unix socket is [`Identity::LocalRoot`] when it runs as root.
//! The controller's certificate also carries the DNS name [`CONTROLLER_DNS_NAME`] (and any the
//! operator gives): clients verify that name, and no host or user certificate carries a DNS
//! name, so none of them can pass for the controller.
//!
//! Servers read their certificate again when its file changes ([`ReloadingCert`]): renewing
//! one needs no restart. The one crypto provider, ring, is installed by [`install_provider`].

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// The DNS name every controller certificate carries and every client verifies.
pub const CONTROLLER_DNS_NAME: &str = "fabric-controller";

/// The DNS name a host's certificate carries for its Agent service: `<name>.host.fabric`.
/// Clients of that service verify it, so one host's certificate cannot pass for another's
/// (nor for the controller's).
pub fn host_dns_name(name: &str) -> String {
    format!("{name}.host.fabric")
}

/// The CA certificate's file in a TLS directory.
pub const CA_FILE: &str = "ca.pem";
/// The CA's private key, in the directory `fabricctl pki init` writes (kept by the admin,
/// never given to hosts).
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once on one listener; a connection beyond them is closed at
/// once (never left in the kernel's accept queue, where it would hold up the clients behind
/// it).
pub const MAX_HANDSHAKES: usize = 128;
/// Handshakes in progress at once from one IP address; more from it are closed at once.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;
/// Established connections with a client certificate, on one listener and from one address:
/// a connection beyond either is closed after its handshake (the file descriptors a
/// controller has stay well below its limit whatever its clients do).
pub const MAX_CONNECTIONS: usize = 4096;
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
/// The same for connections without a client certificate (hosts joining): far fewer, and
/// each closed [`ANONYMOUS_LIFETIME`] after its handshake, so that idle ones cannot hold the
/// joins' slots.
pub const MAX_ANONYMOUS_CONNECTIONS: usize = 64;
pub const MAX_ANONYMOUS_PER_ADDRESS: usize = 2;
pub const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(30);

/// The longest cluster or principal name, bytes.
pub const MAX_NAME: usize = 63;

/// The crypto provider: ring. rustls now marks ring's provider deprecated because it has no
/// post-quantum key exchange; aws-lc-rs has one but needs cmake and a C toolchain at build
/// time, and tonic's client TLS here is built on ring (`tls-ring`). Moving both to aws-lc-rs
/// is one change in this function and the workspace features.
#[allow(deprecated)]
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Installs [`provider`] as the process's rustls crypto provider (once; later calls do
/// nothing).
pub fn install_provider() {
    let _ = provider().install_default();
}

/// Who a caller is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The fabric controller.
    Controller,
    /// The agent of host `name`.
    Host(String),
    /// An operator or program, `name`.
    User(String),
    /// Root on this machine, over a Unix socket.
    LocalRoot,
    /// A TLS caller that presented no client certificate: accepted only by a server that
    /// allows it (the controller, for HostLink.JoinHost alone; every policy refuses it the
    /// rest, UNAUTHENTICATED).
    Anonymous,
}

impl Identity {
    /// The certificate URI of this identity in `cluster` (none for [`Identity::LocalRoot`]).
    pub fn uri(&self, cluster: &str) -> Option<String> {
        match self {
            Identity::Controller => Some(format!("spiffe://{cluster}/controller")),
            Identity::Host(name) => Some(format!("spiffe://{cluster}/host/{name}")),
            Identity::User(name) => Some(format!("spiffe://{cluster}/user/{name}")),
            Identity::LocalRoot | Identity::Anonymous => None,
        }
    }

    /// The identity a URI names in `cluster`.
    pub fn from_uri(uri: &str, cluster: &str) -> Result<Identity, String> {
        let prefix = format!("spiffe://{cluster}/");
        let rest = uri
            .strip_prefix(&prefix)
            .ok_or_else(|| format!("{uri:?} is not an identity of cluster {cluster:?}"))?;
        match rest.split_once('/') {
            None if rest == "controller" => Ok(Identity::Controller),
            Some(("host", name)) => check_name("host", name).map(|()| Identity::Host(name.into())),
            Some(("user", name)) => check_name("user", name).map(|()| Identity::User(name.into())),
            _ => Err(format!("{uri:?}: not controller, host/NAME or user/NAME")),
        }
    }

    /// The one identity a certificate (DER) carries for `cluster`: refused when it has no
    /// identity URI or more than one.
    pub fn from_certificate(der: &[u8], cluster: &str) -> Result<Identity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
        match uris.as_slice() {
            [uri] => Identity::from_uri(uri, cluster),
            [] => Err("the certificate carries no identity (URI SAN)".into()),
            more => Err(format!(
                "the certificate carries {} identities; one is allowed",
                more.len()
            )),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Controller => f.write_str("controller"),
            Identity::Host(name) => write!(f, "host/{name}"),
            Identity::User(name) => write!(f, "user/{name}"),
            Identity::LocalRoot => f.write_str("local-root"),
            Identity::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// A cluster, host or user name: 1..=63 of `[a-z0-9-]`, starting with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?}: 1..=63 of a-z, 0-9 and '-', not starting with '-'"
        ))
    }
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key never goes to a log.
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn rcgen_error(e: rcgen::Error) -> String {
    format!("certificate: {e}")
}

/// A new cluster CA for `cluster`, valid `lifetime` from now.
pub fn new_ca(cluster: &str, lifetime: Duration) -> Result<Issued, String> {
    check_name("cluster", cluster)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("Fabric CA {cluster}"));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, Duration::ZERO, lifetime);
    let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.self_signed(&key).map_err(rcgen_error)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// What a certificate is issued for.
pub struct Request<'a> {
    pub identity: &'a Identity,
    /// Extra DNS names (a controller's; [`CONTROLLER_DNS_NAME`] is always added for it).
    pub dns_names: &'a [String],
    /// IP addresses it is reached at.
    pub ips: &'a [IpAddr],
    /// Valid from `backdate` ago (tests make expired certificates with it) ...
    pub backdate: Duration,
    /// ... for this long.
    pub lifetime: Duration,
}

/// A certificate for `request.identity`, signed by the CA `ca`, with a new key.
pub fn issue(ca: &Issued, cluster: &str, request: &Request<'_>) -> Result<Issued, String> {
    let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
    let cert = sign(ca, cluster, request, &key)?;
    Ok(Issued {
        cert_pem: cert,
        key_pem: key.serialize_pem(),
    })
}

/// A certificate for `request.identity` and the public key of `csr_pem` (a CSR whose own
/// names are ignored: the identity is the CA's choice, not the requester's).
pub fn issue_for_csr(
    ca: &Issued,
    cluster: &str,
    request: &Request<'_>,
    csr_pem: &str,
) -> Result<String, String> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| format!("certificate signing request: {e}"))?;
    sign(ca, cluster, request, &csr.public_key)
}

fn sign(
    ca: &Issued,
    cluster: &str,
    request: &Request<'_>,
    public_key: &impl rcgen::PublicKeyData,
) -> Result<String, String> {
    let uri = request
        .identity
        .uri(cluster)
        .ok_or("local-root and anonymous have no certificate")?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, request.identity.to_string());
    let mut sans = vec![rcgen::SanType::URI(
        uri.try_into().map_err(|e| format!("identity URI: {e}"))?,
    )];
    if *request.identity == Identity::Controller {
        for name in
            std::iter::once(CONTROLLER_DNS_NAME).chain(request.dns_names.iter().map(String::as_str))
        {
            sans.push(rcgen::SanType::DnsName(
                name.try_into()
                    .map_err(|e| format!("DNS name {name:?}: {e}"))?,
            ));
        }
        sans.extend(request.ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
    }
    if let Identity::Host(name) = request.identity {
        let dns = host_dns_name(name);
        sans.push(rcgen::SanType::DnsName(
            dns.as_str()
                .try_into()
                .map_err(|e| format!("DNS name {dns:?}: {e}"))?,
        ));
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, request.backdate, request.lifetime);
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem).map_err(rcgen_error)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(rcgen_error)?;
    let cert = params.signed_by(public_key, &issuer).map_err(rcgen_error)?;
    Ok(cert.pem())
}

fn set_validity(params: &mut rcgen::CertificateParams, backdate: Duration, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    let from = now - backdate;
    params.not_before = from;
    params.not_after = from + lifetime;
    // A serial number of 16 random bytes (positive): no two certificates share one.
    let mut serial = [0u8; 16];
    let _ = provider().secure_random.fill(&mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
}

/// Writes `contents` to `path` readable by its owner only (0600), replacing any file there
/// through a rename, so a reader never sees half of it.
pub fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The files of one identity in a TLS directory: `ca.pem`, `<name>.pem`, `<name>-key.pem`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files of `name` (e.g. "controller", "host", "admin") in `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join(CA_FILE),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        }
    }

    fn read(path: &Path) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The cluster name, from the CA certificate's common name ("Fabric CA <cluster>").
    pub fn cluster(&self) -> Result<String, String> {
        let pem = Self::read(&self.ca)?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("{}: {e}", self.ca.display()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("{}: {e}", self.ca.display()))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default();
        let cluster = cn
            .strip_prefix("Fabric CA ")
            .ok_or_else(|| format!("{}: not a Fabric cluster CA ({cn:?})", self.ca.display()))?;
        check_name("cluster", cluster)?;
        Ok(cluster.to_string())
    }

    /// The identity of this directory's certificate.
    pub fn identity(&self) -> Result<Identity, String> {
        let pem = Self::read(&self.cert)?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("{}: {e}", self.cert.display()))?;
        Identity::from_certificate(&der, &self.cluster()?)
    }

    /// A tonic client configuration: this identity's certificate, the cluster CA as the
    /// only root, and the controller's DNS name verified.
    pub fn client_config(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        self.client_config_for(&Identity::Controller)
    }

    /// A tonic client configuration for a call to `server`: the controller, or host NAME's
    /// Agent service (its certificate's [`host_dns_name`] verified).
    pub fn client_config_for(
        &self,
        server: &Identity,
    ) -> Result<tonic::transport::ClientTlsConfig, String> {
        let domain = match server {
            Identity::Controller => CONTROLLER_DNS_NAME.to_string(),
            Identity::Host(name) => host_dns_name(name),
            other => return Err(format!("{other} serves nothing over TLS")),
        };
        install_provider();
        let ca = Self::read(&self.ca)?;
        let cert = Self::read(&self.cert)?;
        let key = Self::read(&self.key)?;
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .domain_name(domain))
    }

    /// A client configuration for a caller without a certificate yet (an agent joining
    /// with a token): the cluster CA as the only root and the controller's DNS name verified.
    pub fn anonymous_client_config(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        install_provider();
        let ca = Self::read(&self.ca)?;
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(CONTROLLER_DNS_NAME))
    }

    /// A server configuration: this identity's certificate (read again when its file
    /// changes), and a client certificate from the cluster CA required of every caller.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        self.server_config_with(false)
    }

    /// [`server_config`](Self::server_config), but a caller may also come without a client
    /// certificate: it is then [`Identity::Anonymous`], which the authorization policy must
    /// refuse but for the calls meant for it. A certificate that is presented must still be
    /// the cluster CA's and valid: another CA's fails the handshake as before.
    pub fn server_config_allowing_anonymous(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        self.server_config_with(true)
    }

    fn server_config_with(&self, anonymous: bool) -> Result<Arc<rustls::ServerConfig>, String> {
        install_provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca)
            .map_err(|e| format!("{}: {e}", self.ca.display()))?
        {
            let cert = cert.map_err(|e| format!("{}: {e}", self.ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", self.ca.display()))?;
        }
        let builder = WebPkiClientVerifier::builder(Arc::new(roots));
        let builder = if anonymous {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        let verifier = builder
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        let resolver = ReloadingCert::load(&self.cert, &self.key)?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    // The error names the file, never its contents.
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|_| format!("{}: not a readable PEM private key", key.display()))?;
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(Arc::new(certified))
}

/// A server certificate read again from its files when they change (looked at once a second
/// at most, at a handshake): a renewed certificate is served without a restart. A file that
/// cannot be read keeps the last good certificate in use, with an error in the log.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    modified: Option<SystemTime>,
    checked: Instant,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    pub fn load(cert: &Path, key: &Path) -> Result<ReloadingCert, String> {
        let loaded = load_certified_key(cert, key)?;
        Ok(ReloadingCert {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: Mutex::new(Loaded {
                key: loaded,
                modified: modified(cert).max(modified(key)),
                checked: Instant::now(),
            }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= Duration::from_secs(1) {
            state.checked = Instant::now();
            let now = modified(&self.cert).max(modified(&self.key));
            if now != state.modified {
                match load_certified_key(&self.cert, &self.key) {
                    Ok(key) => {
                        tracing::info!(cert = %self.cert.display(), "server certificate reloaded");
                        state.key = key;
                        state.modified = now;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "server certificate not reloaded: the previous one stays")
                    }
                }
            }
        }
        state.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Who is at the other end of a connection: what every request's extensions carry (tonic
/// puts a connection's `ConnectInfo` there).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub identity: Identity,
    /// When the client certificate expires (None: no certificate). A connection outlives
    /// the handshake that checked it: past this, its calls are refused (UNAUTHENTICATED),
    /// so a host whose certificate was not renewed cannot go on over an old connection.
    pub expires: Option<SystemTime>,
    /// When the client certificate was issued (its notBefore; None: no certificate): a host
    /// reinstated after a revocation is served only with certificates issued since.
    pub issued: Option<SystemTime>,
}

/// An accepted connection whose client presented a certificate of the cluster CA with one
/// identity.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    /// Its places among the listener's connections, given back when it closes.
    _slots: (tokio::sync::OwnedSemaphorePermit, AddressSlot),
    /// A connection without a certificate ends here ([`ANONYMOUS_LIFETIME`]).
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for TlsConnection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.deadline.as_mut() {
            if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
                return std::task::Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "a connection without a client certificate lives 30 s",
                )));
            }
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConnection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The mutual-TLS connections of `listener`, for `Server::serve_with_incoming`: each
/// handshake runs on its own task (at most [`MAX_HANDSHAKES`] at once, each within
/// [`HANDSHAKE_TIMEOUT`]), so a client that stalls its handshake holds up no other. A client
/// without a certificate of the cluster CA, with an expired one, or with one that carries no
/// identity of `cluster` (or several) is dropped, with a line in the log. A client with no
/// certificate at all, which only a configuration made by
/// [`TlsFiles::server_config_allowing_anonymous`] lets through the handshake, is
/// [`Identity::Anonymous`].
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    cluster: String,
) -> ReceiverStream<io::Result<TlsConnection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let per_address: AddressTable = Arc::default();
    let established = Arc::new(ConnectionLimits {
        certified: (
            Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            Arc::default(),
        ),
        anonymous: (
            Arc::new(tokio::sync::Semaphore::new(MAX_ANONYMOUS_CONNECTIONS)),
            Arc::default(),
        ),
    });
    tokio::spawn(async move {
        let mut last_accept_warning: Option<tokio::time::Instant> = None;
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: one line per 10 s, not per try.
                    if last_accept_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "accept (repeats are not logged for 10 s)");
                        last_accept_warning = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            // Over either bound, the connection is closed now (dropped).
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(%remote, "too many TLS handshakes in progress: closed");
                continue;
            };
            let Some(slot) =
                AddressSlot::take(&per_address, remote.ip(), MAX_HANDSHAKES_PER_ADDRESS)
            else {
                tracing::debug!(%remote, "too many TLS handshakes from this address: closed");
                continue;
            };
            let (acceptor, tx, cluster) = (acceptor.clone(), tx.clone(), cluster.clone());
            let established = established.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _slot = slot;
                let _ = tcp.set_nodelay(true);
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let certificate = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first());
                let identity = match certificate {
                    Some(cert) => Identity::from_certificate(cert, &cluster),
                    // The verifier let it through: the server allows callers without one.
                    None => Ok(Identity::Anonymous),
                };
                let (issued, expires) = certificate
                    .and_then(|cert| validity_of_der(cert))
                    .map_or((None, None), |(from, to)| (Some(from), Some(to)));
                match identity {
                    Ok(identity) => {
                        let anonymous = identity == Identity::Anonymous;
                        let Some(slots) = established.take(anonymous, remote.ip()) else {
                            tracing::debug!(%remote, anonymous, "too many connections: closed");
                            return;
                        };
                        let deadline =
                            anonymous.then(|| Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME)));
                        let info = PeerInfo {
                            remote: Some(remote),
                            identity,
                            expires,
                            issued,
                        };
                        let connection = TlsConnection {
                            stream,
                            info,
                            _slots: slots,
                            deadline,
                        };
                        let _ = tx.send(Ok(connection)).await;
                    }
                    Err(e) => tracing::warn!(%remote, error = %e, "client certificate refused"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A certificate's notBefore and notAfter (DER).
fn validity_of_der(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let time = |t: x509_parser::time::ASN1Time| {
        u64::try_from(t.timestamp())
            .ok()
            .map(|s| std::time::UNIX_EPOCH + Duration::from_secs(s))
    };
    Some((
        time(cert.validity().not_before)?,
        time(cert.validity().not_after)?,
    ))
}

type AddressTable = Arc<Mutex<std::collections::HashMap<IpAddr, usize>>>;

/// A listener's established connections: those with a client certificate and those
/// without, each bounded in all and per address.
struct ConnectionLimits {
    certified: (Arc<tokio::sync::Semaphore>, AddressTable),
    anonymous: (Arc<tokio::sync::Semaphore>, AddressTable),
}

impl ConnectionLimits {
    fn take(
        &self,
        anonymous: bool,
        address: IpAddr,
    ) -> Option<(tokio::sync::OwnedSemaphorePermit, AddressSlot)> {
        let ((all, per_address), limit) = if anonymous {
            (&self.anonymous, MAX_ANONYMOUS_PER_ADDRESS)
        } else {
            (&self.certified, MAX_CONNECTIONS_PER_ADDRESS)
        };
        let permit = all.clone().try_acquire_owned().ok()?;
        let slot = AddressSlot::take(per_address, address, limit)?;
        Some((permit, slot))
    }
}

/// One of an address's slots in a table (handshakes, connections), given back on drop.
struct AddressSlot {
    table: AddressTable,
    address: IpAddr,
}

impl AddressSlot {
    fn take(table: &AddressTable, address: IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut counts = table.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(address).or_insert(0);
        if *count >= limit {
            if *count == 0 {
                counts.remove(&address);
            }
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: table.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// The caller of a request: the identity of its TLS client certificate, or
/// [`Identity::LocalRoot`] for root on a Unix socket. UNAUTHENTICATED otherwise.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    caller_of(request.extensions())
}

/// [`caller`] from a request's extensions (what tonic puts there for each connection).
pub fn caller_of(extensions: &http::Extensions) -> Result<Identity, tonic::Status> {
    if let Some(peer) = extensions.get::<PeerInfo>() {
        // The real clock, as the handshake's check used.
        if peer.expires.is_some_and(|at| SystemTime::now() >= at) {
            return Err(tonic::Status::unauthenticated(format!(
                "the client certificate of {} has expired: renew it and connect again",
                peer.identity
            )));
        }
        return Ok(peer.identity.clone());
    }
    if let Some(unix) = extensions.get::<tonic::transport::server::UdsConnectInfo>() {
        return match unix.peer_cred.map(|c| c.uid()) {
            Some(0) => Ok(Identity::LocalRoot),
            Some(uid) => Err(tonic::Status::permission_denied(format!(
                "uid {uid} on the Unix socket: only root administers this daemon locally"
            ))),
            None => Err(tonic::Status::unauthenticated(
                "the Unix socket's peer credentials cannot be read",
            )),
        };
    }
    Err(tonic::Status::unauthenticated(
        "no client certificate: every call needs one",
    ))
}

/// Who may call what: given a request's path (`/package.Service/Method`) and its caller,
/// `Ok` or the reason for PERMISSION_DENIED.
pub type Policy = Arc<dyn Fn(&str, &Identity) -> Result<(), String> + Send + Sync>;

/// A tower layer that refuses, before any service sees it, a call whose caller the policy
/// does not allow (PERMISSION_DENIED naming the caller and the method) or whose caller is
/// unknown (UNAUTHENTICATED): deny by default, for every service of a server at once.
/// A check of the caller's certificate beyond its identity (e.g. when it was issued):
/// `Ok` or the reason for PERMISSION_DENIED.
pub type CertificateCheck = Arc<dyn Fn(&PeerInfo) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct AuthorizeLayer {
    policy: Policy,
    check: Option<CertificateCheck>,
}

impl AuthorizeLayer {
    pub fn new(policy: Policy) -> AuthorizeLayer {
        AuthorizeLayer {
            policy,
            check: None,
        }
    }

    /// Also refuses calls whose TLS client certificate `check` refuses.
    pub fn with_certificate_check(mut self, check: CertificateCheck) -> AuthorizeLayer {
        self.check = Some(check);
        self
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            policy: self.policy.clone(),
            check: self.check.clone(),
        }
    }
}

/// The service of [`AuthorizeLayer`].
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    policy: Policy,
    check: Option<CertificateCheck>,
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        // Read in place: no copy of the extensions on every call.
        let verdict = caller_of(request.extensions()).and_then(|identity| {
            (self.policy)(&path, &identity).map_err(|why| match identity {
                Identity::Anonymous => tonic::Status::unauthenticated(format!(
                    "no client certificate: {path} needs one ({why})"
                )),
                _ => tonic::Status::permission_denied(format!(
                    "{identity} may not call {path}: {why}"
                )),
            })
        });
        let verdict = verdict.and_then(|()| {
            let peer = request.extensions().get::<PeerInfo>();
            match (&self.check, peer) {
                (Some(check), Some(peer)) => check(peer).map_err(|why| {
                    tonic::Status::permission_denied(format!(
                        "{} may not call {path}: {why}",
                        peer.identity
                    ))
                }),
                _ => Ok(()),
            }
        });
        match verdict {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                tracing::info!(path, status = %status.message(), "call refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// `bytes` filled from the crypto provider's secure random source.
pub fn random_bytes(bytes: &mut [u8]) -> Result<(), String> {
    provider()
        .secure_random
        .fill(bytes)
        .map_err(|_| "the system's random source failed".to_string())
}

/// A new private key and a certificate signing request for it (PEM, the key first): what an
/// agent sends to join or to renew. The CSR names nobody; the CA decides the identity.
pub fn new_csr() -> Result<(String, String), String> {
    let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
    let params = rcgen::CertificateParams::default();
    let csr = params.serialize_request(&key).map_err(rcgen_error)?;
    Ok((csr.pem().map_err(rcgen_error)?, key.serialize_pem()))
}

/// The identity a certificate (PEM, its first one) carries for `cluster`.
pub fn identity_of_pem(cert_pem: &str, cluster: &str) -> Result<Identity, String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    Identity::from_certificate(&der, cluster)
}

/// The longest certificate signing request a server reads, bytes of PEM.
pub const MAX_CSR_PEM: usize = 16 * 1024;

/// When a certificate (PEM, its first one) becomes valid and when it expires.
pub fn validity(cert_pem: &str) -> Result<(SystemTime, SystemTime), String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let seconds = t.timestamp();
        if seconds >= 0 {
            std::time::UNIX_EPOCH + Duration::from_secs(seconds as u64)
        } else {
            std::time::UNIX_EPOCH
        }
    };
    Ok((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}

/// How long from `now` until a certificate valid from `not_before` to `not_after` is
/// renewed: at two thirds of its lifetime (zero once that point has passed), leaving a third
/// of it for retries when the controller cannot be reached.
pub fn renewal_delay(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Duration {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    if lifetime.is_zero() {
        return Duration::ZERO;
    }
    let renew_at = not_before + lifetime * 2 / 3;
    renew_at.duration_since(now).unwrap_or_default()
}

#[cfg(test)]
mod renewal_tests {
    use super::*;

    #[test]
    fn renewal_comes_at_two_thirds_of_the_lifetime() {
        let start = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(24 * 3600);
        assert_eq!(
            renewal_delay(start, end, start),
            Duration::from_secs(16 * 3600)
        );
        assert_eq!(
            renewal_delay(start, end, start + Duration::from_secs(3600)),
            Duration::from_secs(15 * 3600)
        );
        // Past two thirds, and past the end: at once.
        assert_eq!(
            renewal_delay(start, end, start + Duration::from_secs(20 * 3600)),
            Duration::ZERO
        );
        assert_eq!(
            renewal_delay(start, end, end + Duration::from_secs(1)),
            Duration::ZERO
        );
        // A certificate whose end comes before its start: at once.
        assert_eq!(renewal_delay(end, start, start), Duration::ZERO);
        // Seconds-long lifetimes (the tests'): 6 s renews at 4 s.
        let short = start + Duration::from_secs(6);
        assert_eq!(renewal_delay(start, short, start), Duration::from_secs(4));
    }

    #[test]
    fn a_csr_yields_a_certificate_for_the_cas_choice_of_identity() {
        let ca = new_ca("c1", Duration::from_secs(3600)).unwrap();
        let (csr, key) = new_csr().unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let identity = Identity::Host("h1".into());
        let cert = issue_for_csr(
            &ca,
            "c1",
            &Request {
                identity: &identity,
                dns_names: &[],
                ips: &[],
                backdate: Duration::ZERO,
                lifetime: Duration::from_secs(60),
            },
            &csr,
        )
        .unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(Identity::from_certificate(&der, "c1"), Ok(identity));
        let (from, to) = validity(&cert).unwrap();
        let lifetime = to.duration_since(from).unwrap();
        assert_eq!(lifetime, Duration::from_secs(60));
        assert!(validity("not a certificate").is_err());
    }
}
