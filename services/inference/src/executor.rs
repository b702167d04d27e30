//! The boundary between scheduling and computing: an [`Executor`] runs one
//! forward step for a batch of sequences and returns the logits of each
//! sequence's last new token. [`LocalExecutor`] runs every layer in this
//! process; a ring puts its nodes behind the same trait.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::InferenceError;
use crate::model::{Chunk, KvCache, Stage};

/// Names a sequence to an executor (chosen by the caller, unique among live sequences).
pub type SeqId = u64;

/// One sequence's part of a forward step: `tokens` at positions
/// `position..position + tokens.len()`.
#[derive(Clone, Copy, Debug)]
pub struct Work<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Its new tokens (a prefill chunk, or one token when decoding).
    pub tokens: &'a [u32],
    /// The position of `tokens[0]`. The executor's cache for `seq` is cut to
    /// this many positions first, so a sequence may be replayed from any point.
    pub position: usize,
    /// Whether the caller wants the logits of the last of `tokens`.
    pub logits: bool,
}

/// Runs forward steps over batches of sequences, each with its own KV cache.
///
/// Contract: a row's result depends only on its sequence's tokens and
/// position, never on the other rows of the batch nor on how its prompt was
/// split into chunks, so replaying prompt and generated tokens as one
/// prefill reproduces the decode's logits bit for bit.
pub trait Executor: Send {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Runs one forward step over `batch` (each sequence at most once).
    /// `logits` is filled with one row of `config().vocab` values per entry
    /// that asked for them, in batch order.
    fn step(&mut self, batch: &[Work<'_>], logits: &mut Vec<f32>) -> Result<(), InferenceError>;

    /// Makes `dst`'s cache hold the first `len` positions of `src`'s (a shared
    /// prefix: a system prompt, the earlier turns of a conversation).
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), InferenceError>;

    /// Forgets a sequence and frees its cache.
    fn release(&mut self, seq: SeqId);

    /// Bytes of KV cache held for all sequences.
    fn kv_bytes(&self) -> usize;
}

/// Every layer in this process: one [`Stage`] over the whole model and one
/// [`KvCache`] per sequence.
pub struct LocalExecutor {
    stage: Arc<Stage>,
    caches: HashMap<SeqId, KvCache>,
}

impl LocalExecutor {
    /// Runs `stage`, which must hold the whole model (embedding to head).
    pub fn new(stage: Arc<Stage>) -> Result<Self, InferenceError> {
        if stage.range() != (0..stage.config().layers) {
            return Err(InferenceError::Request(format!(
                "a local executor needs every layer, not {:?}",
                stage.range()
            )));
        }
        Ok(Self {
            stage,
            caches: HashMap::new(),
        })
    }

    /// The stage it runs.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }
}

impl Executor for LocalExecutor {
    fn config(&self) -> &ModelConfig {
        self.stage.config()
    }

    fn step(&mut self, batch: &[Work<'_>], logits: &mut Vec<f32>) -> Result<(), InferenceError> {
        let mut tokens = Vec::with_capacity(batch.iter().map(|w| w.tokens.len()).sum());
        for (i, work) in batch.iter().enumerate() {
            if work.tokens.is_empty() {
                return Err(InferenceError::Request(format!(
                    "sequence {} has no tokens in this step",
                    work.seq
                )));
            }
            if batch[..i].iter().any(|w| w.seq == work.seq) {
                return Err(InferenceError::Request(format!(
                    "sequence {} appears twice in one step",
                    work.seq
                )));
            }
            tokens.extend_from_slice(work.tokens);
        }
        // Take every cache out of the map so that each chunk can hold its own
        // `&mut`; they go back whatever happens.
        let mut taken: Vec<KvCache> = batch
            .iter()
            .map(|w| {
                let mut cache = self
                    .caches
                    .remove(&w.seq)
                    .unwrap_or_else(|| self.stage.new_cache());
                cache.truncate(w.position);
                cache
            })
            .collect();
        let result = (|| {
            for (work, cache) in batch.iter().zip(&taken) {
                if cache.len() != work.position {
                    return Err(InferenceError::Request(format!(
                        "sequence {} has {} positions cached, not {}",
                        work.seq,
                        cache.len(),
                        work.position
                    )));
                }
            }
            let hidden = self.stage.embed(&tokens)?;
            let mut chunks: Vec<Chunk<'_>> = batch
                .iter()
                .zip(taken.iter_mut())
                .map(|(w, cache)| Chunk {
                    cache,
                    len: w.tokens.len(),
                })
                .collect();
            let hidden = self.stage.run_batch(hidden, &mut chunks)?;
            let mut last = Vec::new();
            let mut row = 0;
            for work in batch {
                row += work.tokens.len();
                if work.logits {
                    last.push(row - 1);
                }
            }
            self.stage.head_logits(&hidden, &last, logits)
        })();
        for (work, cache) in batch.iter().zip(taken) {
            self.caches.insert(work.seq, cache);
        }
        result
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), InferenceError> {
        let source = self
            .caches
            .get(&src)
            .ok_or_else(|| InferenceError::Request(format!("no sequence {src} to copy from")))?;
        if source.len() < len {
            return Err(InferenceError::Request(format!(
                "sequence {src} has {} positions, not {len}",
                source.len()
            )));
        }
        let copy = source.prefix(len);
        self.caches.insert(dst, copy);
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        self.caches.remove(&seq);
    }

    fn kv_bytes(&self) -> usize {
        self.caches.values().map(KvCache::bytes).sum()
    }
}
