//! What runs the API's generations: the whole model in this process, its
//! requests batched by a [`Scheduler`] ([`LocalBackend`]), or a ring of
//! nodes (`sovereign-node`).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{Map, Value};
use sovereign_inference::{
    ChatMessage, Constraint, Engine, InferenceError, ModelConfig, Request, Scheduler,
    SchedulerConfig, SubmitError,
};

use crate::server::Limits;

/// A model that answers requests, with what `/health` and `/metrics` add.
pub trait Backend: Send + Sync + 'static {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// The prompt tokens for a conversation, from the model's chat template
    /// (control tokens only from the template's own text, never from messages).
    fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, InferenceError>;

    /// Token ids of `text`.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError>;

    /// Starts a generation and returns at once: its text and outcome go to
    /// the request's sink from another thread, which stops early once the
    /// sink says it is cancelled. Refused when it cannot run (the KV budget
    /// is full, or the backend lacks what it asks for).
    fn start(self: Arc<Self>, request: Request) -> Result<(), SubmitError>;

    /// A grammar constraint that makes the output JSON matching `schema`.
    fn json_constraint(&self, _schema: &Value) -> Result<Constraint, InferenceError> {
        Err(InferenceError::Request(
            "structured output is not supported by this backend".into(),
        ))
    }

    /// The bytes token `id` stands for (empty when unknown).
    fn token_bytes(&self, _id: u32) -> Vec<u8> {
        Vec::new()
    }

    /// The mean-pooled, unit-length embedding of `tokens`.
    fn embedding(&self, _tokens: &[u32]) -> Result<Vec<f32>, InferenceError> {
        Err(InferenceError::Request(
            "embeddings are not supported by this backend".into(),
        ))
    }

    /// Fields `GET /health` adds; `detailed` only for a caller with a key
    /// (or when no keys are configured).
    fn health(&self, _detailed: bool) -> Map<String, Value> {
        Map::new()
    }

    /// Prometheus lines `GET /metrics` adds.
    fn metrics(&self) -> String {
        String::new()
    }
}

/// The whole model in this process: every request joins one [`Scheduler`],
/// so concurrent requests advance together in one batched step.
pub struct LocalBackend {
    engine: Arc<Engine>,
    scheduler: Scheduler,
}

impl LocalBackend {
    /// Starts the model's scheduler: `limits.max_concurrency` sequences in a
    /// batch, admitted by the KV cache they hold within `limits.kv_budget_bytes`.
    pub fn new(engine: Arc<Engine>, limits: &Limits) -> Arc<Self> {
        let config = SchedulerConfig {
            max_batch: limits.max_concurrency.max(1),
            kv_budget_bytes: limits.kv_budget_bytes,
            ..SchedulerConfig::default()
        };
        Arc::new(Self {
            scheduler: Scheduler::start(Arc::clone(&engine), config),
            engine,
        })
    }
}

impl Backend for LocalBackend {
    fn config(&self) -> &ModelConfig {
        self.engine.config()
    }

    fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, InferenceError> {
        self.engine.chat_tokens(messages)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        self.engine.tokenize(text)
    }

    fn start(self: Arc<Self>, request: Request) -> Result<(), SubmitError> {
        self.scheduler.submit(request)
    }

    fn json_constraint(&self, schema: &Value) -> Result<Constraint, InferenceError> {
        self.engine.json_constraint(schema)
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.engine.token_bytes(id).to_vec()
    }

    fn embedding(&self, tokens: &[u32]) -> Result<Vec<f32>, InferenceError> {
        self.engine.embedding(tokens)
    }

    /// The model's matrices by the code that multiplies them, and the
    /// scheduler's batch, queue and KV cache.
    fn metrics(&self) -> String {
        let mut text = String::from("# HELP sovereign_model_matrices Weight matrices of the served model by the code that multiplies them.\n# TYPE sovereign_model_matrices gauge\n");
        for (path, count) in self.engine.matrix_paths() {
            let _ = writeln!(text, "sovereign_model_matrices{{path=\"{path}\"}} {count}");
        }
        let s = self.scheduler.stats();
        let load = |v: &std::sync::atomic::AtomicUsize| v.load(Ordering::Relaxed) as u64;
        for (name, kind, help, value) in [
            (
                "sovereign_scheduler_batch_size",
                "gauge",
                "Sequences in the last forward step.",
                load(&s.batch_size),
            ),
            (
                "sovereign_scheduler_queue_length",
                "gauge",
                "Requests waiting to join the batch (or preempted).",
                load(&s.queued),
            ),
            (
                "sovereign_scheduler_running",
                "gauge",
                "Sequences in the batch.",
                load(&s.running),
            ),
            (
                "sovereign_scheduler_steps_total",
                "counter",
                "Forward steps run.",
                s.steps.load(Ordering::Relaxed),
            ),
            (
                "sovereign_scheduler_stepped_sequences_total",
                "counter",
                "Sequences stepped, summed over the steps (divided by the steps: the mean batch size).",
                s.stepped.load(Ordering::Relaxed),
            ),
            (
                "sovereign_scheduler_kv_bytes",
                "gauge",
                "KV-cache bytes the running sequences hold.",
                s.kv_bytes.load(Ordering::Relaxed),
            ),
            (
                "sovereign_scheduler_prefix_bytes",
                "gauge",
                "KV-cache bytes kept as reusable prefixes.",
                s.prefix_bytes.load(Ordering::Relaxed),
            ),
            (
                "sovereign_scheduler_prefix_hit_tokens_total",
                "counter",
                "Prompt tokens whose KV cache was reused instead of computed.",
                s.prefix_hit_tokens.load(Ordering::Relaxed),
            ),
            (
                "sovereign_scheduler_preempted_total",
                "counter",
                "Sequences preempted (requeued to be recomputed) when the KV budget ran short.",
                s.preempted.load(Ordering::Relaxed),
            ),
        ] {
            text.push_str(&crate::metrics::single_metric(name, kind, help, value));
        }
        text
    }
}
