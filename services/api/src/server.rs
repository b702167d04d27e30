//! The HTTP server: routes, auth, limits, generation on blocking threads.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::{json, Map, Value};
use sovereign_inference::{
    ChatMessage, FinishReason, GenerateParams, LogitShaping, Sampler, TokenLogprob,
};
use tokio::sync::{mpsc, Semaphore};

use crate::backend::Backend;
use crate::conn::ConnLimits;
use crate::embeddings::{self, EmbeddingRequest, EMBEDDING_FIELDS};
use crate::error::{unknown_route, wrong_method, ApiError};
use crate::generation::{self, Emit, Worker};
use crate::keys::ApiKeys;
use crate::metrics::Metrics;
use crate::openai::{
    check_fields, content_text, ChatRequest, CompletionRequest, Prompt, ResponseFormat, Sampling,
    ToolCall, Usage, CHAT_FIELDS, COMPLETION_FIELDS,
};
use crate::refusals::Refusals;
use crate::tls::{ClientAddr, TlsListener};
use crate::tools;

/// The response header that reports the seed a request was sampled with.
pub const SEED_HEADER: &str = "x-sovereign-seed";

/// Limits that keep a node alive.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests generating at once (their sequences step together in one batch).
    pub max_concurrency: usize,
    /// Requests allowed to wait for a slot; more get 429.
    pub queue: usize,
    /// KV-cache bytes: what running sequences hold plus what a new prompt
    /// needs must fit, else 503 (embeddings reserve their inputs' size).
    pub kv_budget_bytes: u64,
    /// Largest `max_tokens` accepted (the operator's cap); without one, a
    /// request may generate up to the rest of the model's context, which is
    /// also the default.
    pub max_tokens: Option<usize>,
    /// How often refused requests are summarised in the audit log.
    pub refusal_summary_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrency: 8,
            queue: 8,
            kv_budget_bytes: 1 << 30,
            max_tokens: None,
            refusal_summary_every: Duration::from_secs(60),
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
    refusals: Refusals,
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
            refusals: Refusals::default(),
            waiting: AtomicU64::new(0),
            kv_reserved: AtomicU64::new(0),
        })
    }

    /// Records the summary of refused requests since the last one.
    fn flush_refusals(&self) {
        if let Some(audit) = &self.audit {
            self.refusals
                .flush(audit, self.limits.refusal_summary_every);
        }
    }
}

/// The router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(wrong_method)
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            request_context,
        ))
        .with_state(state)
}

/// Serves plain HTTP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, ConnLimits::default(), shutdown).await
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
    let summaries = summarise_refusals(Arc::clone(&state));
    let served = crate::conn::serve_connections(
        listener.tcp,
        Some(listener.acceptor),
        router(Arc::clone(&state)),
        limits,
        shutdown,
    )
    .await;
    summaries.abort();
    state.flush_refusals();
    served
}

/// Serves HTTP on `listener` with `limits` on connections until `shutdown` completes.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let summaries = summarise_refusals(Arc::clone(&state));
    let served = crate::conn::serve_connections(
        listener,
        None,
        router(Arc::clone(&state)),
        limits,
        shutdown,
    )
    .await;
    summaries.abort();
    state.flush_refusals();
    served
}

/// Records the refused-requests summary every interval.
fn summarise_refusals(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(state.limits.refusal_summary_every);
        every.tick().await;
        loop {
            every.tick().await;
            let state = Arc::clone(&state);
            let _ = tokio::task::spawn_blocking(move || state.flush_refusals()).await;
        }
    })
}

/// The request's id: the client's `x-request-id` when it sent a sane one,
/// otherwise a fresh one; echoed in the response and recorded in the audit log.
#[derive(Clone, Debug)]
struct RequestId(String);

/// The key name a handler authenticated, left on its response so that a
/// refusal after authentication (429, 503) is counted under the key.
#[derive(Clone, Debug)]
struct KeyName(String);

