//! The API's generations on the ring: this node is the entry. It tokenizes,
//! keeps the request's tokens, samples with the request's counter-based
//! sampler and streams the text, while the layers run on the ring's stages.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde_json::{Map, Value};
use sovereign_api::Backend;
use sovereign_inference::{
    ChatMessage, FinishReason, Front, GenerateParams, Generation, InferenceError, LogitShaping,
    ModelConfig, Request, SubmitError,
};

use crate::core::Core;
use crate::executor::{RingExecutor, Work};

/// Generation on the ring, for the API.
pub struct RingBackend {
    core: Arc<Core>,
    front: RwLock<Arc<Front>>,
    config: ModelConfig,
    view: Arc<dyn RingView>,
}

/// What the ring service shows of the ring beside the generations.
pub trait RingView: Send + Sync {
    /// `/health`'s ring fields (`detailed`: the caller may see members and plan).
    fn health(&self, detailed: bool) -> Map<String, Value>;
    /// The transport's Prometheus metrics (links, refusals).
    fn metrics(&self) -> String;
}

impl RingBackend {
    /// Serves `front`'s model through `core`; `view` shows the ring.
    pub fn new(core: Arc<Core>, front: Front, view: Arc<dyn RingView>) -> Self {
        Self {
            config: front.config().clone(),
            front: RwLock::new(Arc::new(front)),
            core,
            view,
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

    /// Runs the request on its own thread (one sequence at a time on the
    /// ring); logit processing is not available here.
    fn start(self: Arc<Self>, request: Request) -> Result<(), SubmitError> {
        let Request {
            prompt,
            params,
            processor,
            mut sink,
        } = request;
        if processor.is_some()
            || params.logprobs.is_some()
            || params.shaping != LogitShaping::default()
        {
            return Err(SubmitError::Unsupported(
                "logprobs, penalties, logit_bias and grammars are not supported by the ring".into(),
            ));
        }
        std::thread::Builder::new()
            .name("ring-request".into())
            .spawn(move || {
                let front = self.front();
                let mut executor = RingExecutor::new(Arc::clone(&self.core));
                let result = generate(&front, &mut executor, &prompt, &params, &mut |text| {
                    sink.text(text, &[]) && !sink.is_cancelled()
                });
                sink.done(result);
            })
            .map(|_| ())
            .map_err(|_| SubmitError::Stopped)
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

/// The entry's generation loop: the prompt in one step, then one token per
/// step, sampled here from the last stage's logits.
fn generate(
    front: &Front,
    executor: &mut RingExecutor,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation, InferenceError> {
    let context = front.config().context;
    if prompt.is_empty() || prompt.len() >= context {
        return Err(InferenceError::Request(format!(
            "the prompt has {} tokens; the model's context is {context}",
            prompt.len()
        )));
    }
    let started = Instant::now();
    let mut logits = Vec::new();
    executor.step(
        &[Work {
            seq: 0,
            tokens: prompt,
            position: 0,
            logits: true,
        }],
        &mut logits,
    )?;
    let prompt_seconds = started.elapsed().as_secs_f64();
    let decode_started = Instant::now();
    let hold_back = params.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut generated: Vec<u32> = Vec::new();
    let (mut emitted, mut finish, mut text) = (0, FinishReason::Length, String::new());
    while generated.len() < params.max_tokens && prompt.len() + generated.len() < context {
        let position = prompt.len() + generated.len();
        let token = params.sampler.sample(&logits, position as u64);
        if front.eos().contains(&token) {
            finish = FinishReason::Stop;
            break;
        }
        generated.push(token);
        text = front
            .tokenizer()
            .decode(&generated, true)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        if let Some(at) = params
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(at);
            finish = FinishReason::Stop;
            break;
        }
        let mut ready = text.len().saturating_sub(hold_back);
        if text.ends_with('\u{FFFD}') {
            ready = ready.min(text.len() - '\u{FFFD}'.len_utf8());
        }
        while !text.is_char_boundary(ready) {
            ready -= 1;
        }
        if ready > emitted {
            let more = on_text(&text[emitted..ready]);
            emitted = ready;
            if !more {
                finish = FinishReason::Cancelled;
                break;
            }
        }
        if generated.len() == params.max_tokens {
            break;
        }
        executor.step(
            &[Work {
                seq: 0,
                tokens: &[token],
                position,
                logits: true,
            }],
            &mut logits,
        )?;
    }
    if finish != FinishReason::Cancelled && text.len() > emitted {
        on_text(&text[emitted..]);
    }
    executor.release(0);
    Ok(Generation {
        text,
        prompt_tokens: prompt.len(),
        completion_tokens: generated.len(),
        finish,
        prompt_seconds,
        decode_seconds: decode_started.elapsed().as_secs_f64(),
    })
}
