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
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::event_stream::{Head, close_after_answer, frame_into, read_head, response_head};
use crate::storage::FileSpan;

/// The request line start that selects this path.
pub(super) const PREFIX: &[u8] = b"GET /v1/artifacts/";
/// A streamed answer's frames that are ready at once are gathered up to about this size per write.
const COALESCE: usize = 64 * 1024;
/// Most bytes one hop to the blocking pool sends before giving its thread back.
#[cfg(target_os = "linux")]
const BURST: u64 = 16 * 1024 * 1024;
/// Most time one hop to the blocking pool spends before giving its thread back.
#[cfg(target_os = "linux")]
const BURST_TIME: std::time::Duration = std::time::Duration::from_millis(50);
/// Hops to the blocking pool that downloads make at once, at most: the pool also serves uploads
/// and every file open, and a crowd of downloads must not starve them.
#[cfg(target_os = "linux")]
const MAX_BURSTS: usize = 16;
/// Largest single `sendfile` call.
#[cfg(target_os = "linux")]
const STEP: u64 = 4 * 1024 * 1024;
/// How long a burst that is moving bytes waits for room in a full socket before giving its
/// thread back.
#[cfg(target_os = "linux")]
const ROOM_WAIT_MS: libc::c_int = 5;

#[cfg(target_os = "linux")]
static BURSTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_BURSTS);

