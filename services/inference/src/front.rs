//! The tokenizer side of a model without its weights: what a ring's entry
//! node needs to turn requests into tokens and tokens into text, while the
//! layers run on the ring's stages.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use tokenizers::Tokenizer;

use crate::chat::{ChatMessage, ChatTemplate, GEMMA_TEMPLATE};
use crate::config::{Arch, ModelConfig};
use crate::error::InferenceError;
use crate::grammar::{token_bytes, Constraint, Grammars};
use crate::sequence::Vocabulary;
use crate::tokenizer::{encode, load_tokenizer, PromptEncoder};

/// A model's tokenizer, chat template, end tokens and configuration.
pub struct Front {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    prompts: PromptEncoder,
    eos: Vec<u32>,
    /// The token that starts every sequence, if the model asks for one.
    bos: Option<u32>,
    config: ModelConfig,
    /// Every token's bytes, made on first use.
    token_bytes: OnceLock<Vec<Vec<u8>>>,
    /// The grammar engine, made on first use.
    grammars: OnceLock<Result<Grammars, String>>,
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
            token_bytes: OnceLock::new(),
            grammars: OnceLock::new(),
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
    /// BOS token when the model's file asks for one (`add_bos_token`) and
    /// the text does not already begin with it.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        Ok(with_bos(encode(&self.tokenizer, text)?, self.bos))
    }

    /// The BOS token, if the model starts every sequence with one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// What sequences need of the tokenizer side.
    pub fn vocabulary(&self) -> Vocabulary<'_> {
        Vocabulary {
            tokenizer: &self.tokenizer,
            eos: &self.eos,
            context: self.config.context,
        }
    }

    /// The prompt tokens for a conversation, from the model's chat
    /// template: control tokens come only from the template's own text,
    /// never from message text (a typed `<|im_start|>` is ordinary text).
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, InferenceError> {
        let marked = self
            .template
            .as_ref()
            .ok_or_else(|| InferenceError::Template("the model has no chat template".into()))?
            .render(messages, None)?;
        Ok(with_bos(self.prompts.encode(&marked)?, self.bos))
    }

    fn all_token_bytes(&self) -> &[Vec<u8>] {
        self.token_bytes
            .get_or_init(|| token_bytes(&self.tokenizer, self.config.vocab))
    }

    /// The bytes token `id` stands for (a control token's name).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        match self.all_token_bytes().get(id as usize).map(Vec::as_slice) {
            Some([llguidance::toktrie::TokTrie::SPECIAL_TOKEN_MARKER, name @ ..]) => name,
            Some(bytes) => bytes,
            None => &[],
        }
    }

    /// A constraint that makes the output JSON matching `schema` (llguidance).
    pub fn json_constraint(
        &self,
        schema: &serde_json::Value,
    ) -> Result<Constraint, InferenceError> {
        let grammars = self.grammars.get_or_init(|| {
            Grammars::new(&self.tokenizer, self.all_token_bytes(), &self.eos)
                .map_err(|e| e.to_string())
        });
        grammars
            .as_ref()
            .map_err(|e| InferenceError::Grammar(e.clone()))?
            .json(schema)
    }
}

/// `tokens` starting with `bos` (when the model asks for one and the
/// tokens do not already start with it).
pub(crate) fn with_bos(mut tokens: Vec<u32>, bos: Option<u32>) -> Vec<u32> {
    if let Some(bos) = bos {
        if tokens.first() != Some(&bos) {
            tokens.insert(0, bos);
        }
    }
    tokens
}

type TokenizerParts = (Tokenizer, Option<ChatTemplate>, Vec<u32>, Option<u32>);

/// The tokenizer, chat template, end tokens and BOS of the model at `path`.
fn tokenizer_parts(path: &Path, config: &ModelConfig) -> Result<TokenizerParts, InferenceError> {
    let (tokenizer, template, mut eos, bos) = if path.is_dir() {
        hf_tokenizer(path)?
    } else {
        gguf_tokenizer(path, config.arch)?
    };
    for end in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"] {
        if let Some(id) = tokenizer.token_to_id(end) {
            eos.push(id);
        }
    }
    Ok((tokenizer, template, eos, bos))
}

fn gguf_tokenizer(path: &Path, arch: Arch) -> Result<TokenizerParts, InferenceError> {
    let mut file = std::fs::File::open(path).map_err(|e| InferenceError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| InferenceError::Model(format!("{}: not a GGUF file: {e}", path.display())))?;
    let tokenizer = load_tokenizer(&content)?;
    let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let eos_id = id("tokenizer.ggml.eos_token_id");
    let bos_id = id("tokenizer.ggml.bos_token_id");
    // llama.cpp's default: SentencePiece vocabularies start with BOS, BPE ones do not.
    let add_bos = content
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or_else(|| {
            content
                .metadata
                .get("tokenizer.ggml.model")
                .and_then(|v| v.to_string().ok())
                .is_some_and(|m| m == "llama")
        });
    let source = match content.metadata.get("tokenizer.chat_template") {
        Some(v) => Some(v.to_string()?.as_str()),
        None if arch == Arch::Gemma3 => Some(GEMMA_TEMPLATE),
        None => None,
    };
    let template = source
        .map(|s| ChatTemplate::new(s).map(|t| t.with_tokens(&text(bos_id), &text(eos_id))))
        .transpose()?;
    let bos = if add_bos { bos_id } else { None };
    Ok((tokenizer, template, eos_id.into_iter().collect(), bos))
}

fn hf_tokenizer(dir: &Path) -> Result<TokenizerParts, InferenceError> {
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
        InferenceError::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display()))
    })?;
    let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let template = config["chat_template"]
        .as_str()
        .map(ChatTemplate::new)
        .transpose()?;
    let eos = config["eos_token"]
        .as_str()
        .and_then(|t| tokenizer.token_to_id(t))
        .into_iter()
        .collect();
    Ok((tokenizer, template, eos, None))
}
