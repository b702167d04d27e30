/*!
Sovereign's inference engine: Llama, Qwen 2/3 and Gemma 3 models from GGUF files, run by
contiguous layer ranges so that a ring of nodes can split one model.

The three stages the ring needs are on [`Stage`]: [`Stage::embed`] (tokens to
hidden state, first stage only), [`Stage::run_layers`] (this stage's layers
with their [`KvCache`]) and [`Stage::head`] (final norm and output projection,
last stage only). A [`Stage`] loads only the tensors of its range. [`Engine`]
is one node running every layer: tokenizer, chat template, and one request
alone; [`Scheduler`] batches many over the same [`Sequence`]. Sampling draws from a counter-based generator keyed by the
request's seed and the token position ([`Sampler`]), so whichever node
samples, the same seed gives the same tokens.

The engine only reads model files; it opens no socket and never writes the store.
*/
#![deny(missing_docs)]

mod chat;
mod config;
mod engine;
mod error;
mod executor;
mod footprint;
mod forward;
mod front;
mod grammar;
mod linear;
mod logits;
mod model;
mod perplexity;
mod sampling;
mod scheduler;
mod sequence;
mod tokenizer;
mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Arch, ModelConfig, MAX_CONTEXT, MAX_HEAD_DIM};
pub use engine::{Engine, FinishReason, GenerateParams, Generation};
pub use error::InferenceError;
pub use executor::{Executor, LocalExecutor, SeqId, Work};
pub use footprint::Footprint;
pub use front::Front;
pub use grammar::Constraint;
pub use logits::{LogitShaping, TokenLogprob};
pub use model::{Chunk, KvCache, Stage};
pub use perplexity::{Agreement, Perplexity, Reference};
pub use sampling::Sampler;
pub use scheduler::{
    bytes_per_position, EventSink, Request, Scheduler, SchedulerConfig, SchedulerStats, SubmitError,
};
pub use sequence::{LogitsProcessor, Output, Sequence, StepFn, Vocabulary};
pub use tokenizer::load_tokenizer;
