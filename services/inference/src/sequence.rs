//! One request's generation state, independent of how its forward passes are
//! run: the prompt, the tokens generated so far, sampling (with a hook for
//! per-request logit processing), stop texts, the text made final so far,
//! why it ended, and cancellation.

use std::collections::HashMap;
use std::time::Instant;

use tokenizers::Tokenizer;

use crate::engine::{FinishReason, GenerateParams, Generation};
use crate::error::InferenceError;
use crate::executor::{Executor, SeqId, Work};
use crate::logits::{logprobs, LogitShaping, TokenLogprob};
use crate::sampling::Sampler;

/// Per-request changes to the next token's logits before sampling, beyond
/// the request's own logit bias and penalties (a grammar's mask). Runs on the
/// scheduler's thread, once per generated token.
pub trait LogitsProcessor: Send {
    /// Adjusts `logits` (one per vocabulary entry) for the next token;
    /// `generated` holds the tokens generated so far.
    fn process(&mut self, generated: &[u32], logits: &mut [f32]) -> Result<(), InferenceError>;

    /// Told the token that was chosen (a grammar advances its state); not
    /// told an end-of-sequence token.
    fn accepted(&mut self, _token: u32) -> Result<(), InferenceError> {
        Ok(())
    }
}

/// What one [`Sequence::advance`] makes final: text, and the
/// log-probabilities of the tokens generated since the last output that
/// carried text (when the request asked for them).
#[derive(Debug, Default)]
pub struct Output<'a> {
    /// Text that can no longer change.
    pub text: &'a str,
    /// The tokens' log-probabilities (empty unless asked for).
    pub logprobs: &'a [TokenLogprob],
}

impl Output<'_> {
    /// Whether there is nothing to pass on.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && self.logprobs.is_empty()
    }
}

