//! Continuous batching: one thread per model owns an [`Executor`] and steps
//! every running sequence together. A request joins at the next step and
//! leaves as soon as it finishes or its client goes away; prompts are
//! prefilled in chunks so that a long one does not stall the others' streams.
//!
//! Memory: admission counts the KV cache actually held, not the worst case of
//! every request's `max_tokens`. When the running sequences outgrow the
//! budget, the newest is preempted: its cache is dropped and it is requeued,
//! to be recomputed later from its tokens. The executor's batch invariance
//! makes the recomputation give the same logits, so a preempted stream goes
//! on with exactly the tokens it would have had.
//!
//! Finished sequences leave their cache behind as reusable prefixes (a
//! shared system prompt, a conversation's earlier turns), evicted oldest
//! first when the prefix bound or the budget needs the room.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use crate::engine::Engine;
use crate::engine::{GenerateParams, Generation};
use crate::error::InferenceError;
use crate::executor::{Executor, SeqId, Work};
use crate::logits::TokenLogprob;
use crate::sequence::{LogitsProcessor, Sequence};

/// Where a request's output goes. Called on the scheduler's thread.
pub trait EventSink: Send {
    /// Text that became final, with the log-probabilities of the tokens
    /// since the last call (when the request asked for them); `false`
    /// cancels the request.
    fn text(&mut self, text: &str, logprobs: &[TokenLogprob]) -> bool;
    /// The request ended (or could not run).
    fn done(&mut self, result: Result<Generation, InferenceError>);
    /// Whether the client went away (checked before every step).
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// A request to generate.
pub struct Request {
    /// The prompt's tokens.
    pub prompt: Vec<u32>,
    /// What to generate.
    pub params: GenerateParams,
    /// Per-request logit processing.
    pub processor: Option<Box<dyn LogitsProcessor>>,
    /// Where the text and the outcome go.
    pub sink: Box<dyn EventSink>,
}

/// How the scheduler batches.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one step (across sequences).
    pub prefill_chunk: usize,
    /// KV-cache bytes the running sequences may hold.
    pub kv_budget_bytes: u64,
    /// KV-cache bytes kept for reuse as prefixes of later requests.
    pub prefix_cache_bytes: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            prefill_chunk: 128,
            kv_budget_bytes: 1 << 30,
            prefix_cache_bytes: 256 << 20,
        }
    }
}

/// Live numbers of a scheduler (for `/metrics`).
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Sequences in the last step.
    pub batch_size: AtomicUsize,
    /// Requests waiting to start (or preempted).
    pub queued: AtomicUsize,
    /// Sequences running.
    pub running: AtomicUsize,
    /// KV bytes held by running sequences.
    pub kv_bytes: AtomicU64,
    /// KV bytes held as reusable prefixes.
    pub prefix_bytes: AtomicU64,
    /// Forward steps run.
    pub steps: AtomicU64,
    /// Sequences stepped, summed over the steps (over `steps`: the mean batch).
    pub stepped: AtomicU64,
    /// Prompt tokens whose KV was reused instead of computed.
    pub prefix_hit_tokens: AtomicU64,
    /// Sequences preempted (requeued for recomputation).
    pub preempted: AtomicU64,
}

/// Errors submitting a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The KV budget cannot take the request now.
    #[error("the KV-cache memory budget is exhausted")]
    KvBudget,
    /// The scheduler's thread has stopped.
    #[error("the scheduler has stopped")]
    Stopped,
}

/// The handle the API holds: submits requests to the model's thread.
pub struct Scheduler {
    tx: mpsc::Sender<Request>,
    stats: Arc<SchedulerStats>,
    /// KV bytes promised to queued prompts (not yet held).
    promised: Arc<AtomicU64>,
    bytes_per_position: u64,
    budget: u64,
}

impl Scheduler {
    /// Starts the model's thread with a local executor over `engine`.
    pub fn start(engine: Arc<Engine>, config: SchedulerConfig) -> Self {
        let executor = engine.local_executor();
        Self::with_executor(engine, Box::new(executor), config)
    }

    /// Starts the model's thread over any executor (a ring, for instance).
    pub fn with_executor(
        engine: Arc<Engine>,
        executor: Box<dyn Executor>,
        config: SchedulerConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(SchedulerStats::default());
        let promised = Arc::new(AtomicU64::new(0));
        let bytes_per_position = bytes_per_position(engine.config());
        let budget = config.kv_budget_bytes;
        let mut worker = Worker {
            engine,
            executor,
            config,
            rx,
            stats: Arc::clone(&stats),
            promised: Arc::clone(&promised),
            bytes_per_position,
            waiting: VecDeque::new(),
            running: Vec::new(),
            retained: VecDeque::new(),
            next_id: 0,
            logits: Vec::new(),
        };
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || worker.run())
            .unwrap_or_else(|e| panic!("cannot start the scheduler thread: {e}"));
        Self {
            tx,
            stats,
            promised,
            bytes_per_position,
            budget,
        }
    }

    /// Queues a request. Refused when its prompt's KV does not fit beside
    /// what running and queued requests hold now.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        let need = (request.prompt.len() as u64 + 1) * self.bytes_per_position;
        let held = self.stats.kv_bytes.load(Ordering::SeqCst);
        let promised = self.promised.fetch_add(need, Ordering::SeqCst) + need;
        if held + promised > self.budget {
            self.promised.fetch_sub(need, Ordering::SeqCst);
            return Err(SubmitError::KvBudget);
        }
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.send(request).map_err(|_| {
            self.promised.fetch_sub(need, Ordering::SeqCst);
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Live numbers.
    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }
}

