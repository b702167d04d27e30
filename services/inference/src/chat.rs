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
    bos: String,
    eos: String,
}

/// Gemma's turn format, for Gemma files that carry no template of their own
/// (llama.cpp recognises the architecture the same way): the system text
/// opens the first user turn.
pub(crate) const GEMMA_TEMPLATE: &str = "{{ bos_token }}\
{%- set ns = namespace(system='') -%}\
{%- for m in messages -%}\
{%- if m.role == 'system' -%}{%- set ns.system = m.content ~ '\n\n' -%}\
{%- else -%}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n\
{%- if m.role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif -%}\
{{ m.content | trim }}<end_of_turn>\n{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt %}<start_of_turn>model\n{% endif -%}";

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
        Ok(Self {
            env,
            bos: String::new(),
            eos: String::new(),
        })
    }

    /// The texts the template gets as `bos_token` and `eos_token` (empty by default).
    pub fn with_tokens(mut self, bos: &str, eos: &str) -> Self {
        self.bos = bos.to_owned();
        self.eos = eos.to_owned();
        self
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
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| InferenceError::Template(e.to_string()))
    }
}
