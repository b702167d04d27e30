//! Chat prompts from the model's own Jinja chat template (minijinja).

use serde::{Deserialize, Serialize};

use crate::error::InferenceError;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl ChatTemplate {
    /// Compiles a Jinja chat template (as shipped in `tokenizer.chat_template`).
    pub fn new(source: &str) -> Result<Self, InferenceError> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        Ok(Self { env })
    }

    /// Renders `messages` with the generation prompt for the assistant appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, InferenceError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => "",
                eos_token => "",
            })
            .map_err(|e| InferenceError::Template(e.to_string()))
    }
}
