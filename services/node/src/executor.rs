//! The entry node's side of distributed generation: runs forward steps of
//! its sequences on the ring and keeps each sequence's history, so that when
//! the plan changes (a node lost or back) it replays the history on the new
//! plan and carries on with exactly the logits one node would give.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sovereign_inference::{Executor, InferenceError, ModelConfig, Sampler, SeqId, Work};

use crate::core::{Core, Reply};
use crate::protocol::{bytes_f32, Frame, Payload, Row, Step};

/// How long a step may go without an answer and without a change of plan
/// before the request fails with an error (never a hang).
const STALL: Duration = Duration::from_secs(30);

/// A sequence's history: its tokens in the chunks they were first run in.
/// Replaying the same chunks reproduces the same computation on any plan.
#[derive(Default)]
struct History {
    chunks: Vec<Vec<u32>>,
    /// The plan whose stages hold this sequence's caches.
    synced: Option<u64>,
}

impl History {
    fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Cuts the history to `position` tokens.
    fn truncate(&mut self, position: usize) {
        let mut kept = 0;
        let mut keep = 0;
        while keep < self.chunks.len() && kept + self.chunks[keep].len() <= position {
            kept += self.chunks[keep].len();
            keep += 1;
        }
        self.chunks.truncate(keep + usize::from(kept < position));
        if kept < position {
            if let Some(last) = self.chunks.last_mut() {
                last.truncate(position - kept);
            }
            // The stages hold more than the cut history: start afresh.
            self.synced = None;
        }
    }
}

/// Runs forward steps on the ring from this (entry) node.
pub struct RingExecutor {
    core: Arc<Core>,
    /// Sequence numbers on the ring: this executor's space plus the caller's id.
    space: u64,
    histories: HashMap<u64, History>,
}

impl RingExecutor {
    /// An executor of this node's core.
    pub fn new(core: Arc<Core>) -> Self {
        let space = core.seq_space();
        Self {
            core,
            space,
            histories: HashMap::new(),
        }
    }

