//! Chat prompts from the model's own Jinja chat template (minijinja).
//!
//! The text of system, user and tool messages (content and name) reaches
//! the template wrapped in [`TEXT_OPEN`]..[`TEXT_CLOSE`], so the tokenizer
//! can tell it from the template's own markup and never reads a control
//! token in it. Assistant turns are passed as they are: templates cut them
//! (reasoning split off at `</think>`), and they are the model's own words.

use serde::{Deserialize, Serialize};

use crate::error::InferenceError;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (empty for an assistant message that only calls tools).
    pub content: String,
    /// An assistant's tool calls, in OpenAI's shape (`id`, `type`, `function`
    /// with `name` and `arguments`), for templates that render them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The author's name (or the tool's, for a `tool` message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// Opens message text in a rendered prompt: a Unicode noncharacter
/// (reserved for a program's internal use), refused in messages.
pub(crate) const TEXT_OPEN: char = '\u{FDD0}';
/// Closes message text in a rendered prompt.
pub(crate) const TEXT_CLOSE: char = '\u{FDD1}';

/// `text` wrapped in the marks (empty text stays empty, so templates that
/// test a message for content see the same thing).
fn mark(text: &str) -> Result<String, InferenceError> {
    if text.contains([TEXT_OPEN, TEXT_CLOSE]) {
        return Err(InferenceError::Request(
            "message text holds U+FDD0 or U+FDD1, noncharacters the server reserves".into(),
        ));
    }
    Ok(if text.is_empty() {
        String::new()
    } else {
        format!("{TEXT_OPEN}{text}{TEXT_CLOSE}")
    })
}

/// Jinja's `trim`, applied inside the marks of a marked text.
fn trim(value: String, chars: Option<String>) -> String {
    let trim = |s: &str| -> String {
        match &chars {
            Some(chars) => s.trim_matches(|c| chars.contains(c)).to_owned(),
            None => s.trim().to_owned(),
        }
    };
    match value
        .strip_prefix(TEXT_OPEN)
        .and_then(|v| v.strip_suffix(TEXT_CLOSE))
    {
        Some(inner) if !inner.contains([TEXT_OPEN, TEXT_CLOSE]) => {
            let inner = trim(inner);
            if inner.is_empty() {
                inner
            } else {
                format!("{TEXT_OPEN}{inner}{TEXT_CLOSE}")
            }
        }
        _ => trim(&value),
    }
}

/// A model's chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    tools: bool,
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
        env.add_filter("trim", trim);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos: String::new(),
            eos: String::new(),
            tools: source.contains("tools"),
        })
    }

    /// The texts the template gets as `bos_token` and `eos_token` (empty by default).
    pub fn with_tokens(mut self, bos: &str, eos: &str) -> Self {
        self.bos = bos.to_owned();
        self.eos = eos.to_owned();
        self
    }

    /// Whether the template renders tool definitions (it reads `tools`).
    pub fn supports_tools(&self) -> bool {
        self.tools
    }

    /// Renders `messages` with the generation prompt for the assistant
    /// appended; the text of system, user and tool messages comes out
    /// between U+FDD0 and U+FDD1 (see the module doc: tokenize it with
    /// `Engine::chat_tokens`, not as plain text); `tools` (OpenAI tool
    /// definitions) are passed to templates that render them.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String, InferenceError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| InferenceError::Template(e.to_string()))?;
        let marked = messages
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if m.role != "assistant" {
                    m.content = mark(&m.content)?;
                    m.name = m.name.as_deref().map(mark).transpose()?;
                }
                Ok(m)
            })
            .collect::<Result<Vec<_>, InferenceError>>()?;
        template
            .render(minijinja::context! {
                messages => marked,
                tools => tools,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| InferenceError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_definitions_render_with_tojson_as_qwen_templates_write_them() {
        // The shape of Qwen 2.5's and Hermes-style templates' tool section.
        let template = ChatTemplate::new(
            "{%- if tools %}<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}</tools>{% endif -%}\
             {%- for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
        )
        .expect("compiles");
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let messages = [ChatMessage {
            role: "user".into(),
            content: "Weather?".into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }];
        let text = template.render(&messages, Some(&tools)).expect("renders");
        assert!(text.contains("\"name\":\"get_weather\""), "{text}");
        assert!(template.supports_tools());
    }
}
