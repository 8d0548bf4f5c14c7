//! Idle connections (docs/limits.md): a Fabric server pings a connection that carries no call
//! and closes it when the answer does not come in time, so a client that vanished without
//! closing (its host frozen, its network cut) frees what it held. The daemons ping every 30 s
//! and wait 20 s (`fabric_proto::server()`); here the same server with 1 s and 1 s.
//!
//! The client is raw HTTP/2 over the Unix socket: the preface and SETTINGS, the server's
//! SETTINGS acknowledged, and then nothing: its PINGs unanswered (the control answers them).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(1);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The next frame (type, flags, payload), or None when the server closed the connection.
async fn read_frame(socket: &mut UnixStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    socket.read_exact(&mut head).await.ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    socket.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

/// What a client that opened an HTTP/2 connection and then went idle sees, for `watch`:
/// the PINGs the server sent, and whether (and when) it closed the connection. The client
/// answers the PINGs when `answer_pings`.
async fn idle_client(socket: &std::path::Path, answer_pings: bool, watch: Duration) -> Seen {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    stream.write_all(PREFACE).await.expect("preface");
    stream
        .write_all(&frame(SETTINGS, 0, &[]))
        .await
        .expect("SETTINGS");
    let start = Instant::now();
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + watch;
    loop {
        let next = tokio::time::timeout_at(deadline, read_frame(&mut stream)).await;
        match next {
            Err(_) => return seen, // still open
            Ok(None) => {
                seen.closed_after = Some(start.elapsed());
                return seen;
            }
            Ok(Some((SETTINGS, flags, _))) if flags & ACK == 0 => {
                stream
                    .write_all(&frame(SETTINGS, ACK, &[]))
                    .await
                    .expect("SETTINGS ACK");
            }
            Ok(Some((PING, flags, payload))) if flags & ACK == 0 => {
                seen.pings += 1;
                if answer_pings {
                    // A closed connection is what the control would show: not expected.
                    let _ = stream.write_all(&frame(PING, ACK, &payload)).await;
                }
            }
            Ok(Some((GOAWAY, _, _))) => seen.goaway = true,
            Ok(Some(_)) => {}
        }
    }
}

#[derive(Debug, Default)]
struct Seen {
    pings: usize,
    goaway: bool,
    closed_after: Option<Duration>,
}

#[tokio::test]
async fn a_connection_that_answers_no_ping_is_closed_after_interval_and_timeout() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("server.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let standard = fabric_proto::standard_services(&[fabric_proto::AGENT_SERVICE]).await;
    let router =
        fabric_proto::server_with_keepalive(INTERVAL, TIMEOUT).add_service(standard.health);
    tokio::spawn(router.serve_with_incoming(fabric_proto::unix::incoming(listener)));

    // Both at once: the control shows that the server keeps a connection that answers.
    let watch = (INTERVAL + TIMEOUT) * 3;
    let (silent, answering) = tokio::join!(
        idle_client(&socket, false, watch),
        idle_client(&socket, true, watch)
    );

    println!("silent: {silent:?}; answering: {answering:?}");
    assert!(silent.pings >= 1, "the server pinged: {silent:?}");
    let closed = silent
        .closed_after
        .unwrap_or_else(|| panic!("a silent connection still open after {watch:?}: {silent:?}"));
    assert!(
        closed >= INTERVAL && closed <= INTERVAL + TIMEOUT + Duration::from_millis(900),
        "closed after {closed:?}, expected within the interval ({INTERVAL:?}) and timeout \
         ({TIMEOUT:?})"
    );
    assert_eq!(
        answering.closed_after, None,
        "a connection that answers the pings is kept: {answering:?}"
    );
    assert!(answering.pings >= 2, "{answering:?}");
}

/// The daemons' own figures: what docs/limits.md says.
#[test]
fn the_daemons_ping_every_30_s_and_wait_20_s() {
    assert_eq!(fabric_proto::KEEPALIVE_INTERVAL, Duration::from_secs(30));
    assert_eq!(fabric_proto::KEEPALIVE_TIMEOUT, Duration::from_secs(20));
}
