//! The admin listener's answer while the control plane waits for its database at start:
//! 503 `{"message":"database unavailable"}` to every request, `/status` included, so a load
//! balancer or readiness probe sees a control plane that is up but not ready.

use std::os::fd::AsFd;
use std::time::Duration;

use axum::http::StatusCode;
use axum::{Json, Router};
use serde_json::json;

/// How long stopping waits for requests in flight before dropping their connections.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A server answering 503 on a second handle of the admin listener; [`Unavailable::stop`]
/// it before the real API serves on the listener itself.
pub struct Unavailable {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Unavailable {
    /// Starts answering on `listener` (which stays the caller's: the server accepts on a
    /// duplicate of its socket).
    pub fn serve(listener: &tokio::net::TcpListener) -> std::io::Result<Unavailable> {
        let socket = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
        socket.set_nonblocking(true)?;
        let socket = tokio::net::TcpListener::from_std(socket)?;
        // `Connection: close`, so a client's next request opens a new connection, which
        // the real API answers once it serves.
        let app = Router::new().fallback(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(axum::http::header::CONNECTION, "close")],
                Json(json!({"message": "database unavailable"})),
            )
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(charter_runtime::http::serve_router(
            "admin",
            socket,
            charter_runtime::http::Limits::share_of_file_limit(0.25),
            app,
            stopped,
        ));
        Ok(Unavailable { stop, task })
    }

    /// Stops accepting and waits (bounded) for requests in flight; the duplicate socket is
    /// closed when this returns.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
}
