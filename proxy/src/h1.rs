//! HTTP/1.1 to a backend on a connection that the request's own task drives.
//!
//! hyper's client connection is a task of its own: a request goes to it over a
//! channel, it writes and reads, and the response comes back over another
//! channel, with the body's chunks handed over one by one. A proxy that sends one
//! request at a time on a connection needs none of that. Here the request's task
//! writes the request in one piece, reads the response head, and reads the body
//! as the body is polled, decoding chunked framing in place; the connection is
//! owned by the response body until the body ends cleanly, and then waits in a
//! slot for the [`crate::upstream::Lease`] to put it back in the pool.
//!
//! Framing follows RFC 9112 §6: no body after `HEAD`, 1xx, 204 and 304; a
//! `Transfer-Encoding` whose last coding is `chunked` is decoded; any other
//! `Transfer-Encoding`, or no length at all, reads to the connection's close;
//! `Content-Length` values that disagree are a malformed answer, never a guess.

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use bytes::{Buf, BytesMut};
use http_body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TlsStream = tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>;

/// A response head longer than this is refused as malformed (hyper's default
/// limit is larger, but no Azure OpenAI answer comes near it).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most header fields a response head may have.
const MAX_HEADERS: usize = 128;

/// A chunk-size line or trailer field longer than this is malformed.
const MAX_LINE_BYTES: usize = 8 * 1024;

/// The least room a read is given.
const READ_BYTES: usize = 16 * 1024;

/// A backend connection: plain TCP, or TLS that negotiated HTTP/1.1.
pub type Io = tokio_util::either::Either<TcpStream, Box<TlsStream>>;

/// An open HTTP/1.1 connection and the bytes read from it but not yet used.
pub struct Conn {
    io: Io,
    buf: BytesMut,
}

/// Where a response body leaves its connection once it has ended cleanly.
pub type Slot = Arc<Mutex<Option<Conn>>>;

/// Why a request got no response head.
#[derive(Debug)]
pub enum SendError {
    /// Nothing of the request went out: it may be sent on another connection.
    Unsent(io::Error),
    /// The connection broke after the request (or part of it) went out.
    Broken(io::Error),
    /// The backend answered something that is not an HTTP/1.1 response.
    Malformed(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Unsent(e) => write!(f, "the connection was closed: {e}"),
            SendError::Broken(e) => write!(f, "the connection broke: {e}"),
            SendError::Malformed(what) => write!(f, "the backend's answer is not HTTP/1.1: {what}"),
        }
    }
}

impl std::error::Error for SendError {}

fn malformed(what: impl Into<String>) -> SendError {
    SendError::Malformed(what.into())
}

impl Conn {
    pub fn new(io: Io) -> Conn {
        Conn { io, buf: BytesMut::new() }
    }

    /// Whether the backend closed the connection (or sent bytes nobody asked
    /// for) while it idled in the pool: it is then of no use.
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        !Pin::new(&mut self.io).poll_read(&mut cx, &mut probe).is_pending()
    }

    /// Sends `request` (in origin form, with its `Host`) and reads the response
    /// head; the body is read as the response's body is polled. `slot` gets the
    /// connection back if the body ends cleanly and the connection can carry
    /// another request.
    pub async fn send(mut self, request: &Request<Bytes>, slot: Slot) -> Result<Response<Body>, SendError> {
        let head_only = request.method() == Method::HEAD;
        let bytes = encode(request);
        let sent = self.io.write(&bytes).await.map_err(SendError::Unsent)?;
        if sent == 0 {
            return Err(SendError::Unsent(io::ErrorKind::WriteZero.into()));
        }
        self.io.write_all(&bytes[sent..]).await.map_err(SendError::Broken)?;
        self.io.flush().await.map_err(SendError::Broken)?;
        let head = self.read_head().await?;
        let framing = framing(&head, head_only)?;
        let reusable = reusable(&head, framing);
        let mut body = Body { conn: Some(self), framing, reusable, slot };
        if body.framing == Framing::Length(0) {
            body.finish();
        }
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// Reads response heads until a final one (1xx heads other than 101 are
    /// passed over, as RFC 9110 §15.2 asks of a client).
    async fn read_head(&mut self) -> Result<Head, SendError> {
        loop {
            if let Some(head) = parse_head(&mut self.buf)? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(malformed(format!("a response head longer than {MAX_HEAD_BYTES} bytes")));
            }
            let read = std::future::poll_fn(|cx| self.poll_read_more(cx)).await.map_err(SendError::Broken)?;
            if read == 0 {
                return Err(SendError::Broken(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the response head was complete",
                )));
            }
        }
    }

    /// Reads what the socket has into the buffer; `Ok(0)` is the backend's close.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_BYTES / 4 {
            self.buf.reserve(READ_BYTES);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// The request line, the fields and the body, in one buffer for one write.
