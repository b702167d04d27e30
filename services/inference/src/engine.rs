//! One node running every layer: prompt in, streamed text out.

use std::path::Path;
use std::sync::Arc;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use tokenizers::Tokenizer;

use crate::chat::{ChatMessage, ChatTemplate, GEMMA_TEMPLATE};
use crate::config::Arch;
use crate::config::ModelConfig;
use crate::error::InferenceError;
use crate::executor::{Executor, LocalExecutor, Work};
use crate::grammar::{token_bytes, Constraint, Grammars};
use crate::logits::LogitShaping;
use crate::model::Stage;
use crate::sampling::Sampler;
use crate::sequence::{Sequence, Vocabulary};
use crate::tokenizer::{encode, load_tokenizer, PromptEncoder};

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

/// A model loaded whole on this node.
pub struct Engine {
    stage: Arc<Stage>,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    prompts: PromptEncoder,
    eos: Vec<u32>,
    /// The token that starts every sequence, if the model asks for one.
    bos: Option<u32>,
    /// Every token's bytes, made on first use.
    token_bytes: OnceLock<Vec<Vec<u8>>>,
    /// The grammar engine, made on first use.
    grammars: OnceLock<Result<Grammars, String>>,
}

impl Engine {
    /// Loads a model with all its layers: a GGUF file (tokenizer and chat
    /// template from its metadata) or a safetensors directory (from
    /// `tokenizer.json` and `tokenizer_config.json`).
    pub fn load(path: &Path) -> Result<Self, InferenceError> {
        let (_, config, _) = crate::weights::Weights::open(path)?;
        let (tokenizer, template, eos, bos) = tokenizer_parts(path, &config)?;
        let stage = Arc::new(Stage::load(path, 0..config.layers)?);
        Ok(Self {
            stage,
            prompts: PromptEncoder::new(&tokenizer)?,
            tokenizer,
            template,
            eos,
            bos,
            token_bytes: OnceLock::new(),
            grammars: OnceLock::new(),
        })
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
        &self.tokenizer
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

    /// The stage holding every layer.
    /// What sequences need of the tokenizer side.
    pub fn vocabulary(&self) -> Vocabulary<'_> {
        Vocabulary {
            tokenizer: &self.tokenizer,
            eos: &self.eos,
            context: self.config().context,
        }
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

    /// The prompt tokens for a conversation, from the model's chat
    /// template: control tokens come only from the template's own text,
    /// never from message text (a typed `<|im_start|>` is ordinary text).
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, InferenceError> {
        self.chat_tokens_with_tools(messages, None)
    }

    /// [`Engine::chat_tokens`] with tool definitions, for a template that
    /// renders them (see [`Engine::template_supports_tools`]).
    pub fn chat_tokens_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, InferenceError> {
        let marked = self
            .template
            .as_ref()
            .ok_or_else(|| InferenceError::Template("the model has no chat template".into()))?
            .render(messages, tools)?;
        Ok(with_bos(self.prompts.encode(&marked)?, self.bos))
    }

    /// Whether the model's chat template renders tool definitions itself.
    pub fn template_supports_tools(&self) -> bool {
        self.template
            .as_ref()
            .is_some_and(ChatTemplate::supports_tools)
    }

    /// The bytes token `id` stands for (a control token's name).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let all = self
            .token_bytes
            .get_or_init(|| token_bytes(&self.tokenizer, self.config().vocab));
        match all.get(id as usize).map(Vec::as_slice) {
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
            let bytes = self
                .token_bytes
                .get_or_init(|| token_bytes(&self.tokenizer, self.config().vocab));
            Grammars::new(&self.tokenizer, bytes, &self.eos).map_err(|e| e.to_string())
        });
        grammars
            .as_ref()
            .map_err(|e| InferenceError::Grammar(e.clone()))?
            .json(schema)
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
        let mut sequence = Sequence::new(prompt.to_vec(), params.clone(), self.config().context)?;
        let mut executor = self.local_executor();
        let mut logits = Vec::new();
        let mut position = 0;
        while sequence.finish().is_none() {
            let tokens = &sequence.tokens()[position..];
            let work = Work {
                seq: 0,
                tokens,
                position,
                logits: true,
            };
            logits.clear();
            executor.step(&[work], &mut logits)?;
            position = sequence.len();
            let output = sequence.advance(&mut logits, self.vocabulary())?;
            if !output.text.is_empty() && !on_text(output.text) {
                sequence.cancel();
            }
        }
        Ok(sequence.generation())
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

pub(crate) type TokenizerParts = (Tokenizer, Option<ChatTemplate>, Vec<u32>, Option<u32>);

/// The tokenizer, chat template, end tokens and BOS of the model at `path`.
pub(crate) fn tokenizer_parts(
    path: &Path,
    config: &ModelConfig,
) -> Result<TokenizerParts, InferenceError> {
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