    /// [`Executor::step`]; with `sampler`, the last stage samples the next
    /// token of every entry that asked for logits and answers tokens instead.
    fn step_with(
        &mut self,
        batch: &[Work<'_>],
        sampler: Option<&Sampler>,
    ) -> Result<(Vec<f32>, Vec<u32>), InferenceError> {
        for (i, work) in batch.iter().enumerate() {
            if work.tokens.is_empty() || batch[..i].iter().any(|w| w.seq == work.seq) {
                return Err(InferenceError::Request(format!(
                    "sequence {} is empty or twice in one step",
                    work.seq
                )));
            }
            let history = self.histories.entry(work.seq).or_default();
            history.truncate(work.position);
            if history.len() != work.position {
                return Err(InferenceError::Request(format!(
                    "sequence {} has {} positions, not {}",
                    work.seq,
                    history.len(),
                    work.position
                )));
            }
        }
        let mut stalled = Instant::now();
        loop {
            let active = self.core.wait_for_plan(STALL).ok_or_else(|| {
                InferenceError::Request("the ring has no plan that serves the model".into())
            })?;
            let outcome = self.replay(batch, &active).and_then(|()| {
                let rows: Vec<(u64, &[u32], usize, bool)> = batch
                    .iter()
                    .map(|w| (w.seq, w.tokens, w.position, w.logits))
                    .collect();
                self.run(&rows, &active, sampler)
            });
            match outcome {
                Ok(answer) => {
                    for work in batch {
                        let history = self.histories.entry(work.seq).or_default();
                        history.chunks.push(work.tokens.to_vec());
                        history.synced = Some(active.id);
                    }
                    return Ok(answer);
                }
                Err(reason) => {
                    if stalled.elapsed() > STALL {
                        return Err(InferenceError::Request(format!(
                            "the ring did not answer: {reason}"
                        )));
                    }
                    tracing::info!("the ring failed a step, replaying: {reason}");
                    for work in batch {
                        if let Some(h) = self.histories.get_mut(&work.seq) {
                            h.synced = None;
                        }
                    }
                    // Wait for the plan to change (or retry soon: the other
                    // nodes may not have the new plan yet).
                    self.core
                        .wait_for_change(active.generation, Duration::from_millis(200));
                    if self.core.generation() != active.generation {
                        stalled = Instant::now();
                    }
                }
            }
        }
    }

    /// One step of one sequence whose next token the last stage samples
    /// with `sampler` (no logits cross the ring): the token.
    pub fn step_sampled(
        &mut self,
        work: Work<'_>,
        sampler: &Sampler,
    ) -> Result<u32, InferenceError> {
        let (_, tokens) = self.step_with(
            &[Work {
                logits: true,
                ..work
            }],
            Some(sampler),
        )?;
        let vocab = self.config().vocab;
        match tokens.first() {
            Some(&token) if (token as usize) < vocab => Ok(token),
            Some(token) => Err(InferenceError::Request(format!(
                "the ring answered token {token}, outside the vocabulary of {vocab}"
            ))),
            None => Err(InferenceError::Request("the ring answered no token".into())),
        }
    }

    /// Replays on `active`'s plan the history of every sequence of `batch`
    /// whose caches are not there, chunk by chunk as they first ran.
    fn replay(&mut self, batch: &[Work<'_>], active: &crate::core::Active) -> Result<(), String> {
        for work in batch {
            let Some(history) = self.histories.get(&work.seq) else {
                continue;
            };
            if history.synced == Some(active.id) || history.chunks.is_empty() {
                continue;
            }
            let chunks = history.chunks.clone();
            self.core.counters.replays.fetch_add(1, Ordering::Relaxed);
            let mut position = 0;
            for chunk in &chunks {
                self.run(&[(work.seq, chunk, position, false)], active, None)?;
                position += chunk.len();
            }
            if let Some(h) = self.histories.get_mut(&work.seq) {
                h.synced = Some(active.id);
            }
        }
        Ok(())
    }

    /// Sends one step to the first stage and waits for the logits (and the
    /// tokens the last stage sampled with `sampler`).
    fn run(
        &self,
        rows: &[(u64, &[u32], usize, bool)],
        active: &crate::core::Active,
        sampler: Option<&Sampler>,
    ) -> Result<(Vec<f32>, Vec<u32>), String> {
        let (step, answer) = self.core.expect();
        let frame = Frame::Step(Step {
            plan: active.id,
            entry: self.core.name().to_owned(),
            step,
            rows: rows
                .iter()
                .map(|&(seq, tokens, position, logits)| Row {
                    seq: self.space | seq,
                    position: position as u32,
                    len: tokens.len() as u32,
                    logits,
                    sample: sampler.filter(|_| logits).cloned(),
                })
                .collect(),
            payload: Payload::Tokens(rows.iter().flat_map(|r| r.1.iter().copied()).collect()),
        });
        let asked = rows.iter().filter(|r| r.3).count();
        let (wanted, wanted_tokens) = match sampler {
            Some(_) => (0, asked),
            None => (asked * self.config().vocab, 0),
        };
        let sent = Instant::now();
        let result = (|| {
            self.core.send(active.plan.first(), frame)?;
            loop {
                if sent.elapsed() > STALL {
                    return Err(format!("no answer from the ring in {STALL:?}"));
                }
                match answer.recv_timeout(Duration::from_millis(100)) {
                    Ok(Reply::Answer(bytes, tokens)) => {
                        let values = bytes_f32(&bytes).map_err(|e| e.to_string())?;
                        if values.len() != wanted || tokens.len() != wanted_tokens {
                            return Err(format!(
                                "{} logits and {} tokens, expected {wanted} and {wanted_tokens}",
                                values.len(),
                                tokens.len()
                            ));
                        }
                        return Ok((values, tokens));
                    }
                    Ok(Reply::Failed(reason)) => return Err(reason),
                    Err(_) if self.core.generation() != active.generation => {
                        return Err("the plan changed".into())
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err("the node is shutting down".into())
                    }
                }
            }
        })();
        self.core.forget(step);
        result
    }
}

/// The ring behind the engine's executor boundary: a step runs on the
/// stages of the plan in force, replayed there first when the plan changed.
impl Executor for RingExecutor {
    fn config(&self) -> &ModelConfig {
        self.core.config()
    }

    /// Runs one step over `batch`; `logits` gets one row of `vocab` values per
    /// entry that asked for them, in batch order. If the plan changes on the
    /// way, the affected sequences are replayed on the new plan first.
    fn step(&mut self, batch: &[Work<'_>], logits: &mut Vec<f32>) -> Result<(), InferenceError> {
        *logits = self.step_with(batch, None)?.0;
        Ok(())
    }

    /// `dst` takes the first `len` positions of `src`'s history; the stages
    /// get them as a replay on `dst`'s next step.
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), InferenceError> {
        let mut history = History {
            chunks: self
                .histories
                .get(&src)
                .map(|h| h.chunks.clone())
                .unwrap_or_default(),
            synced: None,
        };
        history.truncate(len);
        if history.len() != len {
            return Err(InferenceError::Request(format!(
                "sequence {src} has fewer than {len} positions"
            )));
        }
        history.synced = None;
        self.histories.insert(dst, history);
        Ok(())
    }

    /// Forgets a sequence here and on every stage.
    fn release(&mut self, seq: SeqId) {
        self.histories.remove(&seq);
        if let Some(active) = self.core.active() {
            for stage in &active.plan.stages {
                let frame = Frame::Release {
                    entry: self.core.name().to_owned(),
                    seqs: vec![self.space | seq],
                };
                let _ = self.core.send(&stage.node, frame);
            }
        }
    }

    /// The caches live on the stages, not on the entry.
    fn kv_bytes(&self) -> usize {
        0
    }
}

impl Drop for RingExecutor {
    fn drop(&mut self) {
        let seqs: Vec<u64> = self.histories.keys().copied().collect();
        for seq in seqs {
            self.release(seq);
        }
    }
}