/// `Content-Length` is the body's own; `Transfer-Encoding` is never sent.
fn encode(request: &Request<Bytes>) -> Vec<u8> {
    let body = request.body();
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(256 + path.len() + body.len() + 32 * request.headers().len());
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodyless = matches!(*request.method(), Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS);
    if !(body.is_empty() && bodyless) {
        // Written in place: a `Vec` takes `write!` without failing.
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// A complete response head at the front of `buf`, taken off it; `None` while
/// the head is incomplete. The field values share the head's bytes rather
/// than each being copied into an allocation of its own.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, SendError> {
    // Nothing read yet (a pooled connection, before its answer): no head.
    if buf.is_empty() {
        return Ok(None);
    }
    // Left uninitialized: httparse writes the fields it finds, and zeroing
    // 128 of them (4 KB) for every head cost more than parsing one.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let length = match config.parse_response_with_uninit_headers(&mut response, buf, &mut fields) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(malformed(format!("the response head: {e}"))),
    };
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| malformed(format!("status {code}")))?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Each field's name, and where its value lies in the head, kept while the
    // parser still borrows the buffer: one allocation for all the fields.
    let start = buf.as_ptr() as usize;
    let mut fields = Vec::with_capacity(response.headers.len());
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| malformed("a field name"))?;
        let offset = field.value.as_ptr() as usize - start;
        fields.push((name, offset..offset + field.value.len()));
    }
    let head = buf.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| malformed(format!("the value of `{name}`")))?;
        headers.append(name, value);
    }
    Ok(Some(Head { status, version, headers }))
}

/// Whether the connection can carry another request once this response's body
/// has ended: HTTP/1.1, not closing, the body's end known from its framing, and
/// no switch to another protocol (the proxy asks for none; a backend that
/// switches anyway has left HTTP on this connection).
fn reusable(head: &Head, framing: Framing) -> bool {
    head.version == Version::HTTP_11
        && !closes(&head.headers)
        && framing != Framing::UntilClose
        && head.status != StatusCode::SWITCHING_PROTOCOLS
}

/// Whether the backend says it closes the connection after this response.
fn closes(headers: &HeaderMap) -> bool {
    let tokens = headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok());
    tokens.flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// The body ends when the backend closes the connection.
    UntilClose,
    /// The body has ended (or broken).
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// A chunk-size line is next.
    Size,
    /// This much of the chunk's data is left.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    /// Trailer fields, up to an empty line, are next.
    Trailers,
}

