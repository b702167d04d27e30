//! Inference errors.

use std::path::PathBuf;

/// Errors loading a model or generating.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The model file could not be read.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The model file is not a usable Llama-family GGUF.
    #[error("model: {0}")]
    Model(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The tokenizer could not be built or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed.
    #[error("chat template: {0}")]
    Template(String),
    /// A grammar (JSON schema) could not be compiled or followed.
    #[error("grammar: {0}")]
    Grammar(String),
    /// The request cannot be served as asked.
    #[error("{0}")]
    Request(String),
}
