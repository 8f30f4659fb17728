//! HTTP admin server (DESIGN.md §6, port 7071): `GET /health` and Prometheus `GET /metrics`.
//!
//! Routing is a pure function ([`AdminState::respond`]) of method and path; the server around it
//! is hyper 1 over HTTP/1.1. Errors are RFC 9457 problem JSON: unknown path → 404, a known path
//! with another method than GET/HEAD → 405 with `Allow`. On shutdown the listener closes first,
//! then open connections finish their current request (bounded by [`DRAIN_TIMEOUT`]).
//!
//! Start reading at [`AdminServer::serve`]; the metrics export lives in [`metrics`].

pub mod metrics;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqueduct_storage::metrics::StorageMetrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use metrics::VERSION;

/// How long open connections may take to finish after shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const JSON: &str = "application/json";
const PROBLEM_JSON: &str = "application/problem+json";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen for HTTP admin on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the admin endpoints answer from.
#[derive(Debug)]
pub struct AdminState {
    node_id: u64,
    registry: Registry,
}

impl AdminState {
    /// State for node `node_id`, exporting `storage` and an uptime counted from `started`.
    pub fn new(node_id: u64, storage: Arc<StorageMetrics>, started: Instant) -> Self {
        Self {
            node_id,
            registry: metrics::registry(storage, started),
        }
    }

    /// The response to `method path`.
    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let known = matches!(path, "/health" | "/metrics");
        if !known {
            return problem(
                StatusCode::NOT_FOUND,
                &format!("no admin endpoint at {path}; try /health or /metrics"),
            );
        }
        if method != Method::GET && method != Method::HEAD {
            let mut response = problem(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{path} answers GET and HEAD, not {method}"),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match path {
            "/health" => self.health(),
            _ => self.metrics(),
        }
    }

    fn health(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "status": "ok",
            "node_id": self.node_id,
            "version": VERSION,
        });
        with_body(StatusCode::OK, JSON, body.to_string())
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        match metrics::render(&self.registry) {
            Ok(text) => with_body(StatusCode::OK, OPENMETRICS, text),
            Err(std::fmt::Error) => problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the metrics failed",
            ),
        }
    }
}

fn problem(status: StatusCode, detail: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    with_body(status, PROBLEM_JSON, body.to_string())
}

fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A bound, not yet serving, admin server.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<AdminState>,
}

impl AdminServer {
    /// Binds `addr`; port 0 picks a free port (see [`AdminServer::local_addr`]).
    pub async fn bind(addr: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        let bind_error = |source| AdminError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        Ok(Self {
            listener,
            local_addr,
            state: Arc::new(state),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops accepting and lets open connections finish
    /// (at most [`DRAIN_TIMEOUT`]).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(());
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let state = Arc::clone(&self.state);
                        connections.spawn(serve_connection(stream, peer, state, stop_rx.clone()));
                    }
                    Err(err) => {
                        tracing::warn!(%err, "admin accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(self.listener);
        // Dropping the sender wakes every connection's `changed()`.
        drop(stop_tx);
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::warn!(
                open = connections.len(),
                "admin connections did not finish in time; closing them"
            );
            connections.shutdown().await;
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<()>,
) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = state.respond(request.method(), request.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = stop.changed(), if !stopping => {
                connection.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, %err, "admin connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use http_body_util::BodyExt;

    use super::*;

    fn state() -> AdminState {
        AdminState::new(42, Arc::new(StorageMetrics::default()), Instant::now())
    }

    async fn body_json(response: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn health_reports_node_and_version() {
        let response = state().respond(&Method::GET, "/health");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], JSON);
        let body = body_json(response).await;
        assert_eq!(
            body,
            serde_json::json!({"status": "ok", "node_id": 42, "version": VERSION})
        );
    }

    #[tokio::test]
    async fn unknown_path_is_404_problem_json() {
        let response = state().respond(&Method::GET, "/nope");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[CONTENT_TYPE], PROBLEM_JSON);
        let body = body_json(response).await;
        assert_eq!(body["type"], "about:blank");
        assert_eq!(body["title"], "Not Found");
        assert_eq!(body["status"], 404);
        assert!(body["detail"].as_str().unwrap().contains("/nope"));
    }

    #[tokio::test]
    async fn wrong_method_is_405_with_allow() {
        let response = state().respond(&Method::POST, "/metrics");
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET, HEAD");
        let body = body_json(response).await;
        assert_eq!(body["status"], 405);
        assert_eq!(body["title"], "Method Not Allowed");
    }

    #[test]
    fn metrics_is_openmetrics_text() {
        let response = state().respond(&Method::GET, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], OPENMETRICS);
    }
}
