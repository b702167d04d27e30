//! What runs the API's generations: the whole model in this process
//! ([`sovereign_inference::Engine`]) or a ring of nodes (`sovereign-node`).

use serde_json::{Map, Value};
use sovereign_inference::{
    ChatMessage, Constraint, Engine, GenerateParams, Generation, InferenceError, LogitShaping,
    ModelConfig, TokenLogprob,
};

/// A model that answers requests, with what `/health` and `/metrics` add.
pub trait Backend: Send + Sync + 'static {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// The prompt text for a conversation, from the model's chat template.
    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, InferenceError>;

    /// Token ids of `text`.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError>;

    /// Generates from `prompt`; `on_text` receives text as it becomes final
    /// and returns `false` to cancel. Runs on a blocking thread.
    fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError>;

    /// Generates under an optional grammar `constraint`; `on_emit` also
    /// receives the log-probabilities of the tokens since its last call.
    /// Backends without logit processing refuse shaping, logprobs and grammars.
    fn generate_with(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        constraint: Option<&mut Constraint>,
        on_emit: &mut dyn FnMut(&str, &[TokenLogprob]) -> bool,
    ) -> Result<Generation, InferenceError> {
        if constraint.is_some()
            || params.logprobs.is_some()
            || params.shaping != LogitShaping::default()
        {
            return Err(InferenceError::Request(
                "logprobs, penalties, logit_bias and grammars are not supported by this backend"
                    .into(),
            ));
        }
        self.generate(prompt, params, &mut |text| on_emit(text, &[]))
    }

    /// A grammar constraint that makes the output JSON matching `schema`.
    fn json_constraint(&self, _schema: &Value) -> Result<Constraint, InferenceError> {
        Err(InferenceError::Request(
            "structured output is not supported by this backend".into(),
        ))
    }

    /// The bytes token `id` stands for (empty when unknown).
    fn token_bytes(&self, _id: u32) -> Vec<u8> {
        Vec::new()
    }

    /// The mean-pooled, unit-length embedding of `tokens`.
    fn embedding(&self, _tokens: &[u32]) -> Result<Vec<f32>, InferenceError> {
        Err(InferenceError::Request(
            "embeddings are not supported by this backend".into(),
        ))
    }

    /// Fields `GET /health` adds; `detailed` only for a caller with a key
    /// (or when no keys are configured).
    fn health(&self, _detailed: bool) -> Map<String, Value> {
        Map::new()
    }

    /// Prometheus lines `GET /metrics` adds.
    fn metrics(&self) -> String {
        String::new()
    }
}

impl Backend for Engine {
    fn config(&self) -> &ModelConfig {
        Engine::config(self)
    }

    fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, InferenceError> {
        Engine::chat_prompt(self, messages)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        Engine::tokenize(self, text)
    }

    fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        Engine::generate(self, prompt, params, on_text)
    }

    /// The model's matrices by the code that multiplies them.
    fn metrics(&self) -> String {
        let mut text = String::from("# HELP sovereign_model_matrices Weight matrices of the served model by the code that multiplies them.\n# TYPE sovereign_model_matrices gauge\n");
        for (path, count) in self.matrix_paths() {
            text.push_str(&format!(
                "sovereign_model_matrices{{path=\"{path}\"}} {count}\n"
            ));
        }
        text
    }

    fn generate_with(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        constraint: Option<&mut Constraint>,
        on_emit: &mut dyn FnMut(&str, &[TokenLogprob]) -> bool,
    ) -> Result<Generation, InferenceError> {
        Engine::generate_with(self, prompt, params, constraint, on_emit)
    }

    fn json_constraint(&self, schema: &Value) -> Result<Constraint, InferenceError> {
        Engine::json_constraint(self, schema)
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        Engine::token_bytes(self, id).to_vec()
    }

    fn embedding(&self, tokens: &[u32]) -> Result<Vec<f32>, InferenceError> {
        Engine::embedding(self, tokens)
    }
}
