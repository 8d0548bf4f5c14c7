//! A fuzz of the controller's whole request path, in process: gRPC framing, protobuf decoding,
//! authorization, validation and the handlers of every method of Compute, HostLink and
//! Images (read from the descriptors, so a new method is fuzzed too), as the binary assembles
//! them (`fabric_controller::server`), over a real redb store.
//!
//! Inputs are generated protobuf: random fields of every wire type with interesting values
//! (names of records that exist, names too long, zero, u64::MAX, a 70 KB string, nested
//! messages), raw bytes, several frames of a stream, and broken frames; each sent by a
//! random caller (local-root, a user, host h1, another host, the controller's identity, or
//! nobody); the controller has a CA and join tokens, whose values the inputs also use, so
//! joins and renewals reach the token checks and the CSR parsing. Checked: no panic anywhere (also in tasks the handlers spawn), no INTERNAL or
//! UNKNOWN answer (bad input is the caller's error, not the server's; broken gRPC framing is
//! INTERNAL as the gRPC specification says), a caller without an
//! identity is UNAUTHENTICATED, a viewer or a user without a role never gets a mutating call
//! through, and hosts and the controller's identity never get a Compute call through.
//!
//! In the suite: 1,500 cases from a fixed seed. For a campaign, `FABRIC_RPC_FUZZ_SECONDS=600
//! cargo test --release -p fabric-controller --test rpc_fuzz -- --nocapture` runs fresh seeds
//! until the time is up and prints the figures (README, "Fuzzing").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fabric_controller::controller::{Controller, Settings};
use fabric_controller::images::ImageStore;
use fabric_controller::store::redb::RedbStore;
use fabric_proto::tls::{Identity, PeerInfo};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use tower::{Layer, ServiceExt};

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// One protobuf field, of any wire type.
#[derive(Debug, Clone)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, Vec<u8>),
    Nested(u32, Vec<Field>),
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for field in fields {
        match field {
            Field::Varint(n, v) => {
                varint(u64::from(*n) << 3, out);
                varint(*v, out);
            }
            Field::Fixed64(n, v) => {
                varint((u64::from(*n) << 3) | 1, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Fixed32(n, v) => {
                varint((u64::from(*n) << 3) | 5, out);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Bytes(n, b) => {
                varint((u64::from(*n) << 3) | 2, out);
                varint(b.len() as u64, out);
                out.extend_from_slice(b);
            }
            Field::Nested(n, inner) => {
                let mut body = Vec::new();
                encode(inner, &mut body);
                varint((u64::from(*n) << 3) | 2, out);
                varint(body.len() as u64, out);
                out.extend_from_slice(&body);
            }
        }
    }
}

fn field_number() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 1u32..=12, 2 => 13u32..=40, 1 => Just(536_870_911u32)]
}

/// Values only the running target knows (join tokens it made, a good CSR), set by
/// [`target`] before any strategy is built.
static TARGET_VALUES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();

fn interesting_bytes() -> impl Strategy<Value = Vec<u8>> {
    let known = TARGET_VALUES.get().cloned().unwrap_or_default();
    let known = if known.is_empty() {
        vec![Vec::new()]
    } else {
        known
    };
    prop_oneof![
        1 => prop::sample::select(known),
        4 => prop::sample::select(vec![
            "", "h1", "h2", "fz-1", "default", "z1", "vm-1", "a", "-a", "A", "..", "../../etc/passwd",
            "/dev/kvm", "\0", "é", "unix:/tmp/x", "fabric-controller",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        2 => prop::collection::vec(any::<u8>(), 0..48),
        1 => (1usize..400).prop_map(|n| vec![b'a'; n]),
        1 => Just(vec![b'x'; 70_000]),
    ]
}

fn interesting_varint() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..8,
        2 => prop::sample::select(vec![
            0u64, 1, 64, 256, 1024, 4096, 65_535, 1 << 20, 1 << 31, 1 << 32,
            i32::MAX as u64, i64::MAX as u64, i64::MIN as u64, u64::MAX,
        ]),
        1 => any::<u64>(),
    ]
}

