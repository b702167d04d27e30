//! What runs the API's generations: the whole model in this process
//! ([`sovereign_inference::Engine`]) or a ring of nodes (`sovereign-node`).

use serde_json::{Map, Value};
use sovereign_inference::{
    ChatMessage, Engine, GenerateParams, Generation, InferenceError, ModelConfig,
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
}
