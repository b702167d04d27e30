//! A request's generations on the backend: one backend request per choice,
//! started together (so the choices of one request, like concurrent
//! requests, advance in one batched step). Each choice's sink passes text to
//! the response as it becomes final without ever blocking the model's
//! thread, and says the choice is cancelled as soon as the response is
//! dropped (the client went away); a waiter on a blocking thread ends each
//! choice (tool calls parsed, finish reason) and records the request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use axum::http::StatusCode;
use sovereign_inference::{
    EventSink, FinishReason, Generation, InferenceError, LogitsProcessor, Request, SubmitError,
    TokenLogprob,
};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::openai::{ToolCall, Usage};
use crate::server::{random_u64, record, AppState, Job};
use crate::tools::{self, Answer};

/// What a request's generations report as they go.
pub(crate) enum Emit {
    /// Final text of choice `index`, with its tokens' log-probabilities.
    Text {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// Choice `index` calls tools.
    Calls { index: usize, calls: Vec<ToolCall> },
    /// Choice `index` ended.
    Finish { index: usize, reason: &'static str },
}

/// The generations' totals.
pub(crate) struct Outcome {
    pub(crate) usage: Usage,
}

/// The waiter: its result once every choice has ended and been recorded.
pub(crate) type Worker = tokio::task::JoinHandle<Result<Outcome, ApiError>>;

/// A choice's end: its index, outcome and the text held back (tool calls).
type Ended = (usize, Result<Generation, InferenceError>, String);

/// Where one choice's text goes, on the backend's thread.
struct ChoiceSink {
    index: usize,
    tx: mpsc::UnboundedSender<Emit>,
    /// Keep the text (to parse tool calls from) instead of passing it on.
    hold: bool,
    held: String,
    /// Set when a sibling choice could not start.
    abort: Arc<AtomicBool>,
    /// The request's arrival, until its first token is counted.
    arrived: Option<Instant>,
    state: Arc<AppState>,
    ended: std_mpsc::Sender<Ended>,
}

impl ChoiceSink {
    fn first_token(&mut self) {
        if let Some(arrived) = self.arrived.take() {
            self.state
                .metrics
                .observe_first_token(arrived.elapsed().as_secs_f64());
        }
    }
}

impl EventSink for ChoiceSink {
    fn text(&mut self, text: &str, logprobs: &[TokenLogprob]) -> bool {
        self.first_token();
        if self.hold {
            self.held.push_str(text);
        } else {
            let _ = self.tx.send(Emit::Text {
                index: self.index,
                text: text.to_owned(),
                logprobs: logprobs.to_vec(),
            });
        }
        !self.is_cancelled()
    }

    fn done(&mut self, result: Result<Generation, InferenceError>) {
        if result.is_ok() {
            self.first_token();
        }
        let _ = self
            .ended
            .send((self.index, result, std::mem::take(&mut self.held)));
    }

    fn is_cancelled(&self) -> bool {
        self.tx.is_closed() || self.abort.load(Ordering::Relaxed)
    }
}

/// Starts every choice of `job` (arrived at `arrived`); on success returns
/// the response's events and the waiter, which keeps `admission` until the
/// last choice has ended. Refused (503) when the backend cannot take one of
/// them now; choices already started are then cancelled.
pub(crate) fn start<A: Send + 'static>(
    state: &Arc<AppState>,
    job: Arc<Job>,
    arrived: Instant,
    admission: A,
) -> Result<(mpsc::UnboundedReceiver<Emit>, Worker), ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ended_tx, ended_rx) = std_mpsc::channel();
    let abort = Arc::new(AtomicBool::new(false));
    let mut constraint = job.constraint.lock().ok().and_then(|mut c| c.take());
    for (index, (prompt, params)) in job.prompts.iter().zip(&job.params).enumerate() {
        let request = Request {
            prompt: prompt.clone(),
            params: params.clone(),
            processor: constraint
                .take()
                .map(|c| Box::new(c) as Box<dyn LogitsProcessor>),
            sink: Box::new(ChoiceSink {
                index,
                tx: tx.clone(),
                hold: job.tools,
                held: String::new(),
                abort: Arc::clone(&abort),
                arrived: Some(arrived),
                state: Arc::clone(state),
                ended: ended_tx.clone(),
            }),
        };
        if let Err(error) = Arc::clone(&state.engine).start(request) {
            abort.store(true, Ordering::Relaxed);
            return Err(refused(error));
        }
    }
    drop(ended_tx);
    let state = Arc::clone(state);
    let worker = tokio::task::spawn_blocking(move || {
        let _admission = admission;
        let result = wait(&state, &job, &tx, &ended_rx);
        if result.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        result
    });
    Ok((rx, worker))
}

/// The HTTP error of a request the backend would not start.
fn refused(error: SubmitError) -> ApiError {
    match error {
        SubmitError::KvBudget => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_overloaded",
            "the KV-cache memory budget is exhausted; retry later",
        )
        .retry_after(1),
        SubmitError::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_shutting_down",
            "the model's scheduler has stopped",
        )
        .retry_after(5),
    }
}

/// Ends each choice as it finishes, then counts and records the request.
fn wait(
    state: &AppState,
    job: &Job,
    tx: &mpsc::UnboundedSender<Emit>,
    ended: &std_mpsc::Receiver<Ended>,
) -> Result<Outcome, ApiError> {
    let mut usage = Usage::default();
    let mut finishes = vec![FinishReason::Stop; job.prompts.len()];
    for _ in 0..job.prompts.len() {
        let (index, result, held) = ended
            .recv()
            .map_err(|_| ApiError::internal("the model's scheduler stopped"))?;
        let generation = result.map_err(ApiError::internal)?;
        usage.add(generation.prompt_tokens, generation.completion_tokens);
        finishes[index] = generation.finish;
        if generation.finish == FinishReason::Cancelled {
            continue;
        }
        let mut reason = finish_reason(generation.finish);
        if job.tools {
            let emit = match tools::parse(&held, || format!("call_{:016x}", random_u64())) {
                Answer::Calls(calls) => {
                    reason = "tool_calls";
                    Emit::Calls { index, calls }
                }
                Answer::Content(text) => Emit::Text {
                    index,
                    text,
                    logprobs: Vec::new(),
                },
            };
            let _ = tx.send(emit);
        }
        let _ = tx.send(Emit::Finish { index, reason });
    }
    let finish = if finishes.contains(&FinishReason::Cancelled) {
        FinishReason::Cancelled
    } else {
        finishes.last().copied().unwrap_or(FinishReason::Stop)
    };
    record(state, job, &usage, finish)?;
    Ok(Outcome { usage })
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}
