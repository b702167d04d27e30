//! Perplexity over a text, computed as llama.cpp's `llama-perplexity` does:
//! the text's tokens cut into chunks of `ctx`, each chunk run from an empty
//! cache (its first token replaced by BOS when the model uses one), and the
//! predictions of the chunk's second half scored: positions `ctx / 2 ..
//! ctx - 1` each predict the next token.

use candle_core::Tensor;

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
        if ctx > self.config().context {
            return Err(InferenceError::Request(format!(
                "context {ctx} exceeds the model's {}",
                self.config().context
            )));
        }
        let tokens = self.tokenize(text)?;
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
        for c in 0..chunks {
            let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
            if let Some(bos) = self.bos() {
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
            scored += picked.len();
            on_chunk(c, (nll / scored as f64).exp());
        }
        Ok(Perplexity {
            perplexity: (nll / scored as f64).exp(),
            chunks,
            scored,
            top1,
        })
    }
}
