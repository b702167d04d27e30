//! One node running every layer: prompt in, streamed text out.

use std::path::Path;
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::chat::ChatMessage;
use crate::config::ModelConfig;
use crate::error::InferenceError;
use crate::executor::LocalExecutor;
use crate::front::Front;
use crate::grammar::Constraint;
use crate::logits::LogitShaping;
use crate::model::Stage;
use crate::sampling::Sampler;
use crate::sequence::{Sequence, Vocabulary};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How tokens are chosen.
    pub sampler: Sampler,
    /// Generation stops before any of these texts.
    pub stop: Vec<String>,
    /// Logit bias and repetition penalties.
    pub shaping: LogitShaping,
    /// Report each token's log-probability and this many alternatives
    /// (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampler: Sampler::default(),
            stop: Vec::new(),
            shaping: LogitShaping::default(),
            logprobs: None,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop text.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// The caller asked to stop (client gone).
    Cancelled,
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated text (stop text excluded).
    pub text: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
    /// Seconds spent on the prompt (prefill).
    pub prompt_seconds: f64,
    /// Seconds spent generating after the first token.
    pub decode_seconds: f64,
}

/// A model loaded whole on this node: its tokenizer side ([`Front`]) and
/// one stage holding every layer.
pub struct Engine {
    stage: Arc<Stage>,
    front: Front,
}

impl Engine {
    /// Loads a model with all its layers: a GGUF file (tokenizer and chat
    /// template from its metadata) or a safetensors directory (from
    /// `tokenizer.json` and `tokenizer_config.json`).
    pub fn load(path: &Path) -> Result<Self, InferenceError> {
        let front = Front::load(path)?;
        let stage = Arc::new(Stage::load(path, 0..front.config().layers)?);
        Ok(Self { stage, front })
    }

    /// The tokenizer side: what turns requests into tokens and tokens into text.
    pub fn front(&self) -> &Front {
        &self.front
    }

    /// Which path of a stored model to load: its `.gguf` file, or the model
    /// directory itself when it holds `config.json` and safetensors.
    pub fn locate(
        dir: &Path,
        files: &[std::path::PathBuf],
    ) -> Result<std::path::PathBuf, InferenceError> {
        if let Some(gguf) = files
            .iter()
            .find(|f| f.extension().is_some_and(|e| e == "gguf"))
        {
            return Ok(dir.join(gguf));
        }
        if files.iter().any(|f| f.as_os_str() == "config.json")
            && files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "safetensors"))
        {
            return Ok(dir.to_owned());
        }
        Err(InferenceError::Model(format!(
            "{} holds neither a .gguf file nor config.json with .safetensors",
            dir.display()
        )))
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        self.stage.config()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.front.tokenizer()
    }

    /// Token ids of `text`, as [`Front::tokenize`].
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        self.front.tokenize(text)
    }

    /// What sequences need of the tokenizer side.
    pub fn vocabulary(&self) -> Vocabulary<'_> {
        self.front.vocabulary()
    }

    /// An executor running every layer of this model in this process.
    pub fn local_executor(&self) -> LocalExecutor {
        LocalExecutor::new(Arc::clone(&self.stage))
            .unwrap_or_else(|_| unreachable!("the engine's stage holds every layer"))
    }

    pub(crate) fn stage(&self) -> &Stage {
        &self.stage
    }

    /// How many matrices each code path multiplies (`"Q4_K kernel"`, ...).
    pub fn matrix_paths(&self) -> std::collections::BTreeMap<String, usize> {
        self.stage.matrix_paths()
    }

    /// The prompt tokens for a conversation, as [`Front::chat_tokens`].
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, InferenceError> {
        self.front.chat_tokens(messages)
    }

    /// The bytes token `id` stands for, as [`Front::token_bytes`].
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.front.token_bytes(id)
    }

    /// A constraint that makes the output JSON matching `schema`, as
    /// [`Front::json_constraint`].
    pub fn json_constraint(
        &self,
        schema: &serde_json::Value,
    ) -> Result<Constraint, InferenceError> {
        self.front.json_constraint(schema)
    }

    /// The embedding of `tokens`: the final-normed hidden states averaged
    /// over the positions and scaled to unit length (llama.cpp's
    /// `llama-embedding --pooling mean`).
    pub fn embedding(&self, tokens: &[u32]) -> Result<Vec<f32>, InferenceError> {
        let context = self.config().context;
        if tokens.is_empty() || tokens.len() > context {
            return Err(InferenceError::Request(format!(
                "the input has {} tokens; it must have 1 to {context}",
                tokens.len()
            )));
        }
        let mut cache = self.stage.new_cache();
        let hidden = self
            .stage
            .run_layers(self.stage.embed(tokens)?, &mut cache)?;
        let mut pooled = self.stage.final_norm(&hidden)?.mean(0)?.to_vec1::<f32>()?;
        let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            pooled.iter_mut().for_each(|v| *v /= norm);
        }
        Ok(pooled)
    }

    /// Generates from `prompt` tokens alone, on the calling thread: the
    /// same [`Sequence`] and executor step the scheduler batches, with one
    /// sequence. `on_text` receives text as it becomes final and returns
    /// `false` to cancel.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        let sequence = Sequence::new(prompt.to_vec(), params.clone(), self.config().context)?;
        sequence.run_alone(
            &mut self.local_executor(),
            0,
            self.vocabulary(),
            &mut |output| output.text.is_empty() || on_text(output.text),
        )
    }
}