fn fields() -> impl Strategy<Value = Vec<Field>> {
    let leaf = prop_oneof![
        4 => (field_number(), interesting_varint()).prop_map(|(n, v)| Field::Varint(n, v)),
        4 => (field_number(), interesting_bytes()).prop_map(|(n, b)| Field::Bytes(n, b)),
        1 => (field_number(), any::<u64>()).prop_map(|(n, v)| Field::Fixed64(n, v)),
        1 => (field_number(), any::<u32>()).prop_map(|(n, v)| Field::Fixed32(n, v)),
    ];
    let field = leaf.prop_recursive(3, 48, 8, |inner| {
        (field_number(), prop::collection::vec(inner, 0..8))
            .prop_map(|(n, inner)| Field::Nested(n, inner))
    });
    prop::collection::vec(field, 0..10)
}

/// What is sent as the request body.
#[derive(Debug, Clone)]
enum Body {
    /// One frame holding a generated message.
    Message(Vec<Field>),
    /// Several frames (a client stream).
    Stream(Vec<Vec<Field>>),
    /// A valid message of some method (a VM spec, a registration, ...) with generated fields
    /// appended: protobuf merges them in, so this is a good request with a few fields
    /// replaced or added, the way to reach validation's deeper rules.
    Extended(usize, Vec<Field>),
    /// One frame of random bytes.
    Raw(Vec<u8>),
    /// A frame whose header lies: compressed flag, or a length that is not the payload's.
    BadFrame(u8, u32, Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        6 => fields().prop_map(Body::Message),
        4 => (0usize..1000, fields()).prop_map(|(base, fields)| Body::Extended(base, fields)),
        2 => prop::collection::vec(fields(), 0..4).prop_map(Body::Stream),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Body::Raw),
        1 => (0u8..3, prop_oneof![Just(0u32), Just(u32::MAX), 0u32..64],
              prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(flag, len, bytes)| Body::BadFrame(flag, len, bytes)),
    ]
}

fn frame(message: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Body::Message(fields) => {
                let mut message = Vec::new();
                encode(fields, &mut message);
                frame(&message, &mut out);
            }
            Body::Stream(messages) => {
                for fields in messages {
                    let mut message = Vec::new();
                    encode(fields, &mut message);
                    frame(&message, &mut out);
                }
            }
            Body::Extended(base, fields) => {
                static BASES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
                let bases = BASES.get_or_init(valid_messages);
                let mut message = bases[base % bases.len()].clone();
                encode(fields, &mut message);
                frame(&message, &mut out);
            }
            Body::Raw(bytes) => frame(bytes, &mut out),
            Body::BadFrame(flag, len, bytes) => {
                out.push(*flag);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(bytes);
            }
        }
        out
    }
}

/// Encodings of valid requests, for [`Body::Extended`].
fn valid_messages() -> Vec<Vec<u8>> {
    use fabric_proto::v1::*;
    let resources = Resources {
        cpus: 8,
        memory_mib: 8192,
        disk_mib: 8192,
    };
    let spec = fabric_test_support::vmspec::simulated_vm("fz-2");
    vec![
        CreateVmRequest {
            spec: Some(spec.clone()),
            desired_state: DesiredState::Running as i32,
        }
        .encode_to_vec(),
        spec.encode_to_vec(),
        RegisterHostRequest {
            machine_id: "machine-h1".into(),
            name: "h1".into(),
            zone: "z1".into(),
            capacity: Some(resources),
            allocatable: Some(resources),
            ..Default::default()
        }
        .encode_to_vec(),
        HeartbeatRequest {
            host_id: "h1".into(),
            session: 1,
            ..Default::default()
        }
        .encode_to_vec(),
        ListVmsRequest {
            page_size: 10,
            ..Default::default()
        }
        .encode_to_vec(),
    ]
}

