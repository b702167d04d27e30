//! The OpenAI wire types this API accepts and returns.

use serde::{Deserialize, Serialize};
use sovereign_inference::ChatMessage;

/// `stop` may be one string or several.
#[derive(Debug, Deserialize, Default)]
#[serde(untagged)]
pub enum Stop {
    /// No stop texts.
    #[default]
    None,
    /// One stop text.
    One(String),
    /// Several stop texts.
    Many(Vec<String>),
}

impl Stop {
    /// The stop texts.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::None => Vec::new(),
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// 0 is greedy; OpenAI's default is 1.
    pub temperature: Option<f32>,
    /// Nucleus threshold.
    pub top_p: Option<f32>,
    /// Seed of the counter-based sampler.
    pub seed: Option<u64>,
    /// Stop texts.
    #[serde(default)]
    pub stop: Stop,
    /// Number of choices (only 1 is supported).
    pub n: Option<u32>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Model id.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model id.
    pub model: String,
    /// The prompt text.
    pub prompt: String,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Token counts of a response.
#[derive(Debug, Serialize, Clone, Copy)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}
