//! Serving gRPC on a Unix socket to every gRPC client, not only to tonic and
//! grpc-go.
//!
//! A client whose target is a Unix socket has no host name to put in
//! `:authority`, and the gRPC implementations disagree on what to send:
//! grpc-go and tonic send `localhost`; gRPC C-core (Python, C++, Ruby, PHP)
//! sends the socket path %-encoded, without its first `/`
//! (`unix:/run/fabric.sock` gives `run%2Ffabric.sock`); grpc-java and
//! grpc-swift send the path. h2 parses `:authority` as an
//! `http::uri::Authority`, which refuses a `%` or a `/` in a host name, and
//! answers RST_STREAM(PROTOCOL_ERROR) before hyper, tonic or any tower layer
//! sees the request. h2 has no option to relax that check, so the fix sits
//! under h2, on the bytes of Unix socket connections only.
//!
//! [`UnixConnection`] hands h2 the client's bytes unchanged, except its
//! header blocks: it decodes each one (HPACK) and encodes it again, every
//! field the same but one. An `:authority` that `http` refuses and that is
//! made of visible ASCII characters only (or is empty) becomes `localhost`,
//! what grpc-go and tonic send. Any other `:authority` goes on unchanged, for
//! h2 to accept or refuse as before. The fields are encoded as literals
//! "without indexing": h2's HPACK table stays empty and the client's table
//! lives in this module's decoder, so the two can never disagree about what
//! an index means.
//!
//! What it accepts that h2 alone refuses: on a Unix socket only, a request
//! whose `:authority` is any visible-ASCII string. That string is dropped,
//! not passed on, and no Fabric server reads the authority of a request:
//! who may call over a Unix socket is decided by the socket file's
//! permissions, not by anything the client writes.
//!
//! What it refuses that h2 alone would answer with a GOAWAY: a connection
//! whose header frames break HTTP/2 framing or HPACK, or whose header block
//! is larger than [`MAX_HEADER_BLOCK`] bytes, encoded or decoded, is closed
//! at once (an I/O error from its read side). h2 refuses header lists over
//! 16 KiB by itself, well below that bound.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, UdsConnectInfo};

/// The largest header block a client may send on a Unix socket, in bytes,
/// both as received (HPACK) and decoded (names and values plus 32 bytes per
/// field, as RFC 7541 counts them): four times the 16 KiB header list h2
/// accepts, so that h2, not this module, refuses a large list politely.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// What h2 receives instead of an `:authority` it would refuse.
pub const UNIX_AUTHORITY: &str = "localhost";

/// The HPACK dynamic table a client may use. The server never sends
/// SETTINGS_HEADER_TABLE_SIZE (tonic does not set it), so it is the HTTP/2
/// default; a client that announces a larger table breaks HPACK.
const CLIENT_HPACK_TABLE: usize = 4096;

/// Payload of the frames written to h2: 16 KiB, the SETTINGS_MAX_FRAME_SIZE
/// every HTTP/2 endpoint accepts.
const MAX_FRAME_WRITTEN: usize = 16_384;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PRIORITY_FIELDS: usize = 5;

/// Accepts the connections of `listener` as [`UnixConnection`]s, for
/// `tonic::transport::Server::serve_with_incoming`. Every Fabric server
/// that listens on a Unix socket serves through this.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixConnection>> {
    UnixListenerStream::new(listener).map(|accepted| accepted.map(UnixConnection::new))
}

/// A Unix socket connection as h2 reads it: the client's bytes, with an
/// `:authority` h2 would refuse replaced by [`UNIX_AUTHORITY`] (see the
/// module documentation). Writes go to the socket unchanged.
pub struct UnixConnection {
    stream: UnixStream,
    inbound: Inbound,
    eof: bool,
}

impl UnixConnection {
    /// Wraps an accepted Unix socket connection.
    pub fn new(stream: UnixStream) -> Self {
        UnixConnection {
            stream,
            inbound: Inbound::new(),
            eof: false,
        }
    }
}

