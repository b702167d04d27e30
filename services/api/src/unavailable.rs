//! The API of a node that holds no model yet (it waits for one to be
//! replicated or imported): every route answers 503 in OpenAI's error shape
//! with `Retry-After`, and `GET /health` answers 503 with what the node
//! shows of itself (to a caller with a key, as the full API does).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::conn::{serve_connections, ConnLimits};
use crate::error::ApiError;
use crate::keys::ApiKeys;
use crate::tls::TlsListener;
use crate::ServeError;

/// `/health`'s fields while unavailable (`true`: the caller may see details).
pub type HealthFields = Arc<dyn Fn(bool) -> Map<String, Value> + Send + Sync>;

struct Unavailable {
    keys: Option<ApiKeys>,
    health: HealthFields,
    reason: String,
}

/// Serves the unavailable API on `listen` (HTTPS with `tls`) until `until`
/// completes, then closes the listener so the full API can take the address.
/// `reason` is the one line every refused request gets.
pub async fn serve_unavailable(
    listen: SocketAddr,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    keys: Option<ApiKeys>,
    health: HealthFields,
    reason: String,
    until: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let state = Arc::new(Unavailable {
        keys,
        health,
        reason,
    });
    let router = Router::new()
        .route("/health", get(show_health))
        .fallback(refuse)
        .with_state(state);
    let (tcp, acceptor) = match tls {
        Some(config) => {
            let listener = TlsListener::with_config(listener, config);
            (listener.tcp, Some(listener.acceptor))
        }
        None => (listener, None),
    };
    serve_connections(tcp, acceptor, router, ConnLimits::default(), until).await?;
    Ok(())
}

async fn show_health(
    State(state): State<Arc<Unavailable>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let detailed = match &state.keys {
        None => true,
        Some(keys) => crate::keys::bearer(&headers).is_some_and(|k| keys.check(k).is_some()),
    };
    let mut body = if detailed {
        (state.health)(true)
    } else {
        Map::new()
    };
    body.insert("status".into(), json!("unavailable"));
    if detailed {
        body.insert("reason".into(), json!(state.reason));
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(Value::Object(body)))
}

async fn refuse(State(state): State<Arc<Unavailable>>) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        state.reason.clone(),
    )
    .retry_after(5)
}