fn framing(head: &Head, head_only: bool) -> Result<Framing, SendError> {
    let status = head.status;
    if head_only || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        let mut last = None;
        for value in head.headers.get_all(header::TRANSFER_ENCODING) {
            let value = value.to_str().map_err(|_| malformed("`transfer-encoding`"))?;
            last = value.split(',').map(str::trim).rfind(|c| !c.is_empty()).or(last);
        }
        let chunked = last.is_some_and(|c| c.eq_ignore_ascii_case("chunked"));
        return Ok(if chunked { Framing::Chunked(Chunked::Size) } else { Framing::UntilClose });
    }
    let mut length = None;
    for value in head.headers.get_all(header::CONTENT_LENGTH) {
        let value = value.to_str().map_err(|_| malformed("`content-length`"))?;
        for part in value.split(',') {
            let n = digits(part.trim(), 10).ok_or_else(|| malformed(format!("`content-length: {value}`")))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("`content-length` values that disagree"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// What the buffered bytes gave.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Data(Bytes),
    End,
    /// More bytes must be read first.
    More,
}

/// Decodes what it can of the body from the front of `buf`. At most one piece
/// of data is returned per call; `End` leaves any bytes after the body in `buf`.
fn step(framing: &mut Framing, buf: &mut BytesMut) -> Result<Step, String> {
    match *framing {
        Framing::Done => Ok(Step::End),
        Framing::Length(0) => {
            *framing = Framing::Done;
            Ok(Step::End)
        }
        Framing::Length(left) if !buf.is_empty() => {
            let n = left.min(buf.len() as u64);
            *framing = Framing::Length(left - n);
            Ok(Step::Data(buf.split_to(n as usize).freeze()))
        }
        Framing::UntilClose if !buf.is_empty() => Ok(Step::Data(buf.split().freeze())),
        Framing::Length(_) | Framing::UntilClose => Ok(Step::More),
        Framing::Chunked(state) => step_chunked(framing, state, buf),
    }
}

fn step_chunked(framing: &mut Framing, state: Chunked, buf: &mut BytesMut) -> Result<Step, String> {
    let mut state = state;
    loop {
        match state {
            Chunked::Size => {
                let Some(line) = take_line(buf)? else { break };
                let size = chunk_size(&line)?;
                state = if size == 0 { Chunked::Trailers } else { Chunked::Data(size) };
            }
            Chunked::Data(left) => {
                if buf.is_empty() {
                    break;
                }
                let n = left.min(buf.len() as u64);
                state = if n == left { Chunked::DataEnd } else { Chunked::Data(left - n) };
                *framing = Framing::Chunked(state);
                return Ok(Step::Data(buf.split_to(n as usize).freeze()));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    break;
                }
                if &buf[..2] != b"\r\n" {
                    return Err("a chunk's data is longer than its size".to_owned());
                }
                buf.advance(2);
                state = Chunked::Size;
            }
            Chunked::Trailers => {
                let Some(line) = take_line(buf)? else { break };
                if line.is_empty() {
                    *framing = Framing::Done;
                    return Ok(Step::End);
                }
            }
        }
    }
    *framing = Framing::Chunked(state);
    Ok(Step::More)
}

/// A line (without its CRLF) from the front of `buf`, once it is complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_LINE_BYTES {
            return Err(format!("a chunk-size or trailer line longer than {MAX_LINE_BYTES} bytes"));
        }
        return Ok(None);
    };
    let mut line = buf.split_to(end + 2);
    line.truncate(end);
    Ok(Some(line))
}

/// A chunk-size line's size (hex digits, then optional extensions after `;`).
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let size = size.trim_ascii();
    let bad = || format!("the chunk-size line `{}`", String::from_utf8_lossy(line));
    if size.is_empty() || size.len() > 15 {
        return Err(bad());
    }
    let text = std::str::from_utf8(size).map_err(|_| bad())?;
    digits(text, 16).ok_or_else(bad)
}

/// A number of digits alone in `radix` (`1*DIGIT`, `1*HEXDIG`): Rust's own
/// parsing also takes a leading `+`, which no HTTP length may have.
fn digits(text: &str, radix: u32) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| (b as char).is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(text, radix).ok()
}

/// A response body read from its connection as it is polled.
pub struct Body {
    conn: Option<Conn>,
    framing: Framing,
    /// Whether the connection may carry another request once the body ends.
    reusable: bool,
    slot: Slot,
}

