//! Artifact downloads, with the bytes moved by the kernel.
//!
//! The local backend keeps an object as a span of a file. hyper can only send bytes it holds, so
//! through hyper every byte of a download is read from the page cache into the server and copied
//! again into the socket, and a download runs only as fast as one core copies twice. A connection
//! whose first request is `GET /v1/artifacts/…` is served here instead: the request goes through
//! the same router (every middleware layer, the same handler and errors); when the answer is a
//! span of a local file, the head is written here and `sendfile` moves the bytes from the page
//! cache to the socket without them entering the process. Any other answer (an error, a `304`, an
//! object from S3) is written as it comes. Then the connection goes to hyper for the requests that
//! follow, with whatever of them was already read.
//!
//! `sendfile` may wait for the disk, so it runs on the blocking pool, in bursts: a burst sends
//! until [`BURST`] bytes have left or the socket stays full for [`ROOM_WAIT_MS`]; then the thread
//! goes back and the download waits for room in the socket on the runtime, holding no thread. A
//! slow client costs a thread only while bytes move. The kernel's own readahead keeps the disk
//! ahead of a sequential `sendfile`: asking for more (`posix_fadvise(WILLNEED)`, as the chunked
//! reader of the storage layer does) made cold downloads slower here (0.86-0.90 against 1.21
//! GB/s, medians of five alternating reads).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, Version, header};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::event_stream::{Head, answer_once, frame_into, read_head, response_head};
use crate::storage::FileSpan;

/// The request line start that selects this path.
pub(super) const PREFIX: &[u8] = b"GET /v1/artifacts/";
/// A streamed answer's bytes are gathered up to about this size per write.
const COALESCE: usize = 64 * 1024;
/// Most bytes one hop to the blocking pool sends before giving its thread back.
#[cfg(target_os = "linux")]
const BURST: u64 = 16 * 1024 * 1024;
/// Largest single `sendfile` call.
#[cfg(target_os = "linux")]
const STEP: u64 = 4 * 1024 * 1024;
/// How long a burst waits for room in a full socket before giving its thread back.
#[cfg(target_os = "linux")]
const ROOM_WAIT_MS: libc::c_int = 5;

