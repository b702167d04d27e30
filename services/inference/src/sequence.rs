//! One request's generation state, independent of how its forward passes are
//! run: the prompt, the tokens generated so far, sampling (with a hook for
//! per-request logit processing), stop texts, the text made final so far,
//! why it ended, and cancellation.

use std::time::Instant;

use tokenizers::Tokenizer;

use crate::engine::{FinishReason, GenerateParams, Generation};
use crate::error::InferenceError;

/// Per-request changes to the next token's logits before sampling (penalties,
/// logit bias, grammar masks). Runs on the scheduler's thread, once per
/// generated token.
pub trait LogitsProcessor: Send {
    /// Adjusts `logits` (one per vocabulary entry) for the next token;
    /// `generated` holds the tokens generated so far.
    fn process(&mut self, generated: &[u32], logits: &mut [f32]);

    /// Told the token that was chosen (a grammar advances its state).
    fn accepted(&mut self, _token: u32) {}
}

/// What the tokenizer side of a model gives a sequence: the tokenizer, the
/// end-of-sequence tokens and the context length.
#[derive(Clone, Copy)]
pub struct Vocabulary<'a> {
    /// Decodes generated tokens to text.
    pub tokenizer: &'a Tokenizer,
    /// Tokens that end a generation.
    pub eos: &'a [u32],
    /// The model's context length.
    pub context: usize,
}

/// One request's generation: feed it the logits of its last token with
/// [`Sequence::advance`], and it chooses the next token and says which text
/// became final.
pub struct Sequence {
    /// The prompt, then the generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    params: GenerateParams,
    processor: Option<Box<dyn LogitsProcessor>>,
    /// Longest stop text: this much text is held back until it cannot start one.
    hold_back: usize,
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
    started: Instant,
    first_token: Option<Instant>,
}

impl Sequence {
    /// A sequence for `prompt`; refuses an empty prompt or one that fills the context.
    pub fn new(
        prompt: Vec<u32>,
        params: GenerateParams,
        context: usize,
    ) -> Result<Self, InferenceError> {
        if prompt.is_empty() {
            return Err(InferenceError::Request("the prompt is empty".into()));
        }
        if prompt.len() >= context {
            return Err(InferenceError::Request(format!(
                "the prompt has {} tokens; the model's context is {context}",
                prompt.len()
            )));
        }
        let hold_back = params.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let finish = (params.max_tokens == 0).then_some(FinishReason::Length);
        Ok(Self {
            prompt_len: prompt.len(),
            tokens: prompt,
            params,
            processor: None,
            hold_back,
            text: String::new(),
            emitted: 0,
            finish,
            started: Instant::now(),
            first_token: None,
        })
    }

    /// Adds per-request logit processing.
    pub fn with_processor(mut self, processor: Box<dyn LogitsProcessor>) -> Self {
        self.processor = Some(processor);
        self
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// The tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The prompt then the generated tokens: every position of the sequence.
    /// All but the last generated token have been through the model.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The request's parameters.
    pub fn params(&self) -> &GenerateParams {
        &self.params
    }

    /// Positions so far (prompt plus generated tokens).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the sequence has no tokens (never: prompts are not empty).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why it ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Stops the sequence (the client went away).
    pub fn cancel(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Cancelled);
        }
    }

    /// Chooses the next token from `logits` (those of the last position) and
    /// returns the text that became final with it (possibly empty). After it
    /// the sequence may have finished; if not, its new last token is the next
    /// input.
    pub fn advance(
        &mut self,
        logits: &mut [f32],
        vocab: Vocabulary<'_>,
    ) -> Result<&str, InferenceError> {
        if self.finish.is_some() {
            return Ok("");
        }
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        if let Some(processor) = &mut self.processor {
            processor.process(&self.tokens[self.prompt_len..], logits);
        }
        let position = self.len() as u64;
        let token = self.params.sampler.sample(logits, position);
        if let Some(processor) = &mut self.processor {
            processor.accepted(token);
        }
        if vocab.eos.contains(&token) {
            self.finish = Some(FinishReason::Stop);
            return Ok(self.flush());
        }
        self.tokens.push(token);
        self.text = vocab
            .tokenizer
            .decode(self.generated(), true)
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        if let Some(at) = self
            .params
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            self.finish = Some(FinishReason::Stop);
            return Ok(self.flush());
        }
        if self.generated().len() >= self.params.max_tokens || self.len() >= vocab.context {
            self.finish = Some(FinishReason::Length);
            return Ok(self.flush());
        }
        // Emit what can no longer change: not a partial UTF-8 character, not
        // the start of a stop text.
        let mut ready = self.text.len().saturating_sub(self.hold_back);
        if self.text.ends_with('\u{FFFD}') {
            ready = ready.min(self.text.len() - '\u{FFFD}'.len_utf8());
        }
        while !self.text.is_char_boundary(ready) {
            ready -= 1;
        }
        let from = self.emitted;
        self.emitted = self.emitted.max(ready);
        Ok(&self.text[from.min(self.emitted)..self.emitted])
    }

    /// All text not yet emitted (the sequence has finished).
    fn flush(&mut self) -> &str {
        let from = self.emitted.min(self.text.len());
        self.emitted = self.text.len();
        &self.text[from..]
    }

    /// The outcome so far (final once [`Sequence::finish`] is set).
    pub fn generation(&self) -> Generation {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        Generation {
            text: self.text.clone(),
            prompt_tokens: self.prompt_len,
            completion_tokens: self.tokens.len() - self.prompt_len,
            finish: self.finish.unwrap_or(FinishReason::Cancelled),
            prompt_seconds: first.duration_since(self.started).as_secs_f64(),
            decode_seconds: now.duration_since(first).as_secs_f64(),
        }
    }
}