/// The caller: an identity, or none (a connection that is neither TLS nor the Unix socket).
fn caller() -> impl Strategy<Value = Option<Identity>> {
    prop_oneof![
        2 => Just(Some(Identity::LocalRoot)),
        2 => prop::sample::select(vec!["admin", "ops", "viewer", "x"])
            .prop_map(|n| Some(Identity::User(n.into()))),
        2 => Just(Some(Identity::Host("h1".into()))),
        1 => prop::sample::select(vec!["h2", "h3", "fz-1"])
            .prop_map(|n| Some(Identity::Host(n.into()))),
        1 => Just(Some(Identity::Controller)),
        1 => Just(Some(Identity::Anonymous)),
        1 => Just(None),
    ]
}

/// Every method of the controller's services, and two paths that are none.
fn methods() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(fabric_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set");
    let served = [
        fabric_proto::COMPUTE_SERVICE,
        fabric_proto::HOST_LINK_SERVICE,
        fabric_proto::IMAGES_SERVICE,
    ];
    let mut paths = Vec::new();
    for file in set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            if served.contains(&full.as_str()) {
                for method in &service.method {
                    paths.push(format!("/{full}/{}", method.name()));
                }
            }
        }
    }
    assert!(paths.len() >= 20, "only {} methods found", paths.len());
    paths.push("/fabric.v1.Compute/NoSuchMethod".into());
    paths.push("/no.such.Service/Call".into());
    paths
}

type Svc = tower::util::MapResponse<
    fabric_proto::tls::Authorize<tonic::service::Routes>,
    fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
>;

struct Target {
    runtime: tokio::runtime::Runtime,
    service: Svc,
    methods: Vec<String>,
    _dir: tempfile::TempDir,
}

/// The status of a response: from its headers (trailers-only), else from its trailers,
/// reading at most for `wait` (a watch that stays open has none yet: `None`).
async fn status_of(
    response: http::Response<tonic::body::Body>,
    wait: Duration,
) -> Option<tonic::Status> {
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Some(status);
    }
    let mut body = response.into_body();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    return tonic::Status::from_header_map(trailers);
                }
            }
            Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
        }
    }
}

async fn send(
    service: &Svc,
    path: &str,
    who: Option<Identity>,
    body: Vec<u8>,
) -> Option<tonic::Status> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://controller{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(body),
        )))
        .expect("a request");
    if let Some(identity) = who {
        request.extensions_mut().insert(PeerInfo {
            remote: None,
            identity,
            expires: None,
            issued: None,
        });
    }
    let response = service
        .clone()
        .oneshot(request)
        .await
        .expect("the router never fails");
    status_of(response, Duration::from_millis(200)).await
}

