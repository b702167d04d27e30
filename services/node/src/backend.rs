//! The API's generations on the ring: this node is the entry. It tokenizes,
//! keeps the request's tokens and streams the text, while the layers run on
//! the ring's stages. When the request's counter-based sampler alone chooses
//! its tokens, the last stage samples them (no logits cross the ring);
//! otherwise the logits come back and the entry shapes them as one node
//! does (bias, penalties, grammars for JSON output and tool calls) and
//! reports log-probabilities.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};
use sovereign_api::Backend;
use sovereign_inference::{
    ChatMessage, Constraint, Executor, Front, InferenceError, ModelConfig, Request, Sequence,
    SubmitError,
};

use crate::core::Core;
use crate::drain::{Drain, DRAIN_LIMIT};
use crate::executor::RingExecutor;

/// Generation on the ring, for the API.
pub struct RingBackend {
    core: Arc<Core>,
    front: RwLock<Arc<Front>>,
    config: ModelConfig,
    view: Arc<dyn RingView>,
    drain: Arc<Drain>,
}

/// What the ring service shows of the ring beside the generations.
pub trait RingView: Send + Sync {
    /// `/health`'s ring fields (`detailed`: the caller may see members and plan).
    fn health(&self, detailed: bool) -> Map<String, Value>;
    /// The transport's Prometheus metrics (links, refusals).
    fn metrics(&self) -> String;
}

impl RingBackend {
    /// Serves `front`'s model through `core`; `view` shows the ring; each
    /// request enters through `drain` (held while a switch of version waits).
    pub fn new(core: Arc<Core>, front: Front, view: Arc<dyn RingView>, drain: Arc<Drain>) -> Self {
        Self {
            config: front.config().clone(),
            front: RwLock::new(Arc::new(front)),
            core,
            view,
            drain,
        }
    }

    /// Takes a new version's tokenizer side (between requests: those in
    /// flight keep the one they started with).
    pub fn replace_front(&self, front: Front) {
        *self.front.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(front);
    }

    fn front(&self) -> Arc<Front> {
        Arc::clone(&self.front.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Backend for RingBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, InferenceError> {
        self.front().chat_tokens(messages)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        self.front().tokenize(text)
    }

    /// Runs the request on its own thread (its steps pipelined through the
    /// ring with other requests'; held first while a switch of version waits
    /// for the answers in flight), with the same sequence logic as one node:
    /// logit bias, penalties, grammars and log-probabilities are applied here
    /// to the last stage's logits.
    fn start(self: Arc<Self>, request: Request) -> Result<(), SubmitError> {
        let Request {
            prompt,
            params,
            processor,
            mut sink,
        } = request;
        std::thread::Builder::new()
            .name("ring-request".into())
            .spawn(move || {
                // After a switch the request runs on the new version's tokenizer side.
                let _in_flight = self.drain.enter(DRAIN_LIMIT);
                let front = self.front();
                let vocab = front.vocabulary();
                let result = Sequence::new(prompt, params, vocab.context).and_then(|s| {
                    let sequence = match processor {
                        Some(processor) => s.with_processor(processor),
                        None => s,
                    };
                    let mut executor = RingExecutor::new(Arc::clone(&self.core));
                    // The last stage samples when the sampler alone chooses
                    // (no logits cross the ring); otherwise they come here.
                    let outcome = sequence.run(
                        vocab,
                        &mut |work, sampler, logits| match sampler {
                            Some(sampler) => executor.step_sampled(work, sampler).map(Some),
                            None => executor.step(&[work], logits).map(|()| None),
                        },
                        &mut |output| {
                            (output.is_empty() || sink.text(output.text, output.logprobs))
                                && !sink.is_cancelled()
                        },
                    );
                    executor.release(0);
                    outcome
                });
                sink.done(result);
            })
            .map(|_| ())
            .map_err(|_| SubmitError::Stopped)
    }

    fn json_constraint(&self, schema: &Value) -> Result<Constraint, InferenceError> {
        self.front().json_constraint(schema)
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.front().token_bytes(id).to_vec()
    }

    fn health(&self, detailed: bool) -> Map<String, Value> {
        self.view.health(detailed)
    }

    fn metrics(&self) -> String {
        let c = &self.core.counters;
        let stage = self.core.stage_state();
        let active = self.core.active();
        let gauge = |name: &str, help: &str, kind: &str, value: u64| {
            sovereign_api::single_metric(name, kind, help, value)
        };
        [
            gauge(
                "sovereign_ring_members",
                "Nodes in the plan in force.",
                "gauge",
                active.as_ref().map_or(0, |a| a.plan.stages.len() as u64),
            ),
            gauge(
                "sovereign_ring_plan_changes_total",
                "Changes of plan seen by this node.",
                "counter",
                self.core.generation(),
            ),
            gauge(
                "sovereign_ring_stage_layers",
                "Layers this node runs.",
                "gauge",
                stage.layers.map_or(0, |l| l.len() as u64),
            ),
            gauge(
                "sovereign_ring_stage_kv_bytes",
                "KV cache bytes this node's stage holds.",
                "gauge",
                stage.kv_bytes as u64,
            ),
            gauge(
                "sovereign_ring_stage_steps_total",
                "Steps this node's stage ran.",
                "counter",
                c.stage_steps.load(Ordering::Relaxed),
            ),
            gauge(
                "sovereign_ring_sent_bytes_total",
                "Inference bytes sent to other nodes.",
                "counter",
                c.bytes_sent.load(Ordering::Relaxed),
            ),
            gauge(
                "sovereign_ring_sent_frames_total",
                "Inference frames sent to other nodes.",
                "counter",
                c.frames_sent.load(Ordering::Relaxed),
            ),
            gauge(
                "sovereign_ring_replays_total",
                "Replays of a request's history on a new plan.",
                "counter",
                c.replays.load(Ordering::Relaxed),
            ),
            gauge(
                "sovereign_ring_frames_refused_total",
                "Inference frames refused (version, malformed).",
                "counter",
                c.frames_refused.load(Ordering::Relaxed),
            ),
            self.view.metrics(),
        ]
        .concat()
    }
}