/// Serves the connection's first request, a download. Returns the connection, with the bytes
/// read past that request, when it goes on (served by hyper). A head this path does not take (too
/// large for it, or announcing a body) goes to hyper whole, which answers it as it would anywhere.
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
    let (request, mut read, len) = match head {
        Ok(Ok((Head::Request(request), read, len))) => (request, read, len),
        Ok(Ok((Head::Refused(_), read, _))) => return Some(Resumed::new(stream, read)),
        Ok(Err(_)) | Err(_) => return None,
    };
    let after = read.split_off(len);
    let keep_alive = wants_keep_alive(&request);
    let version = request.version();
    let response = match Box::pin(router.oneshot(request)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    // A server closing answers this request and no more.
    let keep_alive = keep_alive && !closing.is_cancelled();
    match Box::pin(respond(&mut stream, response, version, keep_alive)).await {
        Ok(true) => Some(Resumed::new(stream, after)),
        Ok(false) => {
            let _ = close_after_answer(&mut stream).await;
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
        // Corked, the head leaves with the first bytes of the file instead of in a packet of its
        // own; uncorking at the end sends the last partial packet at once.
        let _ = socket2::SockRef::from(&*stream).set_tcp_cork(true);
        stream.write_all(&head).await?;
        send_file(stream, span).await?;
        let _ = socket2::SockRef::from(&*stream).set_tcp_cork(false);
        return Ok(keep_alive);
    }
    #[cfg(not(target_os = "linux"))]
    drop(span);

    let length = declared.or_else(|| axum::body::HttpBody::size_hint(&body).exact());
    // Without a length, HTTP/1.1 frames the body in chunks; HTTP/1.0 ends it with the close.
    let chunked = length.is_none() && version == Version::HTTP_11;
    let keep_alive = keep_alive && (length.is_some() || chunked);
    // The head leaves with the first frame; frames already waiting leave together, and nothing
    // waits for a frame that is not ready.
    let mut out = response_head(status, &parts.headers, length, chunked, keep_alive);
    let mut frames = body.into_data_stream();
    let mut written = 0u64;
    let mut ended = false;
    while !ended {
        match frames.next().await {
            Some(frame) => {
                let data = frame.map_err(io::Error::other)?;
                written += data.len() as u64;
                frame_into(&mut out, &data, chunked);
            }
            None => ended = true,
        }
        while !ended && out.len() < COALESCE {
            match frames.next().now_or_never() {
                Some(Some(frame)) => {
                    let data = frame.map_err(io::Error::other)?;
                    written += data.len() as u64;
                    frame_into(&mut out, &data, chunked);
                }
                Some(None) => ended = true,
                None => break,
            }
        }
        if length.is_some_and(|len| written > len) {
            return Err(io::Error::other(
                "the body is longer than its content-length",
            ));
        }
        if ended {
            if length.is_some_and(|len| written != len) {
                return Err(io::Error::other(
                    "the body is shorter than its content-length",
                ));
            }
            if chunked {
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
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
    let mut unfinished = Unfinished(Some(socket.clone()));
    let end = span.range.end;
    let mut at = span.range.start;
    let mut copy = false;
    while at < end {
        // Readiness is taken before the burst and cleared after it only if nothing new came in
        // meanwhile, so room that opens during a burst is never missed.
        let mut ready = room.writable().await?;
        let turn = BURSTS.acquire().await.map_err(io::Error::other)?;
        let (file, socket) = (span.file.clone(), socket.clone());
        let burst = tokio::task::spawn_blocking(move || send_burst(&file, &socket, at, end, copy))
            .await
            .map_err(io::Error::other)?;
        drop(turn);
        span.count_sent(burst.reached - at);
        at = burst.reached;
        copy = burst.copy;
        if burst.outcome? {
            ready.clear_ready();
        }
    }
    unfinished.0 = None;
    Ok(())
}

/// Shuts the socket down when a download stops before its end (its task cancelled at the drain
/// deadline, or an error), so a burst still running on the blocking pool fails at its next send
/// instead of sending on.
#[cfg(target_os = "linux")]
struct Unfinished(Option<std::sync::Arc<std::os::fd::OwnedFd>>);

#[cfg(target_os = "linux")]
impl Drop for Unfinished {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        if let Some(socket) = self.0.take() {
            // SAFETY: the descriptor is open (the `Arc` holds it); shutdown touches no memory.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

#[cfg(target_os = "linux")]
struct Burst {
    /// Where the send got to.
    reached: u64,
    /// `Ok(true)` when it stopped because the socket stayed full.
    outcome: io::Result<bool>,
    /// The file's system cannot `sendfile`: the bytes are copied (`pread` and `send`).
    copy: bool,
}

/// Sends from `at` towards `end`: at most [`BURST`] bytes, for about [`BURST_TIME`] at most.
#[cfg(target_os = "linux")]
fn send_burst(
    file: &std::fs::File,
    socket: &std::os::fd::OwnedFd,
    mut at: u64,
    end: u64,
    mut copy: bool,
) -> Burst {
    let started = std::time::Instant::now();
    let limit = (at + BURST).min(end);
    let mut buf = Vec::new();
    // Whether the last send moved bytes: a socket that has taken nothing since it last said it
    // had room gives the thread back instead of being asked again.
    let mut moved = false;
    while at < limit && started.elapsed() < BURST_TIME {
        let count = (limit - at).min(STEP);
        let sent = if copy {
            copy_once(file, socket, at, count, &mut buf)
        } else {
            send_once(file, socket, at, count)
        };
        match sent {
            Ok(0) => {
                let outcome = Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the object's file ends before its size",
                ));
                return Burst {
                    reached: at,
                    outcome,
                    copy,
                };
            }
            Ok(n) => {
                at += n;
                moved = true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !moved || !wait_for_room(socket) {
                    return Burst {
                        reached: at,
                        outcome: Ok(true),
                        copy,
                    };
                }
                moved = false;
            }
            // A file system without `sendfile` support, found before any byte of it was sent.
            Err(e) if !copy && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                copy = true;
            }
            Err(e) => {
                return Burst {
                    reached: at,
                    outcome: Err(e),
                    copy,
                };
            }
        }
    }
    Burst {
        reached: at,
        outcome: Ok(false),
        copy,
    }
}

/// One `sendfile` of up to `count` bytes from `at`.
#[cfg(target_os = "linux")]
fn send_once(
    file: &std::fs::File,
    socket: &std::os::fd::OwnedFd,
    at: u64,
    count: u64,
) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut offset =
        libc::off_t::try_from(at).map_err(|_| io::Error::other("file offset out of range"))?;
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    // SAFETY: both descriptors are open for the whole call (borrowed from owners that outlive
    // it); sendfile reads `offset` and writes the new offset back into it, nothing else of ours.
    let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut offset, count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as u64)
}

/// One read of up to 1 MiB from `at` and one send of it, for files `sendfile` cannot read; the
/// part the socket does not take is read again next time.
#[cfg(target_os = "linux")]
fn copy_once(
    file: &std::fs::File,
    socket: &std::os::fd::OwnedFd,
    at: u64,
    count: u64,
    buf: &mut Vec<u8>,
) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(count.min(1 << 20)).unwrap_or(1 << 20);
    buf.resize(len, 0);
    let read = file.read_at(&mut buf[..len], at)?;
    if read == 0 {
        return Ok(0);
    }
    // SAFETY: `buf[..read]` is initialised and outlives the call; the descriptor is open.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            buf.as_ptr().cast::<libc::c_void>(),
            read,
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as u64)
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::OwnedFd;

    /// Both ways of sending (sendfile, and the copy for file systems without it) deliver a range
    /// whole and in order through a socket that fills up, giving the thread back when it is full.
    #[test]
    fn bursts_send_a_range_whole_through_a_full_socket() {
        let path = std::env::temp_dir().join(format!("cyb-burst-{}", uuid::Uuid::new_v4()));
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        for copy in [false, true] {
            let (sender, mut receiver) = std::os::unix::net::UnixStream::pair().expect("pair");
            sender.set_nonblocking(true).expect("nonblocking");
            let (go, start_reading) = std::sync::mpsc::channel::<()>();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                if start_reading.recv().is_ok() {
                    receiver.read_to_end(&mut got).expect("read");
                }
                got
            });
            let socket = OwnedFd::from(sender);
            let (start, end) = (1234u64, data.len() as u64 - 77);
            // Nobody reads yet: the first burst fills the socket and gives the thread back.
            let first = send_burst(&file, &socket, start, end, copy);
            assert!(
                first.outcome.expect("no error"),
                "stopped by a full socket (copy={copy})"
            );
            assert!(
                first.reached > start && first.reached < end,
                "{}",
                first.reached
            );
            go.send(()).expect("reader waiting");
            let mut at = first.reached;
            while at < end {
                let burst = send_burst(&file, &socket, at, end, copy);
                assert!(burst.reached >= at, "never backwards");
                assert_eq!(burst.copy, copy, "the mode stays as asked");
                if burst.outcome.expect("no error") {
                    wait_for_room(&socket);
                }
                at = burst.reached;
            }
            drop(socket);
            let got = reader.join().expect("reader");
            assert!(got == data[start as usize..end as usize], "copy={copy}");
        }
        let _ = std::fs::remove_file(&path);
    }
}