fn target() -> Target {
    std::panic::set_hook({
        let default = std::panic::take_hook();
        Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        })
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let service = runtime.block_on(async {
        let store = Arc::new(RedbStore::open(&dir.path().join("store.redb")).expect("store"));
        let settings = Settings {
            data_dir: dir.path().to_owned(),
            lease_ttl: Duration::from_secs(600),
            heartbeat_interval: Duration::from_secs(1),
            fencing_margin: Duration::from_secs(5),
            cpu_overcommit: 4.0,
            memory_relief_window: Duration::ZERO,
            audit_retention: fabric_controller::audit::Retention::default(),
        };
        let controller = Controller::load(settings, store.clone()).expect("controller");
        // A CA, so that JoinHost and RenewCertificate go past their precondition into the
        // token checks and the CSR parsing; tokens for h2 and h3 for the inputs to spend.
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        let ca = fabric_proto::tls::new_ca("fuzz", Duration::from_secs(86_400)).expect("CA");
        std::fs::write(pki.join(fabric_proto::tls::CA_FILE), &ca.cert_pem).expect("ca.pem");
        fabric_proto::tls::write_private(&pki.join(fabric_proto::tls::CA_KEY_FILE), &ca.key_pem)
            .expect("ca-key.pem");
        controller.set_issuer(fabric_controller::join::Issuer {
            tls_dir: pki,
            cluster: "fuzz".into(),
            host_cert_lifetime: Duration::from_secs(3600),
        });
        let mut known = Vec::new();
        for host in ["h2", "h3", "h2", "h3"] {
            let (token, _) = controller
                .create_join_token(host, 3600, "local-root")
                .await
                .expect("a join token");
            known.push(token.into_bytes());
        }
        let (csr, _) = fabric_proto::tls::new_csr().expect("a CSR");
        known.push(csr.into_bytes());
        let _ = TARGET_VALUES.set(known);
        let images = Arc::new(ImageStore::new(dir.path(), store, 64).expect("image store"));
        // As fabric_proto::server() wraps them: statuses bounded and mapped, then authorized.
        let service: Svc =
            tower::util::MapResponseLayer::new(fabric_proto::bound_status as fn(_) -> _).layer(
                fabric_controller::server::authorize_layer(&controller).layer(
                    fabric_controller::server::fabric_routes(&controller, &images),
                ),
            );
        // Records for the inputs to name: host h1, VM fz-1; users with each role: admin
        // cluster-wide, ops an operator of project default, viewer a cluster-wide viewer
        // (x has none).
        use fabric_proto::v1::{BindRoleRequest, CreateVmRequest, DesiredState};
        use fabric_proto::v1::{RegisterHostRequest, Resources, Role, RoleBinding};
        let resources = Resources {
            cpus: 8,
            memory_mib: 8192,
            disk_mib: 8192,
        };
        let register = RegisterHostRequest {
            machine_id: "machine-h1".into(),
            name: "h1".into(),
            zone: "z1".into(),
            capacity: Some(resources),
            allocatable: Some(resources),
            ..Default::default()
        };
        let h1 = Identity::Host("h1".into());
        let mut setup = vec![(
            "/fabric.v1.HostLink/RegisterHost",
            h1,
            register.encode_to_vec(),
        )];
        let create = CreateVmRequest {
            spec: Some(fabric_test_support::vmspec::simulated_vm("fz-1")),
            desired_state: DesiredState::Stopped as i32,
        };
        setup.push((
            "/fabric.v1.Compute/CreateVm",
            Identity::LocalRoot,
            create.encode_to_vec(),
        ));
        for (user, role, project) in [
            ("admin", Role::Admin, ""),
            ("ops", Role::Operator, "default"),
            ("viewer", Role::Viewer, ""),
        ] {
            let binding = RoleBinding {
                user: user.into(),
                role: role as i32,
                project: project.into(),
            };
            let bind = BindRoleRequest {
                binding: Some(binding),
            };
            setup.push((
                "/fabric.v1.Compute/BindRole",
                Identity::LocalRoot,
                bind.encode_to_vec(),
            ));
        }
        for (path, who, message) in setup {
            let mut framed = Vec::new();
            frame(&message, &mut framed);
            let status = send(&service, path, Some(who), framed).await;
            assert_eq!(status.map(|s| s.code()), Some(tonic::Code::Ok), "{path}");
        }
        service
    });
    Target {
        runtime,
        service,
        methods: methods(),
        _dir: dir,
    }
}

/// Whether `path` is a method the roles' table marks as changing something.
fn mutates(path: &str) -> bool {
    fabric_controller::authz::RULES
        .iter()
        .any(|(service, method, rule)| rule.mutates && path == format!("/{service}/{method}"))
}

/// Answers by gRPC code (-1: a stream still open): how many, and the first one's message.
type Histogram = std::sync::Mutex<BTreeMap<i32, (u64, String)>>;

const UNAUTHENTICATED: i32 = tonic::Code::Unauthenticated as i32;
const PERMISSION_DENIED: i32 = tonic::Code::PermissionDenied as i32;

