//! The HTTP server: routes, auth, limits, generation on blocking threads.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use sovereign_inference::{FinishReason, GenerateParams, Sampler};
use tokio::sync::{mpsc, Semaphore};

use crate::backend::Backend;
use crate::conn::ConnLimits;
use crate::keys::ApiKeys;
use crate::metrics::Metrics;
use crate::openai::{ChatRequest, CompletionRequest, Sampling, Usage};
use crate::tls::{ClientAddr, TlsListener};

/// Limits that keep a node alive.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Generations running at once.
    pub max_concurrency: usize,
    /// Requests allowed to wait for a slot; more get 429.
    pub queue: usize,
    /// KV-cache bytes all running and waiting requests may reserve; more get 503.
    pub kv_budget_bytes: u64,
    /// Largest `max_tokens` accepted.
    pub max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrency: 1,
            queue: 8,
            kv_budget_bytes: 1 << 30,
            max_tokens: 2048,
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    /// The served model's id.
    pub model_id: String,
    /// What runs generations: the engine, or a ring.
    pub engine: Arc<dyn Backend>,
    /// Accepted keys; `None` only on loopback (development).
    pub keys: Option<ApiKeys>,
    /// Limits.
    pub limits: Limits,
    /// Metrics.
    pub metrics: Metrics,
    /// Where request metadata is recorded (never prompt text).
    pub audit: Option<sovereign_audit::Auditor>,
    slots: Semaphore,
    waiting: AtomicU64,
    kv_reserved: AtomicU64,
}

impl AppState {
    /// Shared state for a server.
    pub fn new(
        model_id: String,
        engine: Arc<dyn Backend>,
        keys: Option<ApiKeys>,
        limits: Limits,
        audit: Option<sovereign_audit::Auditor>,
    ) -> Arc<Self> {
        Arc::new(Self {
            model_id,
            engine,
            keys,
            slots: Semaphore::new(limits.max_concurrency.max(1)),
            limits,
            metrics: Metrics::default(),
            audit,
            waiting: AtomicU64::new(0),
            kv_reserved: AtomicU64::new(0),
        })
    }
}

/// The router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves plain HTTP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::conn::serve_connections(
        listener,
        None,
        router(state),
        ConnLimits::default(),
        shutdown,
    )
    .await
}

/// Serves HTTPS on `listener` until `shutdown` completes.
pub async fn serve_tls(
    listener: TlsListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls_with(listener, state, ConnLimits::default(), shutdown).await
}

/// Serves HTTPS on `listener` with `limits` on connections until `shutdown` completes.
pub async fn serve_tls_with(
    listener: TlsListener,
    state: Arc<AppState>,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::conn::serve_connections(
        listener.tcp,
        Some(listener.acceptor),
        router(state),
        limits,
        shutdown,
    )
    .await
}

/// Serves HTTP on `listener` with `limits` on connections until `shutdown` completes.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::conn::serve_connections(listener, None, router(state), limits, shutdown).await
}

/// An OpenAI-style error response.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "message": self.message, "type": self.kind, "param": null, "code": self.status.as_u16() } });
        (self.status, Json(body)).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(keys) = &state.keys else {
        return Ok("loopback".into());
    };
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing bearer API key",
            )
        })?;
    keys.check(presented.trim())
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid API key",
            )
        })
}

async fn health(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Json<Value> {
    // Without a key (when keys are configured) only the status.
    let detailed = state.keys.is_none() || authorize(&state, &headers).is_ok();
    let mut body = state.engine.health(detailed);
    body.insert("status".into(), json!("ok"));
    body.insert("model".into(), json!(state.model_id));
    if !detailed {
        body.retain(|k, _| k == "status");
    }
    Json(Value::Object(body))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render() + &state.engine.metrics(),
    )
}

async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{ "id": state.model_id, "object": "model", "created": 0, "owned_by": "sovereign" }],
    })))
}

/// A validated generation request.
struct Job {
    route: &'static str,
    chat: bool,
    prompt: Vec<u32>,
    params: GenerateParams,
    stream: bool,
    client: SocketAddr,
    key: String,
}

fn params(state: &AppState, sampling: Sampling) -> Result<GenerateParams, ApiError> {
    if sampling.n.is_some_and(|n| n != 1) {
        return Err(bad_request("only n = 1 is supported"));
    }
    let max_tokens = sampling
        .max_completion_tokens
        .or(sampling.max_tokens)
        .unwrap_or(256);
    if max_tokens == 0 || max_tokens > state.limits.max_tokens {
        return Err(bad_request(format!(
            "max_tokens must be 1..={}",
            state.limits.max_tokens
        )));
    }
    let temperature = sampling.temperature.unwrap_or(1.0);
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !((0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_request(
            "temperature must be in [0, 2] and top_p in (0, 1]",
        ));
    }
    Ok(GenerateParams {
        max_tokens,
        sampler: Sampler {
            temperature,
            top_k: 0,
            top_p,
            seed: sampling.seed.unwrap_or(0),
        },
        stop: sampling.stop.into_vec(),
    })
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.model_id {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "model {model:?} does not exist; this node serves {:?}",
                state.model_id
            ),
        ))
    }
}