impl Connected for UnixConnection {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for UnixConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.inbound.ready.is_empty() || this.eof {
                let n = this.inbound.ready.len().min(buf.remaining());
                buf.put_slice(&this.inbound.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut chunk = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.stream).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                this.eof = true;
                continue;
            }
            if let Err(err) = this.inbound.receive(chunk.filled()) {
                tracing::debug!(error = %err, "Unix socket connection closed");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, err)));
            }
        }
    }
}

impl AsyncWrite for UnixConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Why a Unix socket connection was closed by the header rewriting.
#[derive(Debug, thiserror::Error)]
pub enum HeaderRewriteError {
    /// A CONTINUATION frame that continues no header block.
    #[error("CONTINUATION frame on stream {0} outside a header block")]
    OrphanContinuation(u32),
    /// Another frame inside a header block (RFC 9113 §6.10 forbids it).
    #[error("frame of type {kind:#x} on stream {stream} inside the header block of stream {block_stream}")]
    InterleavedFrame {
        /// The frame's type.
        kind: u8,
        /// The frame's stream.
        stream: u32,
        /// The stream whose header block was not finished.
        block_stream: u32,
    },
    /// Padding or priority fields longer than their HEADERS frame.
    #[error("HEADERS frame on stream {0}: padding or priority fields longer than the frame")]
    MalformedHeaders(u32),
    /// A header block over [`MAX_HEADER_BLOCK`] bytes.
    #[error("header block of stream {0} over {MAX_HEADER_BLOCK} bytes")]
    TooLarge(u32),
    /// A header block HPACK cannot decode.
    #[error("header block of stream {stream}: HPACK: {source}")]
    Hpack {
        /// The stream of the header block.
        stream: u32,
        /// What the decoder found.
        source: loona_hpack::decoder::DecoderError,
    },
}

/// The client-to-server half of a connection, without I/O: bytes in
/// ([`Inbound::receive`]), bytes for h2 out (`ready`).
struct Inbound {
    /// Received, not processed yet: a partial frame.
    pending: BytesMut,
    /// Processed, for h2 to read.
    ready: BytesMut,
    stage: Stage,
    /// The client's HPACK table, as its encoder built it.
    decoder: loona_hpack::Decoder<'static>,
    /// Whether this connection has had an `:authority` replaced (logged once).
    replaced_authority: bool,
}

enum Stage {
    /// Before the 24 bytes of the HTTP/2 client preface.
    Preface,
    /// Not HTTP/2 with prior knowledge: every byte goes to h2, which refuses it.
    Opaque,
    /// At a frame boundary.
    FrameHead,
    /// Inside a frame passed unchanged, with this many payload bytes to go.
    Forward(usize),
    /// Inside a header block, waiting for its CONTINUATION frames.
    HeaderBlock(HeaderBlock),
}

struct HeaderBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_FIELDS]>,
    fragment: BytesMut,
}

/// A frame's 9-byte head (RFC 9113 §4.1).
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(head: &[u8]) -> FrameHead {
        FrameHead {
            len: usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]),
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        }
    }

    fn write(dst: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
        // `len` is at most MAX_FRAME_WRITTEN: it fits the 24-bit length.
        dst.put_uint(len as u64, 3);
        dst.put_u8(kind);
        dst.put_u8(flags);
        dst.put_u32(stream);
    }
}

impl Inbound {
    fn new() -> Inbound {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(CLIENT_HPACK_TABLE);
        Inbound {
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            stage: Stage::Preface,
            decoder,
            replaced_authority: false,
        }
    }

    /// Takes bytes from the client and moves what can be processed to `ready`.
    fn receive(&mut self, bytes: &[u8]) -> Result<(), HeaderRewriteError> {
        self.pending.extend_from_slice(bytes);
        while self.step()? {}
        Ok(())
    }