/// Serves the connection's first request, a download. Returns the connection, with the bytes
/// read past that request, when it stays open for more (served by hyper).
pub(super) async fn serve(
    mut stream: TcpStream,
    router: Router,
    deadline: Instant,
    closing: &CancellationToken,
) -> Option<Resumed> {
    let head = tokio::select! {
        () = closing.cancelled() => return None,
        head = Box::pin(tokio::time::timeout_at(deadline, read_head(&mut stream))) => head,
    };
    let (request, after) = match head {
        Ok(Ok((Head::Request(request), after))) => (request, after),
        Ok(Ok((Head::Refused(answer), _))) => {
            let _ = Box::pin(answer_once(&mut stream, answer)).await;
            return None;
        }
        Ok(Err(_)) | Err(_) => return None,
    };
    let keep_alive = wants_keep_alive(&request);
    let version = request.version();
    let response = match Box::pin(router.oneshot(request)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    match Box::pin(respond(&mut stream, response, version, keep_alive)).await {
        Ok(true) if !closing.is_cancelled() => Some(Resumed::new(stream, after)),
        Ok(_) => {
            let _ = stream.shutdown().await;
            None
        }
        // Cut off mid-answer: the client sees a short body.
        Err(e) => {
            tracing::debug!(error = %e, "download ended early");
            None
        }
    }
}

/// HTTP/1.1 keeps the connection unless the request says `Connection: close`; HTTP/1.0 closes.
fn wants_keep_alive(request: &Request<Body>) -> bool {
    request.version() == Version::HTTP_11
        && !request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| {
                v.as_bytes()
                    .split(|b| *b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
            })
}

/// Writes the answer. `Ok(true)`: it is complete and the connection may carry another request.
async fn respond(
    stream: &mut TcpStream,
    response: Response<Body>,
    version: Version,
    keep_alive: bool,
) -> io::Result<bool> {
    let (mut parts, body) = response.into_parts();
    let span = parts.extensions.remove::<FileSpan>();
    let status = parts.status;
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        let head = response_head(status, &parts.headers, None, false, keep_alive);
        stream.write_all(&head).await?;
        return Ok(keep_alive);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    #[cfg(target_os = "linux")]
    if let Some(span) = span.filter(|s| declared == Some(s.range.end - s.range.start)) {
        drop(body);
        let head = response_head(status, &parts.headers, declared, false, keep_alive);
        stream.write_all(&head).await?;
        send_file(stream, span).await?;
        return Ok(keep_alive);
    }
    #[cfg(not(target_os = "linux"))]
    drop(span);

    let length = declared.or_else(|| axum::body::HttpBody::size_hint(&body).exact());
    // Without a length, HTTP/1.1 frames the body in chunks; HTTP/1.0 ends it with the close.
    let chunked = length.is_none() && version == Version::HTTP_11;
    let keep_alive = keep_alive && (length.is_some() || chunked);
    // The head leaves with the body's first bytes (a short answer in one write).
    let mut out = response_head(status, &parts.headers, length, chunked, keep_alive);
    let mut frames = body.into_data_stream();
    let mut written = 0u64;
    while let Some(frame) = frames.next().await {
        let data = frame.map_err(io::Error::other)?;
        written += data.len() as u64;
        if length.is_some_and(|len| written > len) {
            return Err(io::Error::other(
                "the body is longer than its content-length",
            ));
        }
        frame_into(&mut out, &data, chunked);
        if out.len() >= COALESCE {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
    if length.is_some_and(|len| written != len) {
        return Err(io::Error::other(
            "the body is shorter than its content-length",
        ));
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    stream.write_all(&out).await?;
    Ok(keep_alive)
}

/// Sends the span's bytes to the socket with `sendfile`, in bursts on the blocking pool.
#[cfg(target_os = "linux")]
async fn send_file(stream: &TcpStream, span: FileSpan) -> io::Result<()> {
    use std::os::fd::AsFd;
    use std::sync::Arc;
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    // A descriptor of its own for the bursts: if this task is cancelled while one runs, the
    // burst still writes to this socket, never to a descriptor number reused meanwhile.
    let socket = Arc::new(stream.as_fd().try_clone_to_owned()?);
    // SAFETY: the `Arc` keeps the duplicated descriptor open, and naming the same socket, for at
    // least as long as the `AsyncFd` holds it; `as_raw_fd` of an `OwnedFd` never changes.
    let room = unsafe { AsyncFd::register_with_interest(socket.clone(), Interest::WRITABLE)? };
    let end = span.range.end;
    let mut at = span.range.start;
    while at < end {
        // Readiness is taken before the burst and cleared after it only if nothing new came in
        // meanwhile, so room that opens during a burst is never missed.
        let mut ready = room.writable().await?;
        let (file, socket) = (span.file.clone(), socket.clone());
        let (reached, outcome) =
            tokio::task::spawn_blocking(move || send_burst(&file, &socket, at, end))
                .await
                .map_err(io::Error::other)?;
        span.count_sent(reached - at);
        at = reached;
        if outcome? {
            ready.clear_ready();
        }
    }
    Ok(())
}

/// Sends from `at` towards `end`, at most [`BURST`] bytes. Returns where it got to, and whether
/// it stopped because the socket stayed full.
#[cfg(target_os = "linux")]
fn send_burst(
    file: &std::fs::File,
    socket: &std::os::fd::OwnedFd,
    mut at: u64,
    end: u64,
) -> (u64, io::Result<bool>) {
    use std::os::fd::AsRawFd;
    let limit = (at + BURST).min(end);
    while at < limit {
        let count = usize::try_from((limit - at).min(STEP)).unwrap_or(1 << 20);
        let Ok(mut offset) = libc::off_t::try_from(at) else {
            return (at, Err(io::Error::other("file offset out of range")));
        };
        // SAFETY: both descriptors are open for the whole call (borrowed from owners that outlive
        // it); sendfile reads `offset` and writes the new offset back into it, nothing else of ours.
        let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut offset, count) };
        match n {
            n if n > 0 => at += n as u64,
            0 => {
                return (
                    at,
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the object's file ends before its size",
                    )),
                );
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => {
                        if !wait_for_room(socket) {
                            return (at, Ok(true));
                        }
                    }
                    _ => return (at, Err(e)),
                }
            }
        }
    }
    (at, Ok(false))
}

/// Waits up to [`ROOM_WAIT_MS`] for the socket to take more (or to fail, which the next send
/// reports). False when it stayed full.
#[cfg(target_os = "linux")]
fn wait_for_room(socket: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `poll` is one valid pollfd that lives through the call; the descriptor is open.
    let n = unsafe { libc::poll(&mut poll, 1, ROOM_WAIT_MS) };
    n > 0
}

/// A connection handed on after a download, with the bytes already read past it.
pub(super) struct Resumed {
    read: Vec<u8>,
    at: usize,
    stream: TcpStream,
}

impl Resumed {
    fn new(stream: TcpStream, read: Vec<u8>) -> Self {
        Self {
            read,
            at: 0,
            stream,
        }
    }
}

impl AsyncRead for Resumed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.read.len() {
            let n = buf.remaining().min(this.read.len() - this.at);
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Resumed {
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
