//! The tokenizer side of a model without its weights: what a ring's entry
//! node needs to turn requests into tokens and tokens into text, while the
//! layers run on the ring's stages.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::ModelConfig;
use crate::engine::tokenizer_parts;
use crate::error::InferenceError;
use crate::tokenizer::encode;

/// A model's tokenizer, chat template, end tokens and configuration.
pub struct Front {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
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
        let mut tokens = encode(&self.tokenizer, text)?;
        if let Some(bos) = self.bos {
            if tokens.first() != Some(&bos) {
                tokens.insert(0, bos);
            }
        }
        Ok(tokens)
    }

    /// The prompt text for a conversation, from the model's chat template.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, InferenceError> {
        self.template
            .as_ref()
            .ok_or_else(|| InferenceError::Template("the model has no chat template".into()))?
            .render(messages, None)
    }
}
