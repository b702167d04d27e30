//! Perplexity over a text, computed as llama.cpp's `llama-perplexity` does:
//! the text's tokens cut into chunks of `ctx`, each chunk run from an empty
//! cache (its first token replaced by BOS when the model uses one), and the
//! predictions of the chunk's second half scored: positions `ctx / 2 ..
//! ctx - 1` each predict the next token.
//!
//! Against a [`Reference`] (the log-probabilities another engine saved for
//! the same tokens: llama.cpp's `llama-perplexity --kl-divergence-base FILE`),
//! every scored position is also compared with the reference's: whether both
//! rank the same token first (teacher-forced next-token agreement), and the
//! KL divergence of this engine's distribution from the reference's.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::config::MAX_CONTEXT;
use crate::engine::Engine;
use crate::error::InferenceError;

/// The result of a perplexity run.
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// `exp` of the mean negative log-likelihood.
    pub perplexity: f64,
    /// Chunks scored.
    pub chunks: usize,
    /// Tokens scored.
    pub scored: usize,
    /// Scored tokens whose most likely prediction was the actual next token.
    pub top1: usize,
    /// The comparison with a reference, when one was given.
    pub agreement: Option<Agreement>,
}

/// How this engine's predictions compare with a reference's, position by position.
#[derive(Clone, Debug, PartialEq)]
pub struct Agreement {
    /// Positions where both rank the same token first.
    pub same_top1: usize,
    /// Mean KL divergence of this engine's next-token distribution from the reference's.
    pub mean_kl: f64,
}

/// Largest vocabulary a reference file may claim.
const MAX_REFERENCE_VOCAB: usize = 1 << 20;

/// A reference run read from llama.cpp's logits file (`llama-perplexity
/// --kl-divergence-base FILE` without `--kl-divergence`): the magic
/// `_logits_`, then `n_ctx`, `n_vocab`, `n_chunk` (i32), the `n_chunk *
/// n_ctx` tokens (i32), then for each scored position of each chunk
/// `2 * ((n_vocab + 1) / 2) + 4` u16s: the f32 `scale` and `min_log_prob`,
/// then each token's log-probability as `min_log_prob + scale * q`.
pub struct Reference {
    path: PathBuf,
    input: BufReader<File>,
    ctx: usize,
    vocab: usize,
    chunks: usize,
    tokens: Vec<u32>,
    row: Vec<u8>,
}

