//! Serving the operator API. `axum::serve` sets no timer, so hyper never times out a client
//! that sends its request headers slowly (or never): each would hold a connection and a task
//! forever. This loop is `axum::serve` with hyper's HTTP/1 header read timeout (which also
//! closes keep-alive connections idle for that long) and a bounded graceful shutdown.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::Error;

/// How long requests in flight may take to finish once the twin stops.
const DRAIN: Duration = Duration::from_secs(5);

pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    stopped: impl Future<Output = ()>,
) -> Result<(), Error> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(stopped);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning; the listener stays.
                    tracing::warn!(error = %e, "operator API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%remote, "operator API connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("operator API: requests still running {DRAIN:?} after the stop; cut off");
    }
    connections.abort_all();
    Ok(())
}
