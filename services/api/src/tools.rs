//! Tool calling in a generic format that works with any model: the tools
//! are described in a system message, and the answer is constrained (by
//! llguidance) to one JSON object, either `{"tool_calls": [{"name": ...,
//! "arguments": {...}}]}` or `{"content": "..."}`, which is then turned into
//! OpenAI's `tool_calls` or plain content. Earlier tool calls and tool
//! results in the conversation are rendered in the same format.

use serde_json::{json, Value};
use sovereign_inference::ChatMessage;

use crate::error::ApiError;
use crate::openai::{FunctionCall, Tool, ToolCall, ToolChoice};

/// How a request uses its tools.
pub struct ToolPlan {
    /// The system text that describes the tools and the answer format.
    pub system: String,
    /// The JSON schema every answer must match.
    pub schema: Value,
}

/// The plan for `tools` under `choice`, or `None` when no tool may be called.
pub fn plan(
    tools: &[Tool],
    choice: Option<&ToolChoice>,
    parallel: bool,
) -> Result<Option<ToolPlan>, ApiError> {
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::field(
                format!("tools[{i}].type"),
                format!(
                    "tools of type {:?} are not supported (function only)",
                    tool.kind
                ),
            ));
        }
    }
    let (required, only) = match choice {
        None => (false, None),
        Some(ToolChoice::Mode(mode)) => match mode.as_str() {
            "none" => return Ok(None),
            "auto" => (false, None),
            "required" => (true, None),
            other => {
                return Err(ApiError::field(
                    "tool_choice",
                    format!("tool_choice {other:?} is not one of none, auto, required"),
                ))
            }
        },
        Some(ToolChoice::Named { kind, function }) => {
            if kind != "function" || !tools.iter().any(|t| t.function.name == function.name) {
                return Err(ApiError::field(
                    "tool_choice",
                    format!(
                        "tool_choice names {:?}, which is not in tools",
                        function.name
                    ),
                ));
            }
            (true, Some(function.name.as_str()))
        }
    };
    if tools.is_empty() {
        return if choice.is_some() {
            Err(ApiError::field("tool_choice", "tool_choice needs tools"))
        } else {
            Ok(None)
        };
    }
    let calls: Vec<Value> = tools
        .iter()
        .filter(|t| only.is_none_or(|name| t.function.name == name))
        .map(|t| {
            json!({
                "type": "object",
                "properties": {
                    "name": { "const": t.function.name },
                    "arguments": t.function.parameters.clone().unwrap_or(json!({"type": "object"})),
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut list = json!({ "type": "array", "items": { "anyOf": calls }, "minItems": 1 });
    if !parallel || only.is_some() {
        list["maxItems"] = json!(1);
    }
    let call = json!({
        "type": "object",
        "properties": { "tool_calls": list },
        "required": ["tool_calls"],
        "additionalProperties": false,
    });
    let schema = if required {
        call
    } else {
        json!({ "anyOf": [call, {
            "type": "object",
            "properties": { "content": { "type": "string" } },
            "required": ["content"],
            "additionalProperties": false,
        }] })
    };
    let definitions: Vec<Value> = tools
        .iter()
        .map(|t| serde_json::to_value(&t.function).unwrap_or_default())
        .collect();
    let mut system = format!(
        "You can call these tools (their arguments are JSON Schemas):\n{}\n\
         To call tools, answer with {{\"tool_calls\": [{{\"name\": \"<tool name>\", \"arguments\": {{...}}}}]}}.",
        serde_json::to_string_pretty(&definitions).unwrap_or_default()
    );
    if !required {
        system.push_str(" To answer directly, answer with {\"content\": \"<your answer>\"}.");
    }
    Ok(Some(ToolPlan { system, schema }))
}

/// Puts the tool description first and rewrites earlier tool calls and
/// results into the generic format.
pub fn apply(plan: &ToolPlan, messages: &mut Vec<ChatMessage>) {
    for message in messages.iter_mut() {
        if let Some(calls) = message.tool_calls.take() {
            let calls: Vec<Value> = calls
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let arguments = c["function"]["arguments"]
                        .as_str()
                        .and_then(|a| serde_json::from_str(a).ok())
                        .unwrap_or(json!({}));
                    json!({ "name": c["function"]["name"], "arguments": arguments })
                })
                .collect();
            message.content = json!({ "tool_calls": calls }).to_string();
        } else if message.role == "assistant" {
            message.content = json!({ "content": message.content }).to_string();
        }
        if message.role == "tool" {
            let name = message.name.take().unwrap_or_default();
            let id = message.tool_call_id.take().unwrap_or_default();
            message.role = "user".into();
            message.content = format!("Result of tool call {id} {name}:\n{}", message.content);
        }
    }
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{}", first.content, plan.system);
        }
        _ => messages.insert(0, ChatMessage::new("system", plan.system.clone())),
    }
}

/// The answer of a tool-enabled generation: content, or tool calls.
pub enum Answer {
    /// Plain content.
    Content(String),
    /// Calls to make.
    Calls(Vec<ToolCall>),
}

/// Reads a finished answer in the generic format (text that is not, as
/// from a generation cut by `max_tokens`, is returned as content).
pub fn parse(text: &str, mut next_id: impl FnMut() -> String) -> Answer {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Answer::Content(text.to_owned());
    };
    if let Some(calls) = value.get("tool_calls").and_then(Value::as_array) {
        return Answer::Calls(
            calls
                .iter()
                .map(|c| ToolCall {
                    id: next_id(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: c["name"].as_str().unwrap_or_default().to_owned(),
                        arguments: c["arguments"].to_string(),
                    },
                })
                .collect(),
        );
    }
    match value.get("content").and_then(Value::as_str) {
        Some(content) => Answer::Content(content.to_owned()),
        None => Answer::Content(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Tool> {
        serde_json::from_value(json!([{"type": "function", "function": {
            "name": "get_weather", "description": "the weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }}]))
        .unwrap()
    }

    #[test]
    fn the_plan_follows_tool_choice() {
        let tools = weather();
        assert!(plan(&tools, Some(&ToolChoice::Mode("none".into())), true)
            .unwrap()
            .is_none());
        let auto = plan(&tools, None, true).unwrap().unwrap();
        assert!(auto.schema["anyOf"].is_array() && auto.system.contains("get_weather"));
        let required = plan(&tools, Some(&ToolChoice::Mode("required".into())), false)
            .unwrap()
            .unwrap();
        assert_eq!(required.schema["properties"]["tool_calls"]["maxItems"], 1);
        let named: ToolChoice =
            serde_json::from_value(json!({"type": "function", "function": {"name": "nope"}}))
                .unwrap();
        assert_eq!(
            plan(&tools, Some(&named), true).err().unwrap().body()["error"]["param"],
            "tool_choice"
        );
    }

    #[test]
    fn answers_parse_into_calls_or_content() {
        let mut n = 0;
        let calls = parse(
            r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}"#,
            || {
                n += 1;
                format!("call_{n}")
            },
        );
        let Answer::Calls(calls) = calls else {
            panic!("not calls")
        };
        assert_eq!(calls[0].id, "call_1");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
        assert!(
            matches!(parse(r#"{"content": "hi"}"#, String::new), Answer::Content(c) if c == "hi")
        );
    }
}
