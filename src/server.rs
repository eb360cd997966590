//! The accept loop. Hand-written rather than `axum::serve` because shutdown must be bounded:
//! every connection task lives in a `JoinSet`, so requests still running at the drain deadline
//! are cancelled (their transactions roll back) instead of outliving the server.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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
    let builder = Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
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
                    // Small responses should leave at once, not wait on Nagle's algorithm.
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(router.clone());
                    let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let connection = graceful.watch(connection);
                    connections.spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Usually EMFILE or ECONNABORTED: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    tracing::info!(
        open = connections.len(),
        "no longer accepting connections; draining"
    );

    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain.timeout) => {
            tracing::warn!(timeout = ?drain.timeout, open = connections.len(), "drain timeout reached; cancelling remaining requests");
            connections.abort_all();
        }
    }
    while connections.join_next().await.is_some() {}
}
