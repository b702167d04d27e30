//! One node's part of the plan: its layers and the KV caches of the
//! sequences that pass through them. It turns an incoming [`Step`] into the
//! frame that goes on: the hidden states to the next stage, or the logits back
//! to the entry node.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sovereign_inference::{KvCache, Stage};

use crate::protocol::{bytes_f32, f32_bytes, Frame, Payload, Step};

/// Where a stage's output goes.
#[derive(Debug, PartialEq)]
pub struct Outgoing {
    /// The node to send it to.
    pub to: String,
    /// The frame.
    pub frame: Frame,
}

/// A loaded stage with its caches, for one plan.
pub struct StageServer {
    plan: u64,
    stage: Stage,
    /// The next stage's node; `None` on the last stage.
    next: Option<String>,
    caches: HashMap<(String, u64), KvCache>,
}

impl StageServer {
    /// Serves `stage` in plan `plan`, passing hidden states to `next`.
    pub fn new(plan: u64, stage: Stage, next: Option<String>) -> Self {
        Self {
            plan,
            stage,
            next,
            caches: HashMap::new(),
        }
    }

    /// The plan it serves.
    pub fn plan(&self) -> u64 {
        self.plan
    }

    /// Bytes of KV cache held.
    pub fn kv_bytes(&self) -> usize {
        self.caches.values().map(KvCache::bytes).sum()
    }

    /// Sequences with a cache here.
    pub fn sequences(&self) -> usize {
        self.caches.len()
    }

    /// Frees the caches of `entry`'s sequences.
    pub fn release(&mut self, entry: &str, seqs: &[u64]) {
        for &seq in seqs {
            self.caches.remove(&(entry.to_owned(), seq));
        }
    }

    /// Runs `step` through this stage's layers. A step of another plan, or
    /// one whose rows do not continue the caches held here, is answered with
    /// [`Frame::Failed`] to its entry node (which replays it).
    pub fn run(&mut self, step: Step) -> Outgoing {
        let (entry, id) = (step.entry.clone(), step.step);
        match self.forward(step) {
            Ok(out) => out,
            Err(reason) => Outgoing {
                to: entry,
                frame: Frame::Failed { step: id, reason },
            },
        }
    }

    fn forward(&mut self, step: Step) -> Result<Outgoing, String> {
        if step.plan != self.plan {
            return Err(format!(
                "plan {:016x} is not this stage's plan {:016x}",
                step.plan, self.plan
            ));
        }
        let total: usize = step.rows.iter().map(|r| r.len as usize).sum();
        let hidden_size = self.stage.config().hidden;
        let input = match &step.payload {
            Payload::Tokens(tokens) if self.stage.range().start == 0 => {
                if tokens.len() != total {
                    return Err(format!("{} tokens for {total} rows", tokens.len()));
                }
                self.stage.embed(tokens).map_err(|e| e.to_string())?
            }
            Payload::Hidden(bytes) if self.stage.range().start > 0 => {
                let values = bytes_f32(bytes).map_err(|e| e.to_string())?;
                if values.len() != total * hidden_size {
                    return Err(format!(
                        "{} hidden values for {total} rows of {hidden_size}",
                        values.len()
                    ));
                }
                Tensor::from_vec(values, (total, hidden_size), &Device::Cpu)
                    .map_err(|e| e.to_string())?
            }
            _ => return Err("the payload does not match this stage's place".into()),
        };
        // Check every row before any cache changes.
        for row in &step.rows {
            let key = (step.entry.clone(), row.seq);
            let cached = self.caches.get(&key).map_or(0, KvCache::len);
            if row.len == 0 || (row.position != 0 && cached != row.position as usize) {
                return Err(format!(
                    "sequence {} has {cached} positions here, the step starts at {}",
                    row.seq, row.position
                ));
            }
        }
        let last = self.stage.range().end == self.stage.config().layers;
        let mut outputs = Vec::with_capacity(step.rows.len());
        let mut logits = Vec::new();
        let mut tokens = Vec::new();
        let mut at = 0;
        for row in &step.rows {
            let len = row.len as usize;
            let key = (step.entry.clone(), row.seq);
            if row.position == 0 {
                self.caches.insert(key.clone(), self.stage.new_cache());
            }
            let cache = self
                .caches
                .get_mut(&key)
                .ok_or_else(|| format!("sequence {} has no cache", row.seq))?;
            let rows = input.narrow(0, at, len).map_err(|e| e.to_string())?;
            at += len;
            let out = self
                .stage
                .run_layers(rows, cache)
                .map_err(|e| e.to_string())?;
            if last {
                if row.logits {
                    let values = self
                        .stage
                        .head(&out)
                        .and_then(|l| l.to_vec1::<f32>().map_err(Into::into))
                        .map_err(|e| e.to_string())?;
                    match &row.sample {
                        // The position of the token being chosen.
                        Some(sampler) => tokens.push(
                            sampler.sample(&values, u64::from(row.position) + u64::from(row.len)),
                        ),
                        None => logits.extend_from_slice(&values),
                    }
                }
            } else {
                outputs.push(out);
            }
        }
        if last {
            return Ok(Outgoing {
                to: step.entry,
                frame: Frame::Answer {
                    step: step.step,
                    values: f32_bytes(&logits),
                    tokens,
                },
            });
        }
        let hidden = Tensor::cat(&outputs, 0)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        let next = self
            .next
            .clone()
            .ok_or_else(|| "this stage has no next stage".to_owned())?;
        Ok(Outgoing {
            to: next,
            frame: Frame::Step(Step {
                payload: Payload::Hidden(f32_bytes(&hidden)),
                ..step
            }),
        })
    }
}