/// Gives every request an id (echoed as `x-request-id`) and counts refused
/// requests (401, 429, 503) for the audit summary.
async fn request_context(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| format!("req-{:016x}", random_u64()), str::to_owned);
    let client = request
        .extensions()
        .get::<ConnectInfo<ClientAddr>>()
        .map(|c| c.0 .0.ip());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status().as_u16();
    if let (Some(client), 401 | 429 | 503) = (client, status) {
        let key = response.extensions().get::<KeyName>().map(|k| k.0.as_str());
        state.refusals.count(client, key, status);
    }
    response
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(keys) = &state.keys else {
        return Ok("loopback".into());
    };
    let unauthorized =
        |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
    let presented =
        crate::keys::bearer(headers).ok_or_else(|| unauthorized("missing bearer API key"))?;
    keys.check(presented)
        .map(str::to_owned)
        .ok_or_else(|| unauthorized("invalid API key"))
}

/// `ok`, or 503 `unavailable` when the audit log cannot record (requests
/// are refused then); `audit` says which.
async fn health(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    // Without a key (when keys are configured) only the status.
    let detailed = state.keys.is_none() || authorize(&state, &headers).is_ok();
    let mut body = state.engine.health(detailed);
    let audit = match state.audit {
        None => "none",
        Some(_) => {
            let audit_state = Arc::clone(&state);
            let available = tokio::task::spawn_blocking(move || {
                audit_state.audit.as_ref().is_some_and(|a| a.is_available())
            })
            .await
            .unwrap_or(false);
            if available {
                "ok"
            } else {
                "unavailable"
            }
        }
    };
    let ok = audit != "unavailable";
    body.insert(
        "status".into(),
        json!(if ok { "ok" } else { "unavailable" }),
    );
    body.insert("audit".into(), json!(audit));
    body.insert("model".into(), json!(state.model_id));
    if !detailed {
        body.retain(|k, _| k == "status" || k == "audit");
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Value::Object(body))).into_response()
}

/// Prometheus metrics; they need a key when keys are configured.
async fn metrics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    authorize(&state, &headers)?;
    Ok((
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render() + &state.engine.metrics(),
    ))
}

fn model_object(state: &AppState) -> Value {
    json!({ "id": state.model_id, "object": "model", "created": 0, "owned_by": "sovereign" })
}

async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(
        json!({ "object": "list", "data": [model_object(&state)] }),
    ))
}

async fn model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    check_model(&state, &id)?;
    Ok(Json(model_object(&state)))
}

/// A validated generation request.
pub(crate) struct Job {
    pub(crate) route: &'static str,
    pub(crate) chat: bool,
    /// One prompt per choice.
    pub(crate) prompts: Vec<Vec<u32>>,
    /// The parameters of each prompt's generation.
    pub(crate) params: Vec<GenerateParams>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) client: SocketAddr,
    pub(crate) key: String,
    pub(crate) user: Option<String>,
    pub(crate) request_id: String,
    /// The grammar of a constrained (chat) generation, taken by the worker.
    pub(crate) constraint: Mutex<Option<sovereign_inference::Constraint>>,
    /// The answer is in the generic tool-call format.
    pub(crate) tools: bool,
}

/// Where a request came from.
struct Caller {
    client: SocketAddr,
    key: String,
    request_id: String,
}