/// One case: sends it, and checks what must hold of every answer.
fn check(
    target: &Target,
    histogram: &Histogram,
    method: usize,
    who: Option<Identity>,
    body: &Body,
) -> Result<(), TestCaseError> {
    let path = &target.methods[method % target.methods.len()];
    let status = target
        .runtime
        .block_on(send(&target.service, path, who.clone(), body.bytes()));
    let code = status.as_ref().map(|s| s.code() as i32);
    let mut seen = histogram.lock().unwrap_or_else(|e| e.into_inner());
    let entry = seen.entry(code.unwrap_or(-1)).or_insert_with(|| {
        let message = status.as_ref().map(|s| s.message()).unwrap_or("");
        (
            0,
            format!("{path}: {}", message.chars().take(160).collect::<String>()),
        )
    });
    entry.0 += 1;
    drop(seen);
    prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic on {}", path);
    // The caller's bytes are never the server's failure, except broken gRPC framing, which
    // the gRPC specification answers with INTERNAL.
    let framing = status.as_ref().is_some_and(|s| {
        s.message().starts_with("protocol error:")
            || s.message().starts_with("Unexpected EOF decoding stream")
    });
    prop_assert!(
        !matches!(code, Some(2 | 13)) || framing,
        "{} answered {:?}",
        path,
        status
    );
    match &who {
        None => prop_assert_eq!(code, Some(UNAUTHENTICATED), "{} without a caller", path),
        // A TLS caller without a certificate reaches JoinHost only (where a generated request
        // holding one of the target's tokens, its host and a good CSR may even join).
        Some(Identity::Anonymous) if path == "/fabric.v1.HostLink/JoinHost" => {}
        Some(Identity::Anonymous) => {
            prop_assert_eq!(
                code,
                Some(UNAUTHENTICATED),
                "{} without a certificate",
                path
            )
        }
        Some(Identity::Controller) => {
            prop_assert!(
                code != Some(0) && code.is_some(),
                "{} as the controller: {:?}",
                path,
                code
            )
        }
        Some(Identity::User(name)) if (name == "viewer" || name == "x") && mutates(path) => {
            // A viewer, or a user with no role, changes nothing: refused before decoding.
            prop_assert_eq!(code, Some(PERMISSION_DENIED), "{} as {}", path, name)
        }
        Some(Identity::Host(_)) if path.starts_with("/fabric.v1.Compute/") => {
            prop_assert_eq!(code, Some(PERMISSION_DENIED), "{} as a host", path)
        }
        Some(Identity::Host(name)) if path.starts_with("/fabric.v1.HostLink/") && name != "h1" => {
            // Another host's calls that name h1 or its id are refused; its own may succeed.
            prop_assert!(
                code.is_some() || path.ends_with("Assignments"),
                "{}: no answer",
                path
            )
        }
        _ => {}
    }
    Ok(())
}

fn run(target: &Target, seed: [u8; 32], cases: u32, histogram: &Histogram) {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let strategy = (0usize..1000, caller(), body());
    let result = runner.run(&strategy, |(method, who, body)| {
        check(target, histogram, method, who, &body)
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

#[test]
fn every_rpc_survives_generated_requests_from_every_kind_of_caller() {
    let target = target();
    let histogram = Histogram::default();
    let began = Instant::now();
    let mut cases = 0u64;
    match std::env::var("FABRIC_RPC_FUZZ_SECONDS") {
        Ok(seconds) => {
            let seconds: u64 = seconds.parse().expect("FABRIC_RPC_FUZZ_SECONDS: seconds");
            let mut seed = [0u8; 32];
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            seed[..16].copy_from_slice(&nanos.to_le_bytes());
            let mut round = 0u8;
            while began.elapsed() < Duration::from_secs(seconds) {
                seed[31] = round;
                round = round.wrapping_add(1);
                println!("seed {}", hex::encode(seed));
                run(&target, seed, 2_000, &histogram);
                cases += 2_000;
            }
        }
        Err(_) => {
            run(&target, [7; 32], 1_500, &histogram);
            cases += 1_500;
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    println!(
        "{cases} cases in {elapsed:.0} s ({:.0}/s), {} methods; answers by gRPC code (-1: a stream still open):",
        cases as f64 / elapsed,
        target.methods.len(),
    );
    for (code, (count, first)) in histogram.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("  {code:>3} {count:>8}  first: {first}");
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}