fn check_context(state: &AppState, prompt: &[u32]) -> Result<(), ApiError> {
    let context = state.engine.config().context;
    if prompt.is_empty() || prompt.len() >= context {
        return Err(bad_request(format!(
            "the prompt has {} tokens; the model's context is {context}",
            prompt.len()
        )));
    }
    Ok(())
}

async fn chat(
    State(state): State<Arc<AppState>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let key = authorize(&state, &headers)?;
        let Json(request) = body.map_err(|e| bad_request(e.body_text()))?;
        check_model(&state, &request.model)?;
        if request.messages.is_empty() {
            return Err(bad_request("messages must not be empty"));
        }
        let text = state
            .engine
            .chat_prompt(&request.messages)
            .map_err(|e| bad_request(e.to_string()))?;
        let prompt = state
            .engine
            .tokenize(&text)
            .map_err(|e| bad_request(e.to_string()))?;
        check_context(&state, &prompt)?;
        let job = Job {
            route: "chat",
            chat: true,
            prompt,
            params: params(&state, request.sampling)?,
            stream: request.stream,
            client,
            key,
        };
        run(Arc::clone(&state), job).await
    }
    .await;
    finish(&state, "/v1/chat/completions", started, result)
}

async fn completions(
    State(state): State<Arc<AppState>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let key = authorize(&state, &headers)?;
        let Json(request) = body.map_err(|e| bad_request(e.body_text()))?;
        check_model(&state, &request.model)?;
        let prompt = state
            .engine
            .tokenize(&request.prompt)
            .map_err(|e| bad_request(e.to_string()))?;
        check_context(&state, &prompt)?;
        let job = Job {
            route: "completions",
            chat: false,
            prompt,
            params: params(&state, request.sampling)?,
            stream: request.stream,
            client,
            key,
        };
        run(Arc::clone(&state), job).await
    }
    .await;
    finish(&state, "/v1/completions", started, result)
}

fn finish(
    state: &AppState,
    route: &str,
    started: Instant,
    result: Result<Response, ApiError>,
) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    state.metrics.observe(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Bytes of KV cache a request may need.
fn kv_bytes(state: &AppState, job: &Job) -> u64 {
    let c = state.engine.config();
    let positions = (job.prompt.len() + job.params.max_tokens) as u64;
    positions * c.layers as u64 * 2 * (c.kv_heads * (c.hidden / c.heads)) as u64 * 4
}

/// Admission: the KV budget, then a place in the queue, then a slot.
async fn admit(state: &Arc<AppState>, job: &Job) -> Result<Admission, ApiError> {
    let bytes = kv_bytes(state, job);
    let reserved = state.kv_reserved.fetch_add(bytes, Ordering::SeqCst) + bytes;
    let mut admission = Admission {
        state: Arc::clone(state),
        bytes,
        holds_slot: false,
    };
    if reserved > state.limits.kv_budget_bytes {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_overloaded",
            "the KV-cache memory budget is exhausted; retry later",
        ));
    }
    let permit = match state.slots.try_acquire() {
        Ok(permit) => permit,
        Err(_) => {
            if state.waiting.fetch_add(1, Ordering::SeqCst) >= state.limits.queue as u64 {
                state.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    "the queue is full; retry later",
                ));
            }
            // Counted as waiting until acquired or until the request is
            // dropped (client gone), whichever comes first.
            let _waiting = Waiting::enter(state);
            let acquired = state.slots.acquire().await;
            acquired.map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_shutting_down",
                    "shutting down",
                )
            })?
        }
    };
    permit.forget();
    admission.holds_slot = true;
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    Ok(admission)
}

/// A request's place in the queue.
struct Waiting<'a>(&'a AppState);