impl Body {
    /// The body has ended cleanly: its connection goes to the slot if it can
    /// carry another request and nothing follows the body.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let Some(conn) = self.conn.take() else { return };
        if self.reusable && conn.buf.is_empty() {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        }
    }

    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match step(&mut this.framing, &mut conn.buf) {
                Ok(Step::Data(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(what) => return this.fail(malformed(what)),
            }
            match ready!(conn.poll_read_more(cx)) {
                Err(e) => return this.fail(e),
                Ok(0) if this.framing == Framing::UntilClose => {
                    this.framing = Framing::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-body")),
                Ok(_) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in two pieces split at every byte, and checks the
    /// data and what is left after the body against `expected` (or the error).
    fn check(framing: Framing, wire: &str, expected: Result<(&str, &str), &str>) {
        for split in 0..=wire.len() {
            let mut state = framing;
            let (mut buf, mut data, mut result) = (BytesMut::new(), Vec::new(), None);
            for (n, piece) in [&wire[..split], &wire[split..]].into_iter().enumerate() {
                buf.extend_from_slice(piece.as_bytes());
                loop {
                    match step(&mut state, &mut buf) {
                        Ok(Step::Data(bytes)) => data.extend_from_slice(&bytes),
                        Ok(Step::More) => break,
                        Ok(Step::End) => {
                            result = Some(Ok(()));
                            break;
                        }
                        Err(e) => {
                            result = Some(Err(e));
                            break;
                        }
                    }
                }
                if result.is_some() {
                    // What follows the body stays behind, read or not.
                    if n == 0 {
                        buf.extend_from_slice(&wire.as_bytes()[split..]);
                    }
                    break;
                }
            }
            let got = match result {
                Some(Ok(())) => Ok((String::from_utf8(data).unwrap(), String::from_utf8(buf.to_vec()).unwrap())),
                Some(Err(e)) => Err(e),
                None => Err("incomplete".to_owned()),
            };
            match (&got, expected) {
                (Ok((d, rest)), Ok((want_d, want_rest))) => {
                    assert_eq!((d.as_str(), rest.as_str()), (want_d, want_rest), "{wire:?} split at {split}");
                }
                (Err(e), Err(want)) => assert!(e.contains(want), "{wire:?} split at {split}: {e}"),
                _ => panic!("{wire:?} split at {split}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn bodies_are_decoded_whatever_the_reads() {
        let chunked = Framing::Chunked(Chunked::Size);
        check(Framing::Length(5), "hello", Ok(("hello", "")));
        check(Framing::Length(5), "helloHTTP", Ok(("hello", "HTTP")));
        check(Framing::Length(0), "", Ok(("", "")));
        check(chunked, "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", Ok(("hello world", "")));
        check(chunked, "A;ext=1\r\n0123456789\r\n0\r\n\r\nnext", Ok(("0123456789", "next")));
        check(chunked, "1\r\nx\r\n0\r\ntrailer: 1\r\n\r\n", Ok(("x", "")));
        check(chunked, "3\r\nabcd\r\n0\r\n\r\n", Err("longer than its size"));
        check(chunked, "zz\r\n", Err("chunk-size line"));
        check(chunked, "\r\n", Err("chunk-size line"));
        check(chunked, "+5\r\nhello\r\n0\r\n\r\n", Err("chunk-size line"));
        check(chunked, "5\r\nhel", Err("incomplete"));
    }

    fn head(status: u16, fields: &[(&str, &str)]) -> Head {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        Head { status: StatusCode::from_u16(status).unwrap(), version: Version::HTTP_11, headers }
    }

    #[test]
    fn the_body_framing_follows_rfc_9112() {
        let chunked = Framing::Chunked(Chunked::Size);
        let check = |status, fields: &[(&str, &str)], head_only, expected: Option<Framing>| {
            let got = framing(&head(status, fields), head_only).ok();
            assert_eq!(got, expected, "{status} {fields:?} head_only={head_only}");
        };
        check(200, &[("content-length", "12")], false, Some(Framing::Length(12)));
        check(200, &[("content-length", "12")], true, Some(Framing::Length(0)));
        check(204, &[], false, Some(Framing::Length(0)));
        check(304, &[("content-length", "12")], false, Some(Framing::Length(0)));
        check(200, &[("transfer-encoding", "chunked"), ("content-length", "3")], false, Some(chunked));
        check(200, &[("transfer-encoding", "gzip, chunked")], false, Some(chunked));
        check(200, &[("transfer-encoding", "gzip")], false, Some(Framing::UntilClose));
        check(200, &[], false, Some(Framing::UntilClose));
        check(200, &[("content-length", "7, 7")], false, Some(Framing::Length(7)));
        check(200, &[("content-length", "7"), ("content-length", "8")], false, None);
        check(200, &[("content-length", "-1")], false, None);
        check(200, &[("content-length", "+7")], false, None);
        check(200, &[("content-length", "7,")], false, None);
    }

    #[test]
    fn heads_are_read_field_by_field_and_the_body_is_left() {
        // What `parse_head` made of `wire` (status and fields, "partial" or the
        // error), and what it left in the buffer.
        let check = |wire: &str, expected: &str, left: &str| {
            let mut buf = BytesMut::from(wire);
            let got = match parse_head(&mut buf) {
                Ok(Some(head)) => {
                    let fields = head.headers.iter().map(|(n, v)| format!(" {n}={}", v.to_str().unwrap()));
                    format!("{}{}", head.status.as_u16(), fields.collect::<String>())
                }
                Ok(None) => "partial".to_owned(),
                Err(e) => e.to_string(),
            };
            assert_eq!(got, expected, "{wire:?}");
            assert_eq!(&buf[..], left.as_bytes(), "{wire:?}");
        };
        let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: 1\r\nx-a: 2\r\nX-Empty:\r\n\r\n";
        let fields = "200 content-type=application/json x-a=1 x-a=2 x-empty=";
        check(&format!("{ok}{{\"a\":1}}"), fields, "{\"a\":1}");
        check(ok, fields, "");
        check("HTTP/1.1 200 OK\r\nX-A: 1\r\n", "partial", "HTTP/1.1 200 OK\r\nX-A: 1\r\n");
        check("HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\n\r\nx", "429 retry-after=3", "x");
        let bad = "HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\n\r\n";
        let not_http = "the backend's answer is not HTTP/1.1: ";
        check(bad, &format!("{not_http}the response head: invalid header value"), bad);
        check("HTTP/1.1 099 Odd\r\n\r\n", &format!("{not_http}status 99"), "HTTP/1.1 099 Odd\r\n\r\n");
    }

    #[test]
    fn only_connections_whose_next_bytes_are_a_response_are_reused() {
        let check = |status, fields: &[(&str, &str)], version, expected: bool| {
            let mut head = head(status, fields);
            head.version = version;
            let framing = framing(&head, false).unwrap();
            assert_eq!(reusable(&head, framing), expected, "{status} {fields:?} {version:?}");
        };
        check(200, &[("content-length", "2")], Version::HTTP_11, true);
        check(204, &[], Version::HTTP_11, true);
        check(200, &[("transfer-encoding", "chunked")], Version::HTTP_11, true);
        check(200, &[("content-length", "2"), ("connection", "keep-alive, Close")], Version::HTTP_11, false);
        check(200, &[("content-length", "2")], Version::HTTP_10, false);
        check(200, &[], Version::HTTP_11, false);
        check(101, &[("upgrade", "websocket")], Version::HTTP_11, false);
    }

    #[test]
    fn requests_are_written_with_the_bodys_own_length() {
        let check = |request: Request<Bytes>, expected: &str| {
            assert_eq!(String::from_utf8(encode(&request)).unwrap(), expected);
        };
        let post = Request::post("/a?b=1")
            .header("host", "h:1")
            .header("content-length", "99")
            .header("transfer-encoding", "chunked")
            .body(Bytes::from_static(b"{}"))
            .unwrap();
        check(post, "POST /a?b=1 HTTP/1.1\r\nhost: h:1\r\ncontent-length: 2\r\n\r\n{}");
        let get = Request::get("/m").header("host", "h").body(Bytes::new()).unwrap();
        check(get, "GET /m HTTP/1.1\r\nhost: h\r\n\r\n");
        let empty_post = Request::post("/m").header("host", "h").body(Bytes::new()).unwrap();
        check(empty_post, "POST /m HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n");
    }
}