/// KV bytes of one position (all layers, keys and values, f32).
pub fn bytes_per_position(c: &crate::config::ModelConfig) -> u64 {
    (c.layers * 2 * c.kv_heads * c.head_dim * 4) as u64
}

/// A request on the scheduler's thread.
struct Running {
    id: SeqId,
    sequence: Sequence,
    sink: Box<dyn EventSink>,
    /// Positions in the executor's cache.
    computed: usize,
    /// Bytes of `promised` this request still holds (until it first runs).
    promise: u64,
}

/// A finished sequence's cache kept for reuse.
struct Retained {
    id: SeqId,
    tokens: Vec<u32>,
}

struct Worker {
    engine: Arc<Engine>,
    executor: Box<dyn Executor>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Request>,
    stats: Arc<SchedulerStats>,
    promised: Arc<AtomicU64>,
    bytes_per_position: u64,
    waiting: VecDeque<Running>,
    running: Vec<Running>,
    /// Oldest first.
    retained: VecDeque<Retained>,
    next_id: SeqId,
    logits: Vec<f32>,
}

impl Worker {
    fn run(&mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(request) => self.enqueue(request),
                    Err(_) => return,
                }
            }
            while let Ok(request) = self.rx.try_recv() {
                self.enqueue(request);
            }
            self.drop_cancelled();
            self.admit();
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "forward step failed");
                for mut r in self.running.drain(..) {
                    self.executor.release(r.id);
                    r.sink.done(Err(InferenceError::Request(format!(
                        "the forward step failed: {e}"
                    ))));
                }
            }
            self.publish();
        }
    }

    fn enqueue(&mut self, request: Request) {
        let promise = (request.prompt.len() as u64 + 1) * self.bytes_per_position;
        let context = self.engine.config().context;
        let sequence = match Sequence::new(request.prompt, request.params, context) {
            Ok(s) => s,
            Err(e) => {
                self.release_promise(promise);
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                let mut sink = request.sink;
                sink.done(Err(e));
                return;
            }
        };
        let sequence = match request.processor {
            Some(p) => sequence.with_processor(p),
            None => sequence,
        };
        self.next_id += 1;
        self.waiting.push_back(Running {
            id: self.next_id,
            sequence,
            sink: request.sink,
            computed: 0,
            promise,
        });
    }

    fn release_promise(&self, bytes: u64) {
        self.promised.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// Ends every request whose client went away, queued or running.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].sink.is_cancelled() {
                if let Some(mut r) = self.waiting.remove(i) {
                    self.release_promise(r.promise);
                    self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                    self.executor.release(r.id);
                    r.sequence.cancel();
                    r.sink.done(Ok(r.sequence.generation()));
                }
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sink.is_cancelled() {
                let mut r = self.running.remove(i);
                r.sequence.cancel();
                self.finish(r);
            } else {
                i += 1;
            }
        }
    }

    /// KV bytes the running sequences hold after their next step: every
    /// token they have so far plus the next (not the worst case of `max_tokens`).
    fn held_bytes(&self) -> u64 {
        self.running
            .iter()
            .map(|r| (r.sequence.len() as u64 + 1) * self.bytes_per_position)
            .sum()
    }

    fn retained_bytes(&self) -> u64 {
        self.retained
            .iter()
            .map(|r| r.tokens.len() as u64 * self.bytes_per_position)
            .sum()
    }

    /// Moves waiting requests into the batch while the budget allows
    /// (evicting retained prefixes first), reusing a cached prefix if any.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            let Some(next) = self.waiting.front() else {
                break;
            };
            let need = (next.sequence.len() as u64 + 1) * self.bytes_per_position;
            let fits =
                |w: &Self| w.held_bytes() + w.retained_bytes() + need <= w.config.kv_budget_bytes;
            while !fits(self) && !self.retained.is_empty() {
                self.evict_oldest();
            }
            if !fits(self) && !self.running.is_empty() {
                break;
            }
            let Some(mut r) = self.waiting.pop_front() else {
                break;
            };
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            self.release_promise(std::mem::take(&mut r.promise));
            self.reuse_prefix(&mut r);
            self.running.push(r);
        }
        // Sequences outgrowing the budget: drop retained prefixes, then
        // requeue the newest sequence for recomputation.
        while self.held_bytes() + self.retained_bytes() > self.config.kv_budget_bytes
            && !self.retained.is_empty()
        {
            self.evict_oldest();
        }
        while self.running.len() > 1 && self.held_bytes() > self.config.kv_budget_bytes {
            let Some(mut r) = self.running.pop() else {
                break;
            };
            self.executor.release(r.id);
            r.computed = 0;
            self.stats.preempted.fetch_add(1, Ordering::Relaxed);
            self.stats.queued.fetch_add(1, Ordering::SeqCst);
            self.waiting.push_front(r);
        }
    }

    /// Copies the longest cached prefix of `r`'s tokens (from a retained or
    /// running sequence) into its cache.
    fn reuse_prefix(&mut self, r: &mut Running) {
        let tokens = r.sequence.tokens();
        // At least the last token is computed, to give the next logits.
        let limit = tokens.len() - 1;
        let common = |other: &[u32]| {
            other
                .iter()
                .zip(&tokens[..limit])
                .take_while(|(a, b)| a == b)
                .count()
        };
        let mut best: Option<(SeqId, usize, Option<usize>)> = None;
        for (i, k) in self.retained.iter().enumerate() {
            let n = common(&k.tokens);
            if n > best.map_or(0, |b| b.1) {
                best = Some((k.id, n, Some(i)));
            }
        }
        for other in &self.running {
            let n = common(&other.sequence.tokens()[..other.computed]);
            if n > best.map_or(0, |b| b.1) {
                best = Some((other.id, n, None));
            }
        }
        let Some((src, len, retained_at)) = best else {
            return;
        };
        if self.executor.copy_prefix(src, r.id, len).is_ok() {
            r.computed = len;
            self.stats
                .prefix_hit_tokens
                .fetch_add(len as u64, Ordering::Relaxed);
            // Most recently used goes to the back.
            if let Some(i) = retained_at {
                if let Some(k) = self.retained.remove(i) {
                    self.retained.push_back(k);
                }
            }
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(old) = self.retained.pop_front() {
            self.executor.release(old.id);
        }
    }

    /// One forward step over every running sequence.
    fn step(&mut self) -> Result<(), InferenceError> {
        if self.running.is_empty() {
            return Ok(());
        }
        let mut prefill_left = self.config.prefill_chunk.max(1);
        let mut batch: Vec<Work<'_>> = Vec::with_capacity(self.running.len());
        let mut owners = Vec::with_capacity(self.running.len());
        for (i, r) in self.running.iter().enumerate() {
            let tokens = r.sequence.tokens();
            let remaining = tokens.len() - r.computed;
            let take = if remaining == 1 {
                1
            } else {
                remaining.min(prefill_left)
            };
            if take == 0 {
                continue;
            }
            if remaining > 1 {
                prefill_left -= take;
            }
            batch.push(Work {
                seq: r.id,
                tokens: &tokens[r.computed..r.computed + take],
                position: r.computed,
                logits: take == remaining,
            });
            owners.push((i, take, take == remaining));
        }
        self.stats.batch_size.store(batch.len(), Ordering::Relaxed);
        self.stats
            .stepped
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.executor.step(&batch, &mut self.logits)?;
        drop(batch);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let vocab = self.engine.config().vocab;
        let mut row = 0;
        let mut ended = Vec::new();
        for (i, take, wants) in owners {
            let r = &mut self.running[i];
            r.computed += take;
            if !wants {
                continue;
            }
            let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
            row += 1;
            match r.sequence.advance(logits, self.engine.vocabulary()) {
                Ok(output) => {
                    if !output.is_empty() && !r.sink.text(output.text, output.logprobs) {
                        r.sequence.cancel();
                    }
                    if r.sequence.finish().is_some() {
                        ended.push((i, None));
                    }
                }
                // This request's own processing failed (a grammar error): it
                // alone ends.
                Err(e) => ended.push((i, Some(e))),
            }
        }
        for (i, error) in ended.into_iter().rev() {
            let mut r = self.running.remove(i);
            match error {
                None => self.finish(r),
                Some(e) => {
                    self.executor.release(r.id);
                    r.sink.done(Err(e));
                }
            }
        }
        Ok(())
    }

    /// Reports the outcome and keeps the cache as a reusable prefix.
    fn finish(&mut self, mut r: Running) {
        r.sink.done(Ok(r.sequence.generation()));
        let bound = self.config.prefix_cache_bytes;
        let size = r.computed as u64 * self.bytes_per_position;
        if r.computed == 0 || size > bound {
            self.executor.release(r.id);
            return;
        }
        let mut tokens = r.sequence.tokens().to_vec();
        tokens.truncate(r.computed);
        // A retained prefix of the new one is redundant.
        let mut i = 0;
        while i < self.retained.len() {
            if tokens.starts_with(&self.retained[i].tokens) {
                if let Some(old) = self.retained.remove(i) {
                    self.executor.release(old.id);
                }
            } else {
                i += 1;
            }
        }
        self.retained.push_back(Retained { id: r.id, tokens });
        while self.retained_bytes() > bound {
            self.evict_oldest();
        }
    }

    fn publish(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .kv_bytes
            .store(self.held_bytes(), Ordering::SeqCst);
        self.stats
            .prefix_bytes
            .store(self.retained_bytes(), Ordering::Relaxed);
        if self.running.is_empty() {
            self.stats.batch_size.store(0, Ordering::Relaxed);
        }
    }
}