/// The most a request may generate after `prompt`: what it asked for, or the
/// rest of the context; never past the context or the operator's cap.
fn max_tokens(state: &AppState, asked: Option<usize>, prompt: usize) -> Result<usize, ApiError> {
    let context = state.engine.config().context;
    let rest = context.saturating_sub(prompt);
    let cap = state.limits.max_tokens.unwrap_or(usize::MAX);
    let Some(asked) = asked else {
        return Ok(rest.min(cap));
    };
    if asked == 0 {
        return Err(ApiError::field(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    if asked > cap {
        return Err(ApiError::field(
            "max_tokens",
            format!("max_tokens is {asked}; this server allows at most {cap}"),
        ));
    }
    if asked > rest {
        return Err(ApiError::field(
            "max_tokens",
            format!(
                "the prompt has {prompt} tokens and max_tokens is {asked}; the model's context is {context}"
            ),
        ));
    }
    Ok(asked)
}

/// Most stop texts a request may give.
pub const MAX_STOP_TEXTS: usize = 16;
/// Most bytes the stop texts of a request may hold together.
pub const MAX_STOP_BYTES: usize = 4096;
/// Largest request body (bigger ones get 413).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The stop texts of a request, bounded in number and total length (each
/// one is searched for in the output at every step).
fn stop_texts(sampling: &mut Sampling) -> Result<Vec<String>, ApiError> {
    let stop = std::mem::take(&mut sampling.stop).into_vec();
    if stop.len() > MAX_STOP_TEXTS {
        return Err(ApiError::field(
            "stop",
            format!(
                "stop holds {} texts; at most {MAX_STOP_TEXTS} are accepted",
                stop.len()
            ),
        ));
    }
    let bytes: usize = stop.iter().map(String::len).sum();
    if bytes > MAX_STOP_BYTES {
        return Err(ApiError::field(
            "stop",
            format!("stop texts hold {bytes} bytes; at most {MAX_STOP_BYTES} are accepted"),
        ));
    }
    Ok(stop)
}

/// The sampler of a request (the seed drawn when absent).
fn sampler(sampling: &Sampling) -> Result<Sampler, ApiError> {
    let temperature = sampling.temperature.unwrap_or(1.0);
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field(
            "temperature",
            "temperature must be in [0, 2]",
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field("top_p", "top_p must be in (0, 1]"));
    }
    Ok(Sampler {
        temperature,
        top_k: sampling.top_k.unwrap_or(0),
        top_p,
        seed: sampling.seed.unwrap_or_else(random_u64),
    })
}

/// `logit_bias`, `presence_penalty` and `frequency_penalty`, checked.
fn shaping(state: &AppState, sampling: &Sampling) -> Result<LogitShaping, ApiError> {
    let penalty = |name: &str, value: Option<f32>| {
        let value = value.unwrap_or(0.0);
        if (-2.0..=2.0).contains(&value) {
            Ok(value)
        } else {
            Err(ApiError::field(name, format!("{name} must be in [-2, 2]")))
        }
    };
    let vocabulary = state.engine.config().vocab;
    let mut bias = Vec::new();
    for (token, &value) in sampling.logit_bias.iter().flatten() {
        let id = token
            .parse::<u32>()
            .ok()
            .filter(|&id| (id as usize) < vocabulary)
            .ok_or_else(|| {
                ApiError::field(
                    "logit_bias",
                    format!("logit_bias key {token:?} is not a token id below {vocabulary}"),
                )
            })?;
        if !(-100.0..=100.0).contains(&value) {
            return Err(ApiError::field(
                "logit_bias",
                "logit_bias values must be in [-100, 100]",
            ));
        }
        bias.push((id, value));
    }
    bias.sort_by_key(|b| b.0);
    Ok(LogitShaping {
        bias,
        presence_penalty: penalty("presence_penalty", sampling.presence_penalty)?,
        frequency_penalty: penalty("frequency_penalty", sampling.frequency_penalty)?,
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
        return Err(ApiError::bad_request(format!(
            "the prompt has {} tokens; the model's context is {context}",
            prompt.len()
        )));
    }
    Ok(())
}

/// The body as a JSON object whose every set field this server honours.
fn fields(
    body: Result<Json<Value>, JsonRejection>,
    honoured: &[&str],
) -> Result<Map<String, Value>, ApiError> {
    let Json(body) = body?;
    let Value::Object(body) = body else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    check_fields(&body, honoured)?;
    Ok(body)
}

fn parse<T: serde::de::DeserializeOwned>(body: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(body)).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// The engine's messages from the wire's: content parts joined, `developer`
/// read as `system`, tool calls kept for templates that render them.
fn messages(request: &mut ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::field("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(request.messages.len());
    for (i, message) in std::mem::take(&mut request.messages)
        .into_iter()
        .enumerate()
    {
        let role = match message.role.as_str() {
            "developer" => "system",
            role @ ("system" | "user" | "assistant" | "tool") => role,
            other => {
                return Err(ApiError::field(
                    format!("messages[{i}].role"),
                    format!("unknown role {other:?}"),
                ))
            }
        };
        let tool_calls = message
            .tool_calls
            .map(|calls| serde_json::to_value(calls).unwrap_or_default());
        out.push(ChatMessage {
            role: role.to_owned(),
            content: content_text(i, message.content)?,
            tool_calls,
            tool_call_id: message.tool_call_id,
            name: message.name,
        });
    }
    Ok(out)
}

async fn chat(
    State(state): State<Arc<AppState>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let key = authorize(&state, &headers)?;
        let caller = Caller {
            client,
            key,
            request_id,
        };
        let mut request: ChatRequest = parse(fields(body, CHAT_FIELDS)?)?;
        check_model(&state, &request.model)?;
        let mut messages = messages(&mut request)?;
        let logprobs = match (request.logprobs, request.top_logprobs) {
            (_, Some(top)) if top > 20 => {
                return Err(ApiError::field(
                    "top_logprobs",
                    "top_logprobs must be 0 to 20",
                ))
            }
            (Some(true), top) => Some(top.unwrap_or(0)),
            (_, Some(top)) if top > 0 => {
                return Err(ApiError::field(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ))
            }
            _ => None,
        };
        let plan = tools::plan(
            request.tools.as_deref().unwrap_or_default(),
            request.tool_choice.as_ref(),
            request.parallel_tool_calls.unwrap_or(true),
        )?;
        if let Some(plan) = &plan {
            tools::apply(plan, &mut messages);
        }
        let (schema, param) = match (&plan, request.response_format.take()) {
            (Some(plan), _) => (Some(plan.schema.clone()), "tools"),
            (None, Some(ResponseFormat::JsonObject)) => {
                (Some(json!({ "type": "object" })), "response_format")
            }
            (None, Some(ResponseFormat::JsonSchema { json_schema })) => (
                Some(json_schema.schema.unwrap_or(json!({}))),
                "response_format.json_schema.schema",
            ),
            (None, Some(ResponseFormat::Text) | None) => (None, ""),
        };
        let constraint = schema
            .map(|schema| state.engine.json_constraint(&schema))
            .transpose()
            .map_err(|e| ApiError::field(param, e.to_string()))?;
        let prompt = state
            .engine
            .chat_tokens(&messages)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        check_context(&state, &prompt)?;
        let sampling = &request.sampling;
        let params = GenerateParams {
            max_tokens: max_tokens(
                &state,
                sampling.max_completion_tokens.or(sampling.max_tokens),
                prompt.len(),
            )?,
            sampler: sampler(sampling)?,
            shaping: shaping(&state, sampling)?,
            logprobs,
            stop: stop_texts(&mut request.sampling)?,
        };
        let job = Job {
            route: "chat",
            chat: true,
            prompts: vec![prompt],
            params: vec![params],
            stream: request.stream,
            include_usage: include_usage(&request.stream_options),
            client: caller.client,
            key: caller.key.clone(),
            user: request.user,
            request_id: caller.request_id,
            constraint: Mutex::new(constraint),
            tools: plan.is_some(),
        };
        Ok(tag_key(
            run(Arc::clone(&state), job, started).await,
            &caller.key,
        ))
    }
    .await;
    finish(&state, "/v1/chat/completions", started, result)
}

fn include_usage(options: &Option<crate::openai::StreamOptions>) -> bool {
    options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false)
}

/// Leaves the key's name on a response (for the refusal summary).
fn tag_key(result: Result<Response, ApiError>, key: &str) -> Response {
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    response.extensions_mut().insert(KeyName(key.to_owned()));
    response
}

async fn completions(
    State(state): State<Arc<AppState>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let key = authorize(&state, &headers)?;
        let mut request: CompletionRequest = parse(fields(body, COMPLETION_FIELDS)?)?;
        check_model(&state, &request.model)?;
        let tokenize = |text: &str| {
            state
                .engine
                .tokenize(text)
                .map_err(|e| ApiError::bad_request(e.to_string()))
        };
        let prompts = match std::mem::replace(&mut request.prompt, Prompt::Texts(Vec::new())) {
            Prompt::Text(text) => vec![tokenize(&text)?],
            Prompt::Texts(texts) => texts
                .iter()
                .map(|t| tokenize(t))
                .collect::<Result<_, _>>()?,
            Prompt::Tokens(tokens) => vec![tokens],
            Prompt::TokenLists(lists) => lists,
        };
        if prompts.is_empty() {
            return Err(ApiError::field("prompt", "prompt must not be empty"));
        }
        let vocabulary = state.engine.config().vocab as u64;
        let sampler = sampler(&request.sampling)?;
        let shaping = shaping(&state, &request.sampling)?;
        if request.logprobs.is_some_and(|n| n > 5) {
            return Err(ApiError::field("logprobs", "logprobs must be 0 to 5"));
        }
        let stop = stop_texts(&mut request.sampling)?;
        let mut params = Vec::with_capacity(prompts.len());
        for prompt in &prompts {
            check_context(&state, prompt)?;
            if prompt.iter().any(|&t| u64::from(t) >= vocabulary) {
                return Err(ApiError::field(
                    "prompt",
                    format!("token ids must be below the vocabulary size {vocabulary}"),
                ));
            }
            params.push(GenerateParams {
                max_tokens: max_tokens(&state, request.sampling.max_tokens, prompt.len())?,
                sampler: sampler.clone(),
                stop: stop.clone(),
                shaping: shaping.clone(),
                logprobs: request.logprobs,
            });
        }
        let job = Job {
            route: "completions",
            chat: false,
            prompts,
            params,
            stream: request.stream,
            include_usage: include_usage(&request.stream_options),
            client,
            key: key.clone(),
            user: request.user,
            request_id,
            constraint: Mutex::new(None),
            tools: false,
        };
        Ok(tag_key(run(Arc::clone(&state), job, started).await, &key))
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

/// Bytes of KV cache for `positions` (at most the context).
fn kv_bytes(state: &AppState, positions: usize) -> u64 {
    let c = state.engine.config();
    let positions = positions.min(c.context) as u64;
    positions * c.layers as u64 * 2 * (c.kv_heads * (c.hidden / c.heads)) as u64 * 4
}

/// Admission: a slot (or a place in the queue), then the KV budget. Queued
/// requests hold no KV cache, so only running ones reserve it.
async fn admit(state: &Arc<AppState>, bytes: u64) -> Result<Admission, ApiError> {
    let permit = match state.slots.try_acquire() {
        Ok(permit) => permit,
        Err(_) => {
            if state.waiting.fetch_add(1, Ordering::SeqCst) >= state.limits.queue as u64 {
                state.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    "the queue is full; retry later",
                )
                .retry_after(1));
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
                .retry_after(5)
            })?
        }
    };
    permit.forget();
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let reserved = state.kv_reserved.fetch_add(bytes, Ordering::SeqCst) + bytes;
    let admission = Admission {
        state: Arc::clone(state),
        bytes,
    };
    if reserved > state.limits.kv_budget_bytes {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_overloaded",
            "the KV-cache memory budget is exhausted; retry later",
        )
        .retry_after(1));
    }
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

