//! The operator's own HTTP endpoints: `/healthz`, `/readyz` and `/metrics`.

use crate::telemetry::Metrics;
use crate::work_queue::Liveness;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

/// What `/readyz` reports: ready once the watches have synced (and, with leader election, once
/// this replica is either leading or standing by).
#[derive(Clone, Default)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    ready: ReadyFlag,
    liveness: Liveness,
}

pub fn router(metrics: Arc<Metrics>, ready: ReadyFlag, liveness: Liveness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            metrics,
            ready,
            liveness,
        })
}

/// Alive unless the work queue is stuck (see `WorkQueue::stall`): answering at all shows that
/// the runtime is not blocked, and the queue's progress that reconciles still run.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match state.liveness.stall() {
        None => (StatusCode::OK, "ok".to_string()),
        Some(stall) => {
            tracing::error!(%stall, "reconciles make no progress; failing /healthz so that Kubernetes restarts the operator");
            (StatusCode::SERVICE_UNAVAILABLE, stall.to_string())
        }
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.ready.get() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Binds `addr` and serves until `shutdown` turns true. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: ReadyFlag,
    liveness: Liveness,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics, ready, liveness);
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        if let Err(error) = server.await {
            tracing::error!(error = %error, "HTTP server failed");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::work_queue::{RequestKey, WorkQueue};
    use std::time::Duration;
    use tower::ServiceExt;

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn healthz_fails_while_due_work_is_not_taken_and_not_after() {
        let liveness = Liveness::new(Duration::from_secs(60));
        let app = router(
            Arc::new(Metrics::new()),
            ReadyFlag::default(),
            liveness.clone(),
        );
        // No controllers (a replica standing by): alive.
        assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);

        let queue = Arc::new(WorkQueue::new(2, Box::new(|_| 0)));
        liveness.watch(&queue);
        queue.schedule_now(&RequestKey::new("analytics", "console"));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);
        // A minute overdue with both slots free: nothing takes work from the queue.
        tokio::time::advance(Duration::from_secs(2)).await;
        let (status, body) = get(app.clone(), "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "stalled: a request is 61 s overdue while 2 reconcile slots are free"
        );
        // Taken: alive again.
        let running = queue.next(|_| ()).await;
        assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);
        drop(running);
        // The controllers stopped (leadership lost): nothing to judge.
        queue.schedule_now(&RequestKey::new("analytics", "console"));
        drop(queue);
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(get(app, "/healthz").await.0, StatusCode::OK);
    }
}
