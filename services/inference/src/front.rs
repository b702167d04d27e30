//! The tokenizer side of a model without its weights: what a ring's entry
//! node needs to turn requests into tokens and tokens into text, while the
//! layers run on the ring's stages.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::ModelConfig;
use crate::engine::{tokenizer_parts, with_bos};
use crate::error::InferenceError;
use crate::tokenizer::{encode, PromptEncoder};

/// A model's tokenizer, chat template, end tokens and configuration.
pub struct Front {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    prompts: PromptEncoder,
    eos: Vec<u32>,
    bos: Option<u32>,
    config: ModelConfig,
}

impl Front {
    /// Reads them from a GGUF file or a safetensors directory; no tensor data is read.
    pub fn load(path: &Path) -> Result<Self, InferenceError> {
        let config = ModelConfig::of(path)?;
        let (tokenizer, template, eos, bos) = tokenizer_parts(path, &config)?;
        Ok(Self {
            prompts: PromptEncoder::new(&tokenizer)?,
            tokenizer,
            template,
            eos,
            bos,
            config,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens that end a generation.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// Token ids of `text` (special tokens recognised), starting with the
    /// BOS token when the model asks for one, as [`crate::Engine::tokenize`].
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        Ok(with_bos(encode(&self.tokenizer, text)?, self.bos))
    }

    /// The prompt tokens for a conversation, as [`crate::Engine::chat_tokens`]:
    /// control tokens only from the template's own text.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, InferenceError> {
        let marked = self
            .template
            .as_ref()
            .ok_or_else(|| InferenceError::Template("the model has no chat template".into()))?
            .render(messages, None)?;
        Ok(with_bos(self.prompts.encode(&marked)?, self.bos))
    }
}