/// Releases the slot and the KV reservation when dropped.
struct Admission {
    state: Arc<AppState>,
    bytes: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state
            .kv_reserved
            .fetch_sub(self.bytes, Ordering::SeqCst);
        self.state.slots.add_permits(1);
        self.state.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn run(state: Arc<AppState>, job: Job, arrived: Instant) -> Result<Response, ApiError> {
    // The slot (or a place in the queue); the backend admits by the KV cache
    // the sequences actually hold.
    let admission = admit(&state, 0).await?;
    // The request is recorded before anything is generated: when the audit
    // log cannot record, it is refused (503), streamed or not.
    let accepted = json!({
        "phase": "accepted",
        "route": job.route,
        "model": state.model_id,
        "client": job.client.to_string(),
        "key": job.key,
        "user": job.user,
        "request_id": job.request_id,
        "seed": job.params[0].sampler.seed,
        "choices": job.prompts.len(),
        "prompt_tokens": job.prompts.iter().map(Vec::len).sum::<usize>(),
    });
    let recorder = Arc::clone(&state);
    tokio::task::spawn_blocking(move || audit_request(&recorder, accepted))
        .await
        .map_err(ApiError::internal)??;
    let id = format!(
        "{}-{:016x}",
        if job.chat { "chatcmpl" } else { "cmpl" },
        random_u64()
    );
    let created = unix_now();
    let seed = job.params[0].sampler.seed;
    let job = Arc::new(job);
    // The waiter counts and records the request itself, so a stream whose
    // client went away (and whose body was dropped) is still accounted for.
    let (rx, worker) = generation::start(&state, Arc::clone(&job), arrived, admission)?;
    let mut response = if job.stream {
        stream_response(&state, job, id, created, rx, worker).into_response()
    } else {
        collect_response(&state, &job, id, created, rx, worker)
            .await?
            .into_response()
    };
    if let Ok(value) = HeaderValue::from_str(&seed.to_string()) {
        response.headers_mut().insert(SEED_HEADER, value);
    }
    Ok(response)
}

/// Log-probabilities in OpenAI's shape: chat's `content` list of tokens,
/// or the completions' parallel lists (`text_offset` counted from `offset`).
fn logprobs_json(
    engine: &dyn Backend,
    chat: bool,
    tokens: &[TokenLogprob],
    offset: usize,
) -> Value {
    let text = |id: u32| String::from_utf8_lossy(&engine.token_bytes(id)).into_owned();
    if chat {
        let content: Vec<Value> = tokens
            .iter()
            .map(|t| {
                let top: Vec<Value> = t
                    .top
                    .iter()
                    .map(|&(id, lp)| json!({ "token": text(id), "logprob": lp, "bytes": engine.token_bytes(id) }))
                    .collect();
                json!({ "token": text(t.token), "logprob": t.logprob, "bytes": engine.token_bytes(t.token), "top_logprobs": top })
            })
            .collect();
        return json!({ "content": content, "refusal": null });
    }
    let mut at = offset;
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        offsets.push(at);
        at += engine.token_bytes(t.token).len();
    }
    json!({
        "tokens": tokens.iter().map(|t| text(t.token)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|&(id, lp)| (text(id), json!(lp))).collect::<Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// `tool_calls` in OpenAI's shape (with each call's index, for deltas).
fn tool_calls_json(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            json!({ "index": i, "id": call.id, "type": call.kind, "function": call.function })
        })
        .collect()
}

async fn collect_response(
    state: &AppState,
    job: &Job,
    id: String,
    created: u64,
    mut rx: mpsc::UnboundedReceiver<Emit>,
    worker: Worker,
) -> Result<Json<Value>, ApiError> {
    let n = job.prompts.len();
    let mut texts = vec![String::new(); n];
    let mut logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let mut calls: Vec<Option<Vec<ToolCall>>> = vec![None; n];
    let mut reasons = vec!["stop"; n];
    while let Some(emit) = rx.recv().await {
        match emit {
            Emit::Text {
                index,
                text,
                logprobs: tokens,
            } => {
                texts[index].push_str(&text);
                logprobs[index].extend(tokens);
            }
            Emit::Calls { index, calls: made } => calls[index] = Some(made),
            Emit::Finish { index, reason } => reasons[index] = reason,
        }
    }
    let outcome = worker.await.map_err(ApiError::internal)??;
    let wants_logprobs = job.params[0].logprobs.is_some();
    let mut choices = Vec::with_capacity(n);
    for index in 0..n {
        let lp = if wants_logprobs {
            logprobs_json(state.engine.as_ref(), job.chat, &logprobs[index], 0)
        } else {
            Value::Null
        };
        let reason = reasons[index];
        choices.push(if job.chat {
            let message = match &calls[index] {
                Some(made) => {
                    json!({ "role": "assistant", "content": null, "tool_calls": tool_calls_json(made) })
                }
                None => json!({ "role": "assistant", "content": texts[index] }),
            };
            json!({ "index": index, "message": message, "logprobs": lp, "finish_reason": reason })
        } else {
            json!({ "index": index, "text": texts[index], "logprobs": lp, "finish_reason": reason })
        });
    }
    let object = if job.chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Ok(Json(
        json!({ "id": id, "object": object, "created": created, "model": state.model_id, "choices": choices, "usage": outcome.usage }),
    ))
}

/// Counts tokens and records the request's metadata (never the prompt).
pub(crate) fn record(
    state: &AppState,
    job: &Job,
    usage: &Usage,
    finish: FinishReason,
) -> Result<(), ApiError> {
    state
        .metrics
        .prompt_tokens
        .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
    state
        .metrics
        .completion_tokens
        .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
    if finish == FinishReason::Cancelled {
        state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    audit_request(
        state,
        json!({
            "phase": "completed",
            "route": job.route,
            "model": state.model_id,
            "client": job.client.to_string(),
            "key": job.key,
            "user": job.user,
            "request_id": job.request_id,
            "seed": job.params[0].sampler.seed,
            "status": 200,
            "choices": job.prompts.len(),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "finish": format!("{finish:?}").to_lowercase(),
        }),
    )
}

/// Records a served request's metadata; refuses (503) when recording fails.
fn audit_request(state: &AppState, details: Value) -> Result<(), ApiError> {
    if let Some(audit) = &state.audit {
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
    Ok(())
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let key = authorize(&state, &headers)?;
        let request: EmbeddingRequest = parse(fields(body, EMBEDDING_FIELDS)?)?;
        check_model(&state, &request.model)?;
        let base64 = match request.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::field(
                    "encoding_format",
                    format!("encoding_format {other:?} is not float or base64"),
                ))
            }
        };
        let lists = embeddings::inputs(&state, request.input)?;
        let positions = lists.iter().map(Vec::len).max().unwrap_or(0);
        let admission = match admit(&state, kv_bytes(&state, positions)).await {
            Ok(admission) => admission,
            Err(error) => return Ok(tag_key(Err(error), &key)),
        };
        let worker_state = Arc::clone(&state);
        let user = request.user;
        let who = key.clone();
        let body = tokio::task::spawn_blocking(move || {
            let _admission = admission;
            let body = embeddings::respond(&worker_state, &lists, base64)?;
            let tokens: usize = lists.iter().map(Vec::len).sum();
            worker_state
                .metrics
                .prompt_tokens
                .fetch_add(tokens as u64, Ordering::Relaxed);
            audit_request(
                &worker_state,
                json!({
                    "route": "embeddings",
                    "model": worker_state.model_id,
                    "client": client.to_string(),
                    "key": who,
                    "user": user,
                    "request_id": request_id,
                    "status": 200,
                    "inputs": lists.len(),
                    "prompt_tokens": tokens,
                }),
            )?;
            Ok::<_, ApiError>(body)
        })
        .await
        .map_err(ApiError::internal)??;
        Ok(tag_key(Ok(Json(body).into_response()), &key))
    }
    .await;
    finish(&state, "/v1/embeddings", started, result)
}

