//! The accept loop. Hand-written rather than `axum::serve` because shutdown must be bounded:
//! every connection task lives in a `JoinSet`, so requests still running at the drain deadline
//! are cancelled (their transactions roll back) instead of outliving the server. Connections
//! that open with an event-stream request are served by [`event_stream`]; those that open with
//! an artifact download by [`download`] (and by hyper after it); all others by hyper.

mod download;
mod event_stream;

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's buffers per connection (request head read, response write queue). A response body that
/// the client does not take (a stalled event stream) waits in here at most.
const MAX_BUFFER: usize = 64 * 1024;
/// The kernel's send buffer per connection. Fixed rather than auto-tuned (which grows to
/// megabytes), so a client that stops reading pins a known amount of memory; ample behind a load
/// balancer on the same network.
const SEND_BUFFER: usize = 128 * 1024;
/// A peer that acknowledges nothing for this long (gone, or stalled with a full window) is
/// dropped by the kernel; its event stream resumes from its last id when it comes back.
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`). Thousands of
/// clients reconnect at once when a replica goes away; a short queue drops their SYNs and each
/// dropped one waits a full retransmission timeout (1 s, then 3 s) before trying again.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the HTTP listener.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted server binds at once, without waiting out the old sockets' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How shutdown proceeds once `shutdown` is cancelled.
pub struct Drain {
    /// Keep accepting this long (readiness already fails) so load balancers move away first.
    pub readiness_delay: Duration,
    /// Then give in-flight requests at most this long before cancelling them.
    pub timeout: Duration,
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    drain: Drain,
) {
    // HTTP/1.1 only: TLS and HTTP/2 end at the load balancer. A client gets this long to send a
    // request head (counted from the moment it connects), and an idle keep-alive connection this
    // long before it is closed, so slow or silent clients cannot hold connections forever.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUFFER);
    let graceful = GracefulShutdown::new();
    // Cancelled once the listener stops: connections that have not sent a request yet close.
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    let stop_accepting = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain.readiness_delay).await;
    };
    tokio::pin!(stop_accepting);

    loop {
        tokio::select! {
            () = &mut stop_accepting => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    bound_socket(&stream);
                    let router = router.clone();
                    let builder = builder.clone();
                    let watcher = graceful.watcher();
                    let closing = closing.clone();
                    let head_deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
                    connections.spawn(async move {
                        match opening(&stream, head_deadline, &closing).await {
                            Opening::EventStream => {
                                event_stream::serve(stream, router, head_deadline, &closing).await;
                            }
                            Opening::Download => {
                                let rest = download::serve(stream, router.clone(), head_deadline, &closing).await;
                                if let Some(rest) = rest {
                                    Box::pin(serve_hyper(&builder, watcher, rest, router)).await;
                                }
                            }
                            Opening::Other => {
                                Box::pin(serve_hyper(&builder, watcher, stream, router)).await;
                            }
                            Opening::Nothing => {}
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors (EMFILE/ENFILE): back off briefly rather than spin.
                    // Anything else (a client that reset before accept) concerns one connection.
                    let exhausted = matches!(e.raw_os_error(), Some(code) if code == 23 || code == 24);
                    tracing::warn!(error = %e, "accept failed");
                    if exhausted {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    closing.cancel();
    tracing::info!(
        open = connections.len(),
        "no longer accepting connections; draining"
    );

    // hyper's connections finish their request in flight and close; event streams end by
    // themselves (they follow the same shutdown signal). Whatever is left at the deadline is cut.
    let drained = tokio::time::timeout(drain.timeout, async {
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?drain.timeout, open = connections.len(), "drain timeout reached; cancelling remaining requests");
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// Serves a connection's requests with hyper until it closes.
async fn serve_hyper<I>(
    builder: &http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    router: Router,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    // Boxed by the callers: hyper's connection state is large, and inline it would size every
    // connection task, event streams included.
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// What the first bytes of a connection ask for.
enum Opening {
    EventStream,
    Download,
    Other,
    /// The client went away, sent nothing in time, or the server is closing.
    Nothing,
}

/// Looks at the connection's first bytes without consuming them. Only a first read that shows
/// the whole route selects a path of its own; anything shorter or different goes to hyper.
async fn opening(
    stream: &tokio::net::TcpStream,
    deadline: tokio::time::Instant,
    closing: &CancellationToken,
) -> Opening {
    const SEEN: usize = max(event_stream::PREFIX.len() + 1, download::PREFIX.len());
    let mut first = [0u8; SEEN];
    let peeked = tokio::select! {
        () = closing.cancelled() => return Opening::Nothing,
        peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => peeked,
    };
    let seen = match peeked {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Opening::Nothing,
        Ok(Ok(n)) => &first[..n],
    };
    let events = event_stream::PREFIX;
    if seen.len() > events.len()
        && seen.starts_with(events)
        && matches!(seen[events.len()], b' ' | b'?')
    {
        Opening::EventStream
    } else if seen.starts_with(download::PREFIX) {
        Opening::Download
    } else {
        Opening::Other
    }
}

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// Per-connection socket settings; a failure only loses an optimisation, never the connection.
fn bound_socket(stream: &tokio::net::TcpStream) {
    // Small responses should leave at once, not wait on Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    let _ = socket.set_send_buffer_size(SEND_BUFFER);
    let _ = socket.set_tcp_user_timeout(Some(USER_TIMEOUT));
}