    /// Processes what `pending` holds at the current stage; false when it
    /// needs more bytes.
    fn step(&mut self) -> Result<bool, HeaderRewriteError> {
        match &mut self.stage {
            Stage::Preface => {
                let n = self.pending.len().min(PREFACE.len());
                if self.pending[..n] != PREFACE[..n] {
                    self.stage = Stage::Opaque;
                    return Ok(true);
                }
                if n < PREFACE.len() {
                    return Ok(false);
                }
                self.ready
                    .extend_from_slice(&self.pending.split_to(PREFACE.len()));
                self.stage = Stage::FrameHead;
                Ok(true)
            }
            Stage::Opaque => {
                self.ready.extend_from_slice(&self.pending.split());
                Ok(false)
            }
            Stage::Forward(left) => {
                let n = (*left).min(self.pending.len());
                self.ready.extend_from_slice(&self.pending.split_to(n));
                *left -= n;
                if *left == 0 {
                    self.stage = Stage::FrameHead;
                    return Ok(true);
                }
                Ok(false)
            }
            Stage::FrameHead | Stage::HeaderBlock(_) => {
                if self.pending.len() < FRAME_HEAD {
                    return Ok(false);
                }
                let head = FrameHead::parse(&self.pending[..FRAME_HEAD]);
                let in_block = match &self.stage {
                    Stage::HeaderBlock(block) => Some(block.stream),
                    _ => None,
                };
                match (head.kind, in_block) {
                    (HEADERS, None) => self.header_frame(head),
                    (CONTINUATION, Some(stream)) if stream == head.stream => {
                        self.continuation_frame(head)
                    }
                    (CONTINUATION, None) => {
                        Err(HeaderRewriteError::OrphanContinuation(head.stream))
                    }
                    (kind, Some(block_stream)) => Err(HeaderRewriteError::InterleavedFrame {
                        kind,
                        stream: head.stream,
                        block_stream,
                    }),
                    (_, None) => {
                        self.ready
                            .extend_from_slice(&self.pending.split_to(FRAME_HEAD));
                        self.stage = Stage::Forward(head.len);
                        Ok(true)
                    }
                }
            }
        }
    }

    /// The payload of the frame at the start of `pending`, once all of it
    /// has arrived.
    fn whole_frame(&mut self, head: &FrameHead) -> Result<Option<BytesMut>, HeaderRewriteError> {
        if head.len > MAX_HEADER_BLOCK {
            return Err(HeaderRewriteError::TooLarge(head.stream));
        }
        if self.pending.len() < FRAME_HEAD + head.len {
            return Ok(None);
        }
        let mut frame = self.pending.split_to(FRAME_HEAD + head.len);
        Ok(Some(frame.split_off(FRAME_HEAD)))
    }

    fn header_frame(&mut self, head: FrameHead) -> Result<bool, HeaderRewriteError> {
        let Some(mut payload) = self.whole_frame(&head)? else {
            return Ok(false);
        };
        let malformed = || HeaderRewriteError::MalformedHeaders(head.stream);
        let mut padding = 0;
        if head.flags & PADDED != 0 {
            let Some(&pad) = payload.first() else {
                return Err(malformed());
            };
            padding = usize::from(pad);
            let _ = payload.split_to(1);
        }
        let priority = if head.flags & PRIORITY != 0 {
            if payload.len() < PRIORITY_FIELDS {
                return Err(malformed());
            }
            let mut fields = [0u8; PRIORITY_FIELDS];
            fields.copy_from_slice(&payload.split_to(PRIORITY_FIELDS));
            Some(fields)
        } else {
            None
        };
        if padding > payload.len() {
            return Err(malformed());
        }
        payload.truncate(payload.len() - padding);
        let block = HeaderBlock {
            stream: head.stream,
            end_stream: head.flags & END_STREAM != 0,
            priority,
            fragment: payload,
        };
        if head.flags & END_HEADERS != 0 {
            self.finish(block)?;
        } else {
            self.stage = Stage::HeaderBlock(block);
        }
        Ok(true)
    }

