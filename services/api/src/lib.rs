/*!
Sovereign's OpenAI-compatible API: `POST /v1/chat/completions` (streaming
with server-sent events or not), `POST /v1/completions`, `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health` and Prometheus `GET /metrics`, served from the engine of
`sovereign-inference` with bearer API keys, a bounded queue and concurrency, a
KV-cache budget (429/503 when full) and cancellation when a client goes away.
Request metadata (never prompt text) goes to the audit log.
*/
#![deny(missing_docs)]

mod backend;
mod conn;
mod embeddings;
mod error;
mod generation;
mod keys;
mod metrics;
mod openai;
mod refusals;
mod server;
mod shutdown;
mod tls;
mod tools;
mod unavailable;

pub use backend::{Backend, LocalBackend};
pub use conn::ConnLimits;
pub use error::ApiError;
pub use keys::ApiKeys;
pub use metrics::{single_metric, Metrics};
pub use server::{
    router, serve, serve_tls, serve_tls_with, serve_with, AppState, Limits, SEED_HEADER,
};
pub use shutdown::Shutdown;
pub use tls::{pem_server_config, ClientAddr, TlsListener};
pub use unavailable::{serve_unavailable, HealthFields};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to serve (the arguments of `sovereign serve` and `sovereign-api`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The model store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The API keys file (`NAME blake3:<hex>` per line); required off loopback.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Serve HTTPS with the CA-issued certificate and key of this node identity
    /// file (`sovereign node enroll`): clients trust the cluster CA once.
    #[arg(long, conflicts_with = "tls_cert")]
    pub identity: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain instead (an override).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The model to serve (default: the only one in the store).
    #[arg(long)]
    pub model: Option<String>,
    /// Sequences generated together in one batched step; more requests wait
    /// in the queue.
    #[arg(long, default_value_t = 8)]
    pub max_concurrency: usize,
    /// Requests allowed to wait; more get 429.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// The most tokens one request may generate (default: the rest of the
    /// model's context).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Compute threads (default: every core this process may use; a batch of
    /// sequences is compute-bound, see BENCHMARKS.md).
    #[arg(long)]
    pub threads: Option<usize>,
    /// KV-cache budget in MiB; requests beyond it get 503.
    #[arg(long, default_value_t = 1024)]
    pub kv_budget_mb: u64,
    /// Record request metadata in this audit log directory.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Record through the audit daemon's socket instead.
    #[arg(long, conflicts_with = "audit_log")]
    pub audit_socket: Option<PathBuf>,
    /// The node name recorded in a new audit log.
    #[arg(long, default_value = "dev")]
    pub node: String,
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A bad argument or missing model.
    #[error("{0}")]
    Setup(String),
    /// Listening failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Loads the API keys file, if any; refuses to listen off loopback without one.
pub fn load_keys(path: Option<&Path>, listen: SocketAddr) -> Result<Option<ApiKeys>, ServeError> {
    let keys = path
        .map(ApiKeys::load)
        .transpose()
        .map_err(|e| ServeError::Setup(e.to_string()))?;
    if keys.is_none() && !listen.ip().is_loopback() {
        return Err(ServeError::Setup(format!(
            "{listen} is not a loopback address: serving without --keys is only allowed on loopback"
        )));
    }
    Ok(keys)
}

/// Opens where request metadata is recorded: a local audit log directory
/// (a new one records `node` as its node), or the audit daemon's socket.
pub fn open_audit(
    log: Option<&Path>,
    socket: Option<&Path>,
    node: &str,
) -> Result<Option<sovereign_audit::Auditor>, ServeError> {
    let setup = |e: &dyn std::fmt::Display| ServeError::Setup(e.to_string());
    Ok(match (log, socket) {
        (Some(dir), _) => Some(sovereign_audit::Auditor::Local(Arc::new(
            sovereign_audit::AuditLog::open(dir, node).map_err(|e| setup(&e))?,
        ))),
        (None, Some(socket)) => Some(sovereign_audit::Auditor::Remote(
            sovereign_audit::AuditClient::connect(socket).map_err(|e| setup(&e))?,
        )),
        (None, None) => None,
    })
}

/// Loads the model and prepares the state; refuses to serve off loopback without keys.
pub fn prepare(args: &ServeArgs) -> Result<Arc<AppState>, ServeError> {
    let setup = |e: &dyn std::fmt::Display| ServeError::Setup(e.to_string());
    let keys = load_keys(args.keys.as_deref(), args.listen)?;
    let model = match &args.model {
        Some(name) => sovereign_store::live_model(&args.store, name).map_err(|e| setup(&e))?,
        None => {
            let mut all = sovereign_store::live_models(&args.store).map_err(|e| setup(&e))?;
            if all.len() != 1 {
                return Err(ServeError::Setup(format!(
                    "the store holds {} models; choose one with --model",
                    all.len()
                )));
            }
            all.remove(0)
        }
    };
    let path =
        sovereign_inference::Engine::locate(&model.dir, &model.files).map_err(|e| setup(&e))?;
    let engine = sovereign_inference::Engine::load(&path).map_err(|e| setup(&e))?;
    let audit = open_audit(
        args.audit_log.as_deref(),
        args.audit_socket.as_deref(),
        &args.node,
    )?;
    if let Some(audit) = &audit {
        let details = serde_json::json!({ "model": format!("{}@{}", model.name, model.version), "service": "api" });
        audit
            .record(sovereign_audit::Event::new("api", "model-loaded", details))
            .map_err(|e| setup(&e))?;
    }
    let limits = Limits {
        max_concurrency: args.max_concurrency.max(1),
        queue: args.queue,
        kv_budget_bytes: args.kv_budget_mb << 20,
        max_tokens: args.max_tokens,
        ..Limits::default()
    };
    let backend = LocalBackend::new(Arc::new(engine), &limits);
    Ok(AppState::new(model.name, backend, keys, limits, audit))
}

/// Serves until Ctrl-C or SIGTERM.
pub fn run(args: &ServeArgs) -> Result<(), ServeError> {
    let threads = match args.threads {
        Some(0) => return Err(ServeError::Setup("--threads must be at least 1".to_owned())),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    // Read by candle's thread pool (which the kernels share) on first use.
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    let state = prepare(args)?;
    let tls = match (&args.identity, &args.tls_cert, &args.tls_key) {
        (Some(path), _, _) => {
            let identity = sovereign_identity::NodeIdentity::load(path)
                .map_err(|e| ServeError::Setup(e.to_string()))?;
            Some(sovereign_identity::tls::lan_server_config(&identity))
        }
        (None, Some(cert), Some(key)) => {
            Some(pem_server_config(cert, key).map_err(ServeError::Setup)?)
        }
        _ => None,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let stop = Shutdown::on_signal()?;
        serve_until(args.listen, tls, state, stop).await
    })
}

/// Listens on `listen` (HTTPS with `tls`, else plain HTTP) and serves
/// `state` until `stop` is requested, saying where on stderr.
pub async fn serve_until(
    listen: SocketAddr,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    state: Arc<AppState>,
    stop: Shutdown,
) -> Result<(), ServeError> {
    if state.keys.is_none() {
        eprintln!("warning: serving without API keys (allowed on loopback for development only)");
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let shutdown = stop.requested();
    match tls {
        Some(config) => {
            let listener = TlsListener::with_config(listener, config);
            eprintln!("serving {} on https://{address}", state.model_id);
            serve_tls(listener, state, shutdown).await?;
        }
        None => {
            eprintln!("serving {} on http://{address}", state.model_id);
            serve(listener, state, shutdown).await?;
        }
    }
    Ok(())
}