impl Reference {
    /// Opens a reference file and reads its header and tokens; the size of
    /// the whole file is checked against them before anything else is read.
    pub fn open(path: &Path) -> Result<Self, InferenceError> {
        let bad = |why: String| InferenceError::Request(format!("{}: {why}", path.display()));
        let io = |source| InferenceError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut head = [0u8; 20];
        input
            .read_exact(&mut head)
            .map_err(|_| bad("too short for a llama.cpp logits file".into()))?;
        if &head[..8] != b"_logits_" {
            return Err(bad(
                "not a llama.cpp logits file (no `_logits_` magic)".into()
            ));
        }
        let field =
            |at: usize| i32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let (ctx, vocab, chunks) = (field(8), field(12), field(16));
        let ctx = usize::try_from(ctx)
            .ok()
            .filter(|c| (4..=MAX_CONTEXT).contains(c))
            .ok_or_else(|| bad(format!("context {ctx} out of range")))?;
        let vocab = usize::try_from(vocab)
            .ok()
            .filter(|v| (1..=MAX_REFERENCE_VOCAB).contains(v))
            .ok_or_else(|| bad(format!("vocabulary {vocab} out of range")))?;
        let chunks = usize::try_from(chunks)
            .ok()
            .filter(|&c| c >= 1)
            .ok_or_else(|| bad(format!("chunk count {chunks} out of range")))?;
        let row_bytes = 2 * (2 * vocab.div_ceil(2) + 4);
        let expected = (chunks as u128) * (ctx as u128) * 4
            + (chunks as u128) * ((ctx - 1 - ctx / 2) as u128) * row_bytes as u128
            + 20;
        if u128::from(size) != expected {
            return Err(bad(format!(
                "{size} bytes, but {chunks} chunks of {ctx} tokens over a vocabulary of {vocab} take {expected}"
            )));
        }
        let mut raw = vec![0u8; chunks * ctx * 4];
        input.read_exact(&mut raw).map_err(io)?;
        let tokens = raw
            .chunks_exact(4)
            .map(|b| {
                let t = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                u32::try_from(t)
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| bad(format!("token {t} outside the vocabulary")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            path: path.to_owned(),
            input,
            ctx,
            vocab,
            chunks,
            tokens,
            row: vec![0; row_bytes],
        })
    }

    /// Tokens per chunk.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Chunks the file holds.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Reads the next scored position's log-probabilities into `out`.
    fn next_row(&mut self, out: &mut [f32]) -> Result<(), InferenceError> {
        self.input
            .read_exact(&mut self.row)
            .map_err(|source| InferenceError::Io {
                path: self.path.clone(),
                source,
            })?;
        let f = |at: usize| {
            f32::from_le_bytes([
                self.row[at],
                self.row[at + 1],
                self.row[at + 2],
                self.row[at + 3],
            ])
        };
        let (scale, min) = (f(0), f(4));
        for (j, q) in self.row[8..].chunks_exact(2).take(self.vocab).enumerate() {
            out[j] = min + scale * f32::from(u16::from_le_bytes([q[0], q[1]]));
        }
        Ok(())
    }
}

/// The index of the first largest value.
fn first_max(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

impl Engine {
    /// The perplexity of `text` in chunks of `ctx` tokens (at most `max_chunks`
    /// if given). `on_chunk(i, running perplexity)` is called after each chunk.
    pub fn perplexity(
        &self,
        text: &str,
        ctx: usize,
        max_chunks: Option<usize>,
        on_chunk: &mut dyn FnMut(usize, f64),
    ) -> Result<Perplexity, InferenceError> {
        if ctx < 4 {
            return Err(InferenceError::Request(format!(
                "context {ctx} is too small (at least 4)"
            )));
        }
        let tokens = self.tokenize(text)?;
        self.score(&tokens, ctx, max_chunks, None, on_chunk)
    }

    /// The perplexity of a reference's tokens, in its chunks (at most
    /// `max_chunks`), each position also compared with the reference's
    /// log-probabilities.
    pub fn perplexity_against(
        &self,
        reference: &mut Reference,
        max_chunks: Option<usize>,
        on_chunk: &mut dyn FnMut(usize, f64),
    ) -> Result<Perplexity, InferenceError> {
        if reference.vocab != self.config().vocab {
            return Err(InferenceError::Request(format!(
                "the reference has a vocabulary of {} tokens, this model {}",
                reference.vocab,
                self.config().vocab
            )));
        }
        let tokens = std::mem::take(&mut reference.tokens);
        let ctx = reference.ctx;
        self.score(&tokens, ctx, max_chunks, Some(reference), on_chunk)
    }

    fn score(
        &self,
        tokens: &[u32],
        ctx: usize,
        max_chunks: Option<usize>,
        mut reference: Option<&mut Reference>,
        on_chunk: &mut dyn FnMut(usize, f64),
    ) -> Result<Perplexity, InferenceError> {
        if ctx > self.config().context {
            return Err(InferenceError::Request(format!(
                "context {ctx} exceeds the model's {}",
                self.config().context
            )));
        }
        let mut chunks = tokens.len() / ctx;
        if let Some(max) = max_chunks {
            chunks = chunks.min(max);
        }
        if chunks == 0 {
            return Err(InferenceError::Request(format!(
                "the text has {} tokens; at least {ctx} are needed for one chunk",
                tokens.len()
            )));
        }
        let stage = self.stage();
        let first = ctx / 2;
        let (mut nll, mut scored, mut top1) = (0f64, 0usize, 0usize);
        let (mut same_top1, mut kl) = (0usize, 0f64);
        let mut theirs = vec![0f32; self.config().vocab];
        for c in 0..chunks {
            let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
            if let Some(bos) = self.front().bos() {
                chunk[0] = bos;
            }
            let mut cache = stage.new_cache();
            let hidden = stage.run_layers(stage.embed(&chunk)?, &mut cache)?;
            // Positions first..ctx-1 predict tokens first+1..ctx.
            let rows = hidden.narrow(0, first, ctx - 1 - first)?;
            let logits = stage.head_rows(&rows)?;
            let log_probs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
            let targets: Vec<u32> = tokens[c * ctx + first + 1..(c + 1) * ctx].to_vec();
            let ids = Tensor::new(targets.as_slice(), log_probs.device())?.unsqueeze(1)?;
            let picked: Vec<f32> = log_probs.gather(&ids, 1)?.squeeze(1)?.to_vec1()?;
            let best: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
            for (i, lp) in picked.iter().enumerate() {
                nll -= f64::from(*lp);
                top1 += usize::from(best[i] == targets[i]);
            }
            if let Some(reference) = reference.as_deref_mut() {
                let ours: Vec<Vec<f32>> = log_probs.to_vec2()?;
                for row in &ours {
                    reference.next_row(&mut theirs)?;
                    same_top1 += usize::from(first_max(row) == first_max(&theirs));
                    // As llama.cpp: reference probabilities below e^-16 are left out.
                    kl += theirs
                        .iter()
                        .zip(row)
                        .filter(|(t, _)| **t > -16.0)
                        .map(|(t, o)| f64::from(t.exp()) * f64::from(t - o))
                        .sum::<f64>();
                }
            }
            scored += picked.len();
            on_chunk(c, (nll / scored as f64).exp());
        }
        Ok(Perplexity {
            perplexity: (nll / scored as f64).exp(),
            chunks,
            scored,
            top1,
            agreement: reference.map(|_| Agreement {
                same_top1,
                mean_kl: kl / scored as f64,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a reference file of `chunks` chunks of `ctx` tokens over `vocab`.
    fn write(path: &Path, ctx: i32, vocab: i32, chunks: i32, rows: &[(f32, f32, Vec<u16>)]) {
        let mut out = b"_logits_".to_vec();
        for v in [ctx, vocab, chunks] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for t in 0..ctx * chunks {
            out.extend_from_slice(&(t % vocab).to_le_bytes());
        }
        for (scale, min, qs) in rows {
            out.extend_from_slice(&scale.to_le_bytes());
            out.extend_from_slice(&min.to_le_bytes());
            for q in qs {
                out.extend_from_slice(&q.to_le_bytes());
            }
            if vocab % 2 == 1 {
                out.extend_from_slice(&0u16.to_le_bytes());
            }
        }
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn a_reference_file_is_read_as_llama_cpp_writes_it_and_checked_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.kld");
        // ctx 6: positions 3 and 4 scored per chunk; vocab 3 (padded to 4).
        let rows: Vec<_> = (0..4u16)
            .map(|i| (0.5f32, -8.0f32, vec![i, 2 * i, 7]))
            .collect();
        write(&path, 6, 3, 2, &rows);
        let mut r = Reference::open(&path).unwrap();
        assert_eq!((r.ctx(), r.chunks(), r.tokens.len()), (6, 2, 12));
        let mut row = vec![0f32; 3];
        r.next_row(&mut row).unwrap();
        assert_eq!(row, vec![-8.0, -8.0, -4.5]);
        assert_eq!(first_max(&row), 2);
        r.next_row(&mut row).unwrap();
        assert_eq!(row, vec![-7.5, -7.0, -4.5]);

        // One byte short, a wrong magic, a context out of range: refused at open.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = Reference::open(&path).err().unwrap().to_string();
        assert!(e.contains("take"), "{e}");
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        std::fs::write(&path, &wrong).unwrap();
        let e = Reference::open(&path).err().unwrap().to_string();
        assert!(e.contains("magic"), "{e}");
        let mut huge = bytes;
        huge[8..12].copy_from_slice(&i32::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        let e = Reference::open(&path).err().unwrap().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn ties_go_to_the_first_token_as_in_llama_cpp() {
        assert_eq!(first_max(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(first_max(&[0.0, 0.0]), 0);
    }
}