/// Where a stream is.
enum Phase {
    Start,
    Text,
    Done,
    End,
}

/// A streaming response's state.
struct Streaming {
    phase: Phase,
    rx: mpsc::UnboundedReceiver<Emit>,
    worker: Option<Worker>,
    job: Arc<Job>,
    engine: Arc<dyn Backend>,
    id: String,
    model: String,
    created: u64,
    /// Bytes of text sent so far per choice (completions' `text_offset`).
    offsets: Vec<usize>,
}

impl Streaming {
    fn chunk(&self, choices: Vec<Value>, usage: Option<&Usage>) -> SseEvent {
        let object = if self.job.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut body = json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices });
        if let Some(usage) = usage {
            body["usage"] = json!(usage);
        }
        SseEvent::default().data(body.to_string())
    }

    fn choice(&self, index: usize, delta: Value, logprobs: Value, finish: Value) -> Value {
        if self.job.chat {
            json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
        } else {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish })
        }
    }

    async fn next(&mut self) -> Option<SseEvent> {
        Some(match self.phase {
            Phase::Start => {
                self.phase = Phase::Text;
                let delta = if self.job.chat {
                    json!({ "role": "assistant", "content": "" })
                } else {
                    json!({ "content": "" })
                };
                self.chunk(vec![self.choice(0, delta, Value::Null, Value::Null)], None)
            }
            Phase::Text => match self.rx.recv().await {
                Some(Emit::Text {
                    index,
                    text,
                    logprobs,
                }) => {
                    let lp = if self.job.params[0].logprobs.is_some() {
                        logprobs_json(
                            self.engine.as_ref(),
                            self.job.chat,
                            &logprobs,
                            self.offsets[index],
                        )
                    } else {
                        Value::Null
                    };
                    self.offsets[index] += text.len();
                    let choice = self.choice(index, json!({ "content": text }), lp, Value::Null);
                    self.chunk(vec![choice], None)
                }
                Some(Emit::Calls { index, calls }) => {
                    let delta = json!({ "tool_calls": tool_calls_json(&calls) });
                    let choice = self.choice(index, delta, Value::Null, Value::Null);
                    self.chunk(vec![choice], None)
                }
                Some(Emit::Finish { index, reason }) => {
                    let choice = self.choice(index, json!({}), Value::Null, json!(reason));
                    self.chunk(vec![choice], None)
                }
                None => {
                    let outcome = match self.worker.take() {
                        Some(worker) => worker.await.map_err(ApiError::internal).and_then(|r| r),
                        None => Err(ApiError::internal("the generation ended twice")),
                    };
                    self.phase = Phase::Done;
                    match outcome {
                        Ok(outcome) if self.job.include_usage => {
                            self.chunk(Vec::new(), Some(&outcome.usage))
                        }
                        Ok(_) => {
                            self.phase = Phase::End;
                            SseEvent::default().data("[DONE]")
                        }
                        Err(error) => SseEvent::default().data(error.body().to_string()),
                    }
                }
            },
            Phase::Done => {
                self.phase = Phase::End;
                SseEvent::default().data("[DONE]")
            }
            Phase::End => return None,
        })
    }
}

fn stream_response(
    state: &AppState,
    job: Arc<Job>,
    id: String,
    created: u64,
    rx: mpsc::UnboundedReceiver<Emit>,
    worker: Worker,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let streaming = Streaming {
        phase: Phase::Start,
        rx,
        worker: Some(worker),
        offsets: vec![0; job.prompts.len()],
        job,
        engine: Arc::clone(&state.engine),
        id,
        model: state.model_id.clone(),
        created,
    };
    Sse::new(stream::unfold(streaming, |mut s| async move {
        let event = s.next().await?;
        Some((Ok(event), s))
    }))
}

/// A random number (not for secrets): request ids and default seeds.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.finish()
}