impl<'a> Waiting<'a> {
    fn enter(state: &'a AppState) -> Self {
        state.metrics.queued.fetch_add(1, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Releases the KV reservation and the slot when dropped.
struct Admission {
    state: Arc<AppState>,
    bytes: u64,
    holds_slot: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state
            .kv_reserved
            .fetch_sub(self.bytes, Ordering::SeqCst);
        if self.holds_slot {
            self.state.slots.add_permits(1);
            self.state.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

async fn run(state: Arc<AppState>, job: Job) -> Result<Response, ApiError> {
    let admission = admit(&state, &job).await?;
    let id = format!(
        "{}-{:016x}",
        if job.chat { "chatcmpl" } else { "cmpl" },
        rand_id()
    );
    let created = unix_now();
    let (tx, rx) = mpsc::channel::<String>(64);
    let job = Arc::new(job);
    let worker = {
        let (state, job) = (Arc::clone(&state), Arc::clone(&job));
        // The worker counts and records the request itself, so a stream whose
        // client went away (and whose body was dropped) is still accounted for.
        tokio::task::spawn_blocking(move || {
            let _admission = admission;
            let generation = state
                .engine
                .generate(&job.prompt, &job.params, &mut |text| {
                    tx.blocking_send(text.to_owned()).is_ok()
                })
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        e.to_string(),
                    )
                })?;
            let usage = record(&state, &job, &generation, 200)?;
            Ok((generation, usage))
        })
    };
    if job.stream {
        return Ok(stream_response(state, job, id, created, rx, worker).into_response());
    }
    let mut rx = rx;
    while rx.recv().await.is_some() {}
    let (generation, usage) = worker.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            e.to_string(),
        )
    })??;
    let choice = if job.chat {
        json!({ "index": 0, "message": { "role": "assistant", "content": generation.text }, "finish_reason": finish_reason(generation.finish) })
    } else {
        json!({ "index": 0, "text": generation.text, "logprobs": null, "finish_reason": finish_reason(generation.finish) })
    };
    let object = if job.chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Ok(Json(json!({ "id": id, "object": object, "created": created, "model": state.model_id, "choices": [choice], "usage": usage })).into_response())
}

/// Counts tokens and records the request's metadata (never the prompt).
fn record(
    state: &AppState,
    job: &Job,
    generation: &sovereign_inference::Generation,
    status: u16,
) -> Result<Usage, ApiError> {
    state
        .metrics
        .prompt_tokens
        .fetch_add(generation.prompt_tokens as u64, Ordering::Relaxed);
    state
        .metrics
        .completion_tokens
        .fetch_add(generation.completion_tokens as u64, Ordering::Relaxed);
    if generation.finish == FinishReason::Cancelled {
        state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(audit) = &state.audit {
        let details = json!({
            "route": job.route,
            "model": state.model_id,
            "client": job.client.to_string(),
            "key": job.key,
            "status": status,
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "finish": format!("{:?}", generation.finish).to_lowercase(),
        });
        audit
            .record(sovereign_audit::Event::new("api", "api-request", details))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    e.to_string(),
                )
            })?;
    }
    Ok(Usage {
        prompt_tokens: generation.prompt_tokens,
        completion_tokens: generation.completion_tokens,
        total_tokens: generation.prompt_tokens + generation.completion_tokens,
    })
}

type Worker = tokio::task::JoinHandle<Result<(sovereign_inference::Generation, Usage), ApiError>>;

fn stream_response(
    state: Arc<AppState>,
    job: Arc<Job>,
    id: String,
    created: u64,
    rx: mpsc::Receiver<String>,
    worker: Worker,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let object = if job.chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let model = state.model_id.clone();
    let chat = job.chat;
    drop(state);
    let chunk = move |delta: Value, finish: Value| -> SseEvent {
        let choice = if chat {
            json!({ "index": 0, "delta": delta, "finish_reason": finish })
        } else {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish })
        };
        let body = json!({ "id": id, "object": object, "created": created, "model": model, "choices": [choice] });
        SseEvent::default().data(body.to_string())
    };
    /// Where the stream is.
    enum Phase {
        Start,
        Text,
        Done,
        End,
    }
    struct Streaming<F> {
        phase: Phase,
        rx: mpsc::Receiver<String>,
        worker: Option<Worker>,
        chunk: F,
        job: Arc<Job>,
    }
    let initial = Streaming {
        phase: Phase::Start,
        rx,
        worker: Some(worker),
        chunk,
        job,
    };
    let events = stream::unfold(initial, |mut s| async move {
        let event = match s.phase {
            Phase::Start => {
                s.phase = Phase::Text;
                if s.job.chat {
                    (s.chunk)(json!({ "role": "assistant", "content": "" }), Value::Null)
                } else {
                    (s.chunk)(json!({ "content": "" }), Value::Null)
                }
            }
            Phase::Text => match s.rx.recv().await {
                Some(text) => (s.chunk)(json!({ "content": text }), Value::Null),
                None => {
                    let outcome = match s.worker.take() {
                        Some(worker) => worker.await.ok().and_then(Result::ok),
                        None => None,
                    };
                    s.phase = Phase::Done;
                    let reason = outcome
                        .as_ref()
                        .map_or("stop", |(g, _)| finish_reason(g.finish));
                    (s.chunk)(json!({}), json!(reason))
                }
            },
            Phase::Done => {
                s.phase = Phase::End;
                SseEvent::default().data("[DONE]")
            }
            Phase::End => return None,
        };
        Some((Ok(event), s))
    });
    Sse::new(events)
}

fn rand_id() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let hash = blake3::hash(&nanos.to_le_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(bytes)
}