    fn continuation_frame(&mut self, head: FrameHead) -> Result<bool, HeaderRewriteError> {
        let Some(payload) = self.whole_frame(&head)? else {
            return Ok(false);
        };
        let Stage::HeaderBlock(block) = &mut self.stage else {
            unreachable!("continuation_frame is called inside a header block");
        };
        if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
            return Err(HeaderRewriteError::TooLarge(head.stream));
        }
        block.fragment.extend_from_slice(&payload);
        if head.flags & END_HEADERS != 0 {
            let Stage::HeaderBlock(block) = std::mem::replace(&mut self.stage, Stage::FrameHead)
            else {
                unreachable!("the stage was a header block just above");
            };
            self.finish(block)?;
        }
        Ok(true)
    }

    /// Decodes a complete header block and writes it to `ready` again, as
    /// HEADERS and CONTINUATION frames.
    fn finish(&mut self, block: HeaderBlock) -> Result<(), HeaderRewriteError> {
        let mut fields = BytesMut::with_capacity(block.fragment.len() * 2);
        let mut decoded = 0usize;
        let mut replaced = None;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded += name.len() + value.len() + 32;
                if decoded > MAX_HEADER_BLOCK {
                    return;
                }
                if &name[..] == b":authority" && is_replaced_authority(&value) {
                    replaced = Some(String::from_utf8_lossy(&value).into_owned());
                    put_literal(&mut fields, &name, UNIX_AUTHORITY.as_bytes());
                } else {
                    put_literal(&mut fields, &name, &value);
                }
            })
            .map_err(|source| HeaderRewriteError::Hpack {
                stream: block.stream,
                source,
            })?;
        if decoded > MAX_HEADER_BLOCK {
            return Err(HeaderRewriteError::TooLarge(block.stream));
        }
        if let Some(authority) = replaced {
            if !self.replaced_authority {
                self.replaced_authority = true;
                tracing::debug!(
                    %authority,
                    replacement = UNIX_AUTHORITY,
                    "Unix socket client: :authority replaced"
                );
            }
        }
        self.stage = Stage::FrameHead;

        let mut rest = &fields[..];
        let mut first = true;
        loop {
            let priority = match (first, &block.priority) {
                (true, Some(priority)) => &priority[..],
                _ => &[][..],
            };
            let n = rest.len().min(MAX_FRAME_WRITTEN - priority.len());
            let (chunk, after) = rest.split_at(n);
            rest = after;
            let mut flags = if rest.is_empty() { END_HEADERS } else { 0 };
            let kind = if first {
                if block.end_stream {
                    flags |= END_STREAM;
                }
                if !priority.is_empty() {
                    flags |= PRIORITY;
                }
                HEADERS
            } else {
                CONTINUATION
            };
            FrameHead::write(
                &mut self.ready,
                priority.len() + chunk.len(),
                kind,
                flags,
                block.stream,
            );
            self.ready.extend_from_slice(priority);
            self.ready.extend_from_slice(chunk);
            first = false;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

/// Whether h2 gets [`UNIX_AUTHORITY`] instead of this `:authority`: a value
/// `http` refuses, made of visible ASCII characters only, as the %-encoded
/// or plain socket paths gRPC clients send are (an empty one too, as old
/// grpc-go sent). Anything else reaches h2 unchanged.
fn is_replaced_authority(value: &[u8]) -> bool {
    value.iter().all(u8::is_ascii_graphic) && http::uri::Authority::try_from(value).is_err()
}

/// Appends a "literal header field without indexing, new name"
/// (RFC 7541 §6.2.2), name and value as raw octets.
fn put_literal(dst: &mut BytesMut, name: &[u8], value: &[u8]) {
    put_integer(dst, 0x00, 4, 0);
    for string in [name, value] {
        put_integer(dst, 0x00, 7, string.len());
        dst.extend_from_slice(string);
    }
}

/// Appends an HPACK integer with an N-bit prefix (RFC 7541 §5.1), the
/// first octet's other bits set from `first`.
fn put_integer(dst: &mut BytesMut, first: u8, prefix_bits: u32, value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        // Fits the prefix: below 2^prefix_bits, at most 127.
        dst.put_u8(first | value as u8);
        return;
    }
    dst.put_u8(first | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        dst.put_u8((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    dst.put_u8(rest as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HPACK string literal, raw octets.
    fn string(s: &str) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_integer(&mut out, 0x00, 7, s.len());
        out.extend_from_slice(s.as_bytes());
        out.to_vec()
    }

    /// A literal field with incremental indexing whose name is entry `name`
    /// of the table (RFC 7541 §6.2.1).
    fn indexed_name(name: u8, value: &str) -> Vec<u8> {
        let mut out = vec![0x40 | name];
        out.extend(string(value));
        out
    }

    /// Two request header blocks as gRPC C-core encodes them: the first
    /// adds its fields to the HPACK table, the second refers to them.
    fn c_core_requests(authority: &str) -> [Vec<u8>; 2] {
        let mut first = vec![0x83, 0x86]; // :method POST, :scheme http
        first.extend(indexed_name(4, "/grpc.health.v1.Health/Check")); // :path
        first.extend(indexed_name(1, authority)); // :authority
        first.push(0x40); // new name
        first.extend(string("te"));
        first.extend(string("trailers"));
        first.extend(indexed_name(31, "application/grpc")); // content-type
                                                            // The table now holds, newest first: content-type (62), te (63),
                                                            // :authority (64), :path (65).
        let second = vec![0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe];
        [first, second]
    }

    fn request(authority: &str) -> Vec<(String, String)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", authority),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        FrameHead::write(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    /// The frames in `bytes`, as (head, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(FrameHead, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let head = FrameHead::parse(&bytes[..FRAME_HEAD]);
            let payload = bytes[FRAME_HEAD..FRAME_HEAD + head.len].to_vec();
            bytes = &bytes[FRAME_HEAD + head.len..];
            out.push((head, payload));
        }
        out
    }

    /// What h2 decodes from the header blocks in `bytes` (HEADERS without
    /// padding or priority, then CONTINUATION), with a decoder of its own:
    /// (stream, fields) per block.
    fn decoded_blocks(bytes: &[u8]) -> Vec<(u32, Vec<(String, String)>)> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut block: Option<(u32, Vec<u8>)> = None;
        let mut out = Vec::new();
        for (head, payload) in frames(bytes) {
            match head.kind {
                HEADERS => block = Some((head.stream, payload)),
                CONTINUATION => block.as_mut().expect("a block").1.extend(payload),
                _ => continue,
            }
            if head.flags & END_HEADERS != 0 {
                let (stream, fragment) = block.take().expect("a block");
                let fields = decoder
                    .decode(&fragment)
                    .expect("h2 decodes what it is given")
                    .into_iter()
                    .map(|(n, v)| {
                        (
                            String::from_utf8(n).expect("utf-8"),
                            String::from_utf8(v).expect("utf-8"),
                        )
                    })
                    .collect();
                out.push((stream, fields));
            }
        }
        out
    }

    fn rewrite(input: &[u8]) -> Result<Vec<u8>, HeaderRewriteError> {
        let mut inbound = Inbound::new();
        inbound.receive(input)?;
        Ok(inbound.ready.to_vec())
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        for frame in frames {
            input.extend(frame);
        }
        input
    }

    #[test]
    fn authorities_grpc_clients_send_for_unix_sockets_become_localhost() {
        for sent in [
            "run%2Ffabric%2Fcontroller.sock", // gRPC C-core: Python, C++, Ruby, PHP
            "%2Frun%2Ffabric.sock",           // grpc-swift
            "/run/fabric/controller.sock",    // grpc-java
            "",                               // grpc-go before 1.31
        ] {
            assert!(is_replaced_authority(sent.as_bytes()), "{sent:?}");
        }
        for kept in [
            "localhost",
            "controller.example:7070",
            "[::1]:7070",
            "fabric",
        ] {
            assert!(!is_replaced_authority(kept.as_bytes()), "{kept:?}");
        }
        // Not what a client writes for a path: left for h2 to refuse.
        for refused in ["a b", "a\u{0}b", "caf\u{e9}", "x\r\nx-injected: 1"] {
            assert!(!is_replaced_authority(refused.as_bytes()), "{refused:?}");
        }
    }

    #[test]
    fn header_blocks_reach_h2_with_the_authority_replaced_and_nothing_else_changed() {
        let [first, second] = c_core_requests("tmp%2Ffabric%2Fcontroller.sock");
        let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
        let input = connection(&[
            frame(0x4, 0, 0, &[]), // SETTINGS
            frame(HEADERS, END_HEADERS, 1, &first),
            data.clone(),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
        ]);

        let output = rewrite(&input).expect("rewritten");

        assert_eq!(&output[..PREFACE.len()], PREFACE);
        let output = &output[PREFACE.len()..];
        assert_eq!(
            decoded_blocks(output),
            [(1, request(UNIX_AUTHORITY)), (3, request(UNIX_AUTHORITY))]
        );
        let heads: Vec<(u8, u8, u32)> = frames(output)
            .iter()
            .map(|(h, _)| (h.kind, h.flags, h.stream))
            .collect();
        assert_eq!(
            heads,
            [
                (0x4, 0, 0),
                (HEADERS, END_HEADERS, 1),
                (0x0, END_STREAM, 1),
                (HEADERS, END_HEADERS | END_STREAM, 3),
            ]
        );
        assert!(
            output.windows(data.len()).any(|w| w == data),
            "a DATA frame passes byte for byte"
        );
    }

    #[test]
    fn huffman_coded_fields_and_a_valid_authority_pass_unchanged() {
        // RFC 7541 C.4.1 and C.4.2: two requests, Huffman-coded, the second
        // referring to the first's :authority in the HPACK table.
        let first = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let second = [
            0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
        ];
        let input = connection(&[
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &first),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
        ]);

        let output = rewrite(&input).expect("rewritten");

        let get = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ]
            .iter()
            .chain(extra)
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
        };
        assert_eq!(
            decoded_blocks(&output[PREFACE.len()..]),
            [(1, get(&[])), (3, get(&[("cache-control", "no-cache")]))]
        );
    }

    #[test]
    fn bytes_may_arrive_one_at_a_time() {
        let [first, _] = c_core_requests("tmp%2Fx.sock");
        let (head, tail) = first.split_at(first.len() / 2);
        let input = connection(&[
            frame(HEADERS, 0, 1, head),
            frame(CONTINUATION, END_HEADERS, 1, tail),
            frame(0x0, END_STREAM, 1, b"hello"),
        ]);

        let at_once = rewrite(&input).expect("rewritten");
        let mut inbound = Inbound::new();
        for byte in &input {
            inbound.receive(&[*byte]).expect("rewritten");
        }

        assert_eq!(inbound.ready.to_vec(), at_once);
        assert_eq!(
            decoded_blocks(&at_once[PREFACE.len()..]),
            [(1, request(UNIX_AUTHORITY))]
        );
        assert!(at_once.ends_with(&frame(0x0, END_STREAM, 1, b"hello")));
    }

    #[test]
    fn padding_is_dropped_and_priority_kept() {
        let [block, _] = c_core_requests("tmp%2Fx.sock");
        let priority = [0x80, 0, 0, 0, 7];
        let mut payload = vec![3];
        payload.extend(priority);
        payload.extend(&block);
        payload.extend([0, 0, 0]);
        let input = connection(&[frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 1, &payload)]);

        let output = rewrite(&input).expect("rewritten");

        let [(head, payload)] = &frames(&output[PREFACE.len()..])[..] else {
            panic!("one frame");
        };
        assert_eq!(head.flags, END_HEADERS | PRIORITY);
        assert_eq!(payload[..PRIORITY_FIELDS], priority);
        let without_priority = frame(HEADERS, END_HEADERS, 1, &payload[PRIORITY_FIELDS..]);
        assert_eq!(
            decoded_blocks(&without_priority),
            [(1, request(UNIX_AUTHORITY))]
        );
    }

    #[test]
    fn a_large_block_is_split_into_frames_h2_accepts() {
        let big = "x".repeat(30_000);
        let mut block = vec![0x83];
        block.push(0x00);
        block.extend(string("x-big"));
        block.extend(string(&big));
        let input = connection(&[frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)]);

        let output = rewrite(&input).expect("rewritten");

        let written = frames(&output[PREFACE.len()..]);
        assert!(written.len() >= 2, "{} frames", written.len());
        assert!(written.iter().all(|(h, _)| h.len <= MAX_FRAME_WRITTEN));
        assert_eq!(written[0].0.flags, END_STREAM);
        assert_eq!(written.last().expect("frames").0.flags, END_HEADERS);
        assert_eq!(
            decoded_blocks(&output[PREFACE.len()..]),
            [(
                1,
                vec![
                    (":method".to_owned(), "POST".to_owned()),
                    ("x-big".to_owned(), big)
                ]
            )]
        );
    }

    #[test]
    fn broken_framing_and_oversized_blocks_close_the_connection() {
        let post = [0x83];
        let orphan = rewrite(&connection(&[frame(CONTINUATION, END_HEADERS, 1, &post)]));
        assert!(matches!(
            orphan,
            Err(HeaderRewriteError::OrphanContinuation(1))
        ));
        let interleaved = rewrite(&connection(&[
            frame(HEADERS, 0, 1, &post),
            frame(0x0, 0, 1, b"data"),
        ]));
        assert!(matches!(
            interleaved,
            Err(HeaderRewriteError::InterleavedFrame {
                kind: 0,
                stream: 1,
                block_stream: 1
            })
        ));
        let bad_padding = rewrite(&connection(&[frame(
            HEADERS,
            END_HEADERS | PADDED,
            1,
            &[200, 0x83],
        )]));
        assert!(matches!(
            bad_padding,
            Err(HeaderRewriteError::MalformedHeaders(1))
        ));
        let bad_index = rewrite(&connection(&[frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0x7f],
        )]));
        assert!(matches!(
            bad_index,
            Err(HeaderRewriteError::Hpack { stream: 1, .. })
        ));
        let mut announced_too_long = frame(CONTINUATION, END_HEADERS, 1, &[]);
        announced_too_long[..3].copy_from_slice(&[0x01, 0x00, 0x01]); // 65,537 bytes
        let oversized = rewrite(&connection(&[
            frame(HEADERS, 0, 1, &post),
            announced_too_long,
        ]));
        assert!(matches!(oversized, Err(HeaderRewriteError::TooLarge(1))));

        // One byte per field on the wire, 4 KiB each once decoded: the
        // decoded size is bounded too.
        let mut block = vec![0x40];
        block.extend(string("x-big"));
        block.extend(string(&"v".repeat(4000)));
        block.extend([0xbe; 100]); // index 62: the entry just added
        let amplified = rewrite(&connection(&[frame(HEADERS, END_HEADERS, 1, &block)]));
        assert!(matches!(amplified, Err(HeaderRewriteError::TooLarge(1))));

        // A client may not grow its HPACK table past the HTTP/2 default.
        let grown = rewrite(&connection(&[frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0x3f, 0xe1, 0x3f, 0x83], // size update to 8192, :method POST
        )]));
        assert!(matches!(grown, Err(HeaderRewriteError::Hpack { .. })));
    }

    #[test]
    fn a_connection_that_is_not_http2_goes_to_h2_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(rewrite(input).expect("passed on"), input);
    }
}