/// One forward step of a sequence's new tokens for [`Sequence::run`]: fills
/// the logits of the last position and returns `None`, or, given the
/// sampler, may return the token it chose where the logits are.
pub type StepFn<'a> = dyn FnMut(Work<'_>, Option<&Sampler>, &mut Vec<f32>) -> Result<Option<u32>, InferenceError>
    + 'a;

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
    /// How often each token was generated (for the penalties).
    counts: HashMap<u32, u32>,
    /// The logits before any shaping, kept for the log-probabilities.
    raw: Vec<f32>,
    /// Log-probabilities not yet passed on in an [`Output`].
    pending: Vec<TokenLogprob>,
    /// The last output carried `pending`, to be cleared at the next advance.
    delivered: bool,
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
            counts: HashMap::new(),
            raw: Vec::new(),
            pending: Vec::new(),
            delivered: false,
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

    /// Chooses the next token from `logits` (those of the last position,
    /// reshaped in place by the request's bias, penalties and processor)
    /// and returns what became final with it (possibly nothing). After it
    /// the sequence may have finished; if not, its new last token is the
    /// next input.
    pub fn advance(
        &mut self,
        logits: &mut [f32],
        vocab: Vocabulary<'_>,
    ) -> Result<Output<'_>, InferenceError> {
        if !self.begin_step() {
            return Ok(Output::default());
        }
        let top = self.params.logprobs;
        if top.is_some() {
            self.raw.clear();
            self.raw.extend_from_slice(logits);
        }
        self.params.shaping.apply(logits, &self.counts);
        if let Some(processor) = &mut self.processor {
            processor.process(&self.tokens[self.prompt_len..], logits)?;
        }
        let token = self.params.sampler.sample(logits, self.len() as u64);
        if let Some(top) = top {
            if !vocab.eos.contains(&token) {
                self.pending.push(logprobs(&self.raw, token, top));
            }
        }
        self.accept(token, vocab)
    }

    /// The sampler, when it alone chooses this sequence's tokens (no bias,
    /// penalties, grammar or log-probabilities): then the token can be
    /// sampled wherever the logits are (a ring's last stage) and given to
    /// [`Sequence::advance_with`].
    pub fn sampler_alone(&self) -> Option<&Sampler> {
        let alone = self.processor.is_none()
            && self.params.logprobs.is_none()
            && self.params.shaping == LogitShaping::default();
        alone.then_some(&self.params.sampler)
    }

    /// [`Sequence::advance`] with the token that [`Sequence::sampler_alone`]
    /// chose at this sequence's next position, elsewhere.
    pub fn advance_with(
        &mut self,
        token: u32,
        vocab: Vocabulary<'_>,
    ) -> Result<Output<'_>, InferenceError> {
        if !self.begin_step() {
            return Ok(Output::default());
        }
        self.accept(token, vocab)
    }

    /// Clears what the last output passed on; `false` once finished.
    fn begin_step(&mut self) -> bool {
        if std::mem::take(&mut self.delivered) {
            self.pending.clear();
        }
        if self.finish.is_some() {
            return false;
        }
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        true
    }

    /// Takes the chosen token: the end, a stop text, the length limit, or
    /// more text made final.
    fn accept(&mut self, token: u32, vocab: Vocabulary<'_>) -> Result<Output<'_>, InferenceError> {
        if vocab.eos.contains(&token) {
            self.finish = Some(FinishReason::Stop);
            return Ok(self.flush());
        }
        if let Some(processor) = &mut self.processor {
            processor.accepted(token)?;
        }
        *self.counts.entry(token).or_default() += 1;
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
        if ready <= self.emitted {
            return Ok(Output::default());
        }
        let from = self.emitted;
        self.emitted = ready;
        self.delivered = true;
        Ok(Output {
            text: &self.text[from..ready],
            logprobs: &self.pending,
        })
    }

    /// All text and log-probabilities not yet passed on (the sequence has finished).
    fn flush(&mut self) -> Output<'_> {
        let from = self.emitted.min(self.text.len());
        self.emitted = self.text.len();
        self.delivered = true;
        Output {
            text: &self.text[from..],
            logprobs: &self.pending,
        }
    }

    /// Runs the sequence alone on `executor` (as sequence `seq`) to its end:
    /// the prompt in one step, then one token per step. `on_output` gets
    /// what each step made final (possibly nothing) and returns `false` to
    /// cancel. The executor forgets the sequence afterwards.
    pub fn run_alone(
        self,
        executor: &mut dyn Executor,
        seq: SeqId,
        vocab: Vocabulary<'_>,
        on_output: &mut dyn FnMut(&Output<'_>) -> bool,
    ) -> Result<Generation, InferenceError> {
        let outcome = self.run(
            vocab,
            &mut |work, _, logits| {
                executor.step(&[Work { seq, ..work }], logits)?;
                Ok(None)
            },
            on_output,
        );
        executor.release(seq);
        outcome
    }

    /// Runs the sequence to its end, one forward step of its new tokens at
    /// a time: `step` fills the logits of the last position and returns
    /// `None`, or, given the sampler (when it alone chooses the tokens, see
    /// [`Sequence::sampler_alone`]), may return the token it chose where the
    /// logits are. `on_output` gets what each step made final and returns
    /// `false` to cancel.
    pub fn run(
        mut self,
        vocab: Vocabulary<'_>,
        step: &mut StepFn<'_>,
        on_output: &mut dyn FnMut(&Output<'_>) -> bool,
    ) -> Result<Generation, InferenceError> {
        let mut logits = Vec::new();
        // Positions already through the model.
        let mut fed = 0;
        while self.finish.is_none() {
            let work = Work {
                seq: 0,
                tokens: &self.tokens[fed..],
                position: fed,
                logits: true,
            };
            logits.clear();
            let chosen = step(work, self.sampler_alone(), &mut logits)?;
            fed = self.len();
            let output = match chosen {
                Some(token) => self.advance_with(token, vocab)?,
                None => self.advance(&mut logits, vocab)?,
            };
            if !on_output(&output) {
                self.cancel();
            }
        }
        Ok(self.generation())
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
