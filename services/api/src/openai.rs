//! The OpenAI wire types this API accepts and returns, and the check that
//! every field a request sets is one this server honours (a field it does
//! not honour is refused by name, never silently dropped).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A field the server does not honour, or a value it cannot take.
#[derive(Debug)]
pub struct Refusal {
    /// The field, as a path (`messages[1].content[0].type`).
    pub param: String,
    /// Why.
    pub message: String,
}

impl Refusal {
    /// A refusal of `param`.
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// Fields of `/v1/chat/completions` this server honours.
pub const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "user",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// Fields of `/v1/completions` this server honours.
pub const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "user",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
];

/// Fields of a chat message this server honours.
const MESSAGE_FIELDS: &[&str] = &[
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    // An earlier assistant turn's refusal text, echoed back by clients.
    "refusal",
];

/// Whether `value` is the only value of `field` this server supports, for
/// fields that are accepted at their default and refused otherwise.
fn at_default(field: &str, value: &Value) -> Option<bool> {
    Some(match field {
        "n" | "best_of" => value.as_u64() == Some(1),
        "echo" | "store" => value == &Value::Bool(false),
        "service_tier" => matches!(value.as_str(), Some("auto" | "default")),
        "suffix" => value.as_str() == Some(""),
        "modalities" => value == &serde_json::json!(["text"]),
        "metadata" => value.as_object().is_some_and(Map::is_empty),
        _ => return None,
    })
}

/// Refuses, by name, the first field of `body` that is set (not null) and
/// neither in `honoured` nor at its only supported value.
pub fn check_fields(body: &Map<String, Value>, honoured: &[&str]) -> Result<(), Refusal> {
    for (field, value) in body {
        if value.is_null() || honoured.contains(&field.as_str()) {
            continue;
        }
        return Err(match at_default(field, value) {
            Some(true) => continue,
            Some(false) => Refusal::new(
                field,
                format!("`{field}` = {value} is not supported by this server"),
            ),
            None => Refusal::new(field, format!("`{field}` is not supported by this server")),
        });
    }
    if let Some(Value::Array(messages)) = body.get("messages") {
        for (i, message) in messages.iter().enumerate() {
            let Some(message) = message.as_object() else {
                continue;
            };
            for (field, value) in message {
                if !value.is_null() && !MESSAGE_FIELDS.contains(&field.as_str()) {
                    return Err(Refusal::new(
                        format!("messages[{i}].{field}"),
                        format!("`messages[{i}].{field}` is not supported by this server"),
                    ));
                }
            }
        }
    }
    if let Some(options) = body.get("stream_options").and_then(Value::as_object) {
        for (field, value) in options {
            if field != "include_usage" && !value.is_null() && value != &Value::Bool(false) {
                return Err(Refusal::new(
                    format!("stream_options.{field}"),
                    format!("`stream_options.{field}` is not supported by this server"),
                ));
            }
        }
    }
    Ok(())
}

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
    /// Only the `top_k` likeliest tokens are drawn from (0: all); an
    /// extension of llama.cpp's and vLLM's servers.
    pub top_k: Option<usize>,
    /// Seed of the counter-based sampler (random when absent).
    pub seed: Option<u64>,
    /// Stop texts.
    #[serde(default)]
    pub stop: Stop,
    /// Penalty, once, for every token already generated (-2 to 2).
    pub presence_penalty: Option<f32>,
    /// Penalty per occurrence of a token already generated (-2 to 2).
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) to a bias added to its logit (-100 to 100).
    pub logit_bias: Option<HashMap<String, f32>>,
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
}

/// `response_format.json_schema` (its `name` and `strict` need no handling:
/// outputs always follow the schema).
#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    /// The JSON schema (any JSON when absent).
    pub schema: Option<Value>,
}

/// A tool the model may call.
#[derive(Debug, Deserialize)]
pub struct Tool {
    /// Only `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDef,
}

