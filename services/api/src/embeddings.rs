//! `POST /v1/embeddings`: vectors for retrieval from the loaded model
//! (mean pooling of the final-normed hidden states, unit length, as
//! llama.cpp's `llama-embedding --pooling mean`).

use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::openai::Prompt;
use crate::server::AppState;

/// Fields of `/v1/embeddings` this server honours.
pub const EMBEDDING_FIELDS: &[&str] = &["model", "input", "encoding_format", "user"];

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    /// Model id.
    pub model: String,
    /// The text(s) or token list(s) to embed.
    pub input: Prompt,
    /// `float` (default) or `base64` (little-endian f32).
    pub encoding_format: Option<String>,
    /// The end user, recorded in the audit log.
    pub user: Option<String>,
}

/// The inputs as token lists, checked against the model.
pub fn inputs(state: &AppState, input: Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let tokenize = |text: &str| {
        state
            .engine
            .tokenize(text)
            .map_err(|e| ApiError::field("input", e.to_string()))
    };
    let lists = match input {
        Prompt::Text(text) => vec![tokenize(&text)?],
        Prompt::Texts(texts) => texts
            .iter()
            .map(|t| tokenize(t))
            .collect::<Result<_, _>>()?,
        Prompt::Tokens(tokens) => vec![tokens],
        Prompt::TokenLists(lists) => lists,
    };
    let config = state.engine.config();
    if lists.is_empty() {
        return Err(ApiError::field("input", "input must not be empty"));
    }
    for (i, tokens) in lists.iter().enumerate() {
        if tokens.is_empty() || tokens.len() > config.context {
            return Err(ApiError::field(
                "input",
                format!(
                    "input {i} has {} tokens; it must have 1 to {}",
                    tokens.len(),
                    config.context
                ),
            ));
        }
        if tokens.iter().any(|&t| t as usize >= config.vocab) {
            return Err(ApiError::field(
                "input",
                format!(
                    "token ids must be below the vocabulary size {}",
                    config.vocab
                ),
            ));
        }
    }
    Ok(lists)
}

/// Embeds every input (on a blocking thread) and answers in OpenAI's shape.
pub fn respond(state: &Arc<AppState>, lists: &[Vec<u32>], base64: bool) -> Result<Value, ApiError> {
    let mut data = Vec::with_capacity(lists.len());
    for (index, tokens) in lists.iter().enumerate() {
        let vector = state.engine.embedding(tokens).map_err(ApiError::internal)?;
        let embedding = if base64 {
            let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(vector)
        };
        data.push(json!({ "object": "embedding", "index": index, "embedding": embedding }));
    }
    let tokens: usize = lists.iter().map(Vec::len).sum();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": state.model_id,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    }))
}