/// A function's definition.
#[derive(Debug, Deserialize, Serialize)]
pub struct FunctionDef {
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of its arguments (always followed, `strict` or not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// `tool_choice`: a mode or one named function.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `none`, `auto` or `required`.
    Mode(String),
    /// `{"type": "function", "function": {"name": ...}}`.
    Named {
        /// Only `function`.
        #[serde(rename = "type")]
        kind: String,
        /// The function to call.
        function: NamedFunction,
    },
}

/// The function named by `tool_choice`.
#[derive(Debug, Deserialize)]
pub struct NamedFunction {
    /// Its name.
    pub name: String,
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk with the request's token counts.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// A message's content: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// A function call made by the assistant.
#[derive(Debug, Deserialize, Serialize, Clone)]
pub struct ToolCall {
    /// The call's id, which the `tool` message answering it repeats.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// A function's name and its arguments as a JSON text.
#[derive(Debug, Deserialize, Serialize, Clone)]
pub struct FunctionCall {
    /// The function.
    pub name: String,
    /// Its arguments, a JSON object as text.
    pub arguments: String,
}

/// One message of a chat request.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text; null for an assistant message that only calls tools.
    #[serde(default)]
    pub content: Option<Content>,
    /// The author's name.
    pub name: Option<String>,
    /// The assistant's tool calls.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Model id.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// The end user, recorded in the audit log.
    pub user: Option<String>,
    /// Report each token's log-probability.
    pub logprobs: Option<bool>,
    /// How many alternatives to report with each token (0 to 20).
    pub top_logprobs: Option<usize>,
    /// Constrain the output to JSON.
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call.
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tools to call.
    pub tool_choice: Option<ToolChoice>,
    /// Allow several calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
}

/// The prompt of a text completion: text, texts, tokens or token lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several texts (one choice each).
    Texts(Vec<String>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model id.
    pub model: String,
    /// The prompt(s).
    pub prompt: Prompt,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// The end user, recorded in the audit log.
    pub user: Option<String>,
    /// Report each token's log-probability and this many alternatives (0 to 5).
    pub logprobs: Option<usize>,
}

/// Token counts of a response.
#[derive(Debug, Serialize, Clone, Copy, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Adds one generation's counts.
    pub fn add(&mut self, prompt: usize, completion: usize) {
        self.prompt_tokens += prompt;
        self.completion_tokens += completion;
        self.total_tokens += prompt + completion;
    }
}

/// The text of a message's content, text parts joined by newlines.
pub fn content_text(index: usize, content: Option<Content>) -> Result<String, Refusal> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(text)) => Ok(text),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(text)) => texts.push(text),
                    ("text", None) => {
                        return Err(Refusal::new(
                            format!("messages[{index}].content[{j}].text"),
                            "a text part needs `text`",
                        ))
                    }
                    (other, _) => {
                        return Err(Refusal::new(
                            format!("messages[{index}].content[{j}].type"),
                            format!(
                                "content parts of type {other:?} are not supported (text only)"
                            ),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: Value) -> Result<(), Refusal> {
        check_fields(body.as_object().unwrap(), CHAT_FIELDS)
    }

    #[test]
    fn unknown_and_unsupported_fields_name_themselves() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert!(check(base.clone()).is_ok());
        let with = |field: &str, value: Value| {
            let mut body = base.clone();
            body[field] = value;
            check(body).err().map(|r| r.param)
        };
        assert_eq!(with("n", json!(2)).as_deref(), Some("n"));
        assert_eq!(with("n", json!(1)), None);
        assert_eq!(with("functions", json!([{}])).as_deref(), Some("functions"));
        assert_eq!(with("functions", Value::Null), None);
        assert_eq!(with("store", json!(true)).as_deref(), Some("store"));
        assert_eq!(with("logprobs", json!(true)), None);
        assert_eq!(
            with("reasoning_effort", json!("low")).as_deref(),
            Some("reasoning_effort")
        );
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi", "audio": {"id": "x"}}]});
        assert_eq!(check(body).unwrap_err().param, "messages[0].audio");
        let body =
            json!({"model": "m", "messages": [], "stream_options": {"include_obfuscation": true}});
        assert_eq!(
            check(body).unwrap_err().param,
            "stream_options.include_obfuscation"
        );
    }

    #[test]
    fn content_parts_join_and_non_text_parts_are_refused() {
        let parts: Content = serde_json::from_value(json!([
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}
        ]))
        .unwrap();
        assert_eq!(content_text(0, Some(parts)).unwrap(), "a\nb");
        assert_eq!(content_text(0, None).unwrap(), "");
        let image: Content =
            serde_json::from_value(json!([{"type": "image_url", "image_url": {"url": "x"}}]))
                .unwrap();
        assert_eq!(
            content_text(2, Some(image)).unwrap_err().param,
            "messages[2].content[0].type"
        );
    }
}
