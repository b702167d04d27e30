//! Chat-template rendering (`ChatTemplate`, minijinja with the
//! pycompat methods): a conversation the fuzzer writes (any roles, contents,
//! names, tool calls and tool definitions) rendered by a ChatML template with
//! tool support, and by a template whose source the fuzzer writes (a model
//! file carries its own). Must never panic; a render that hangs is a finding
//! (libFuzzer's -timeout).
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sovereign_inference::{ChatMessage, ChatTemplate};

/// ChatML with tool definitions and tool calls, in the shape model files use.
const CHATML_TOOLS: &str = "{%- if tools %}<|im_start|>system\n# Tools\n{%- for tool in tools %}\n\
{{ tool | tojson }}{%- endfor %}<|im_end|>\n{%- endif %}\
{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}\
{%- if message.tool_calls %}{%- for call in message.tool_calls %}\n<tool_call>\n\
{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>\
{%- endfor %}{%- endif %}<|im_end|>\n{%- endfor %}\
{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[derive(Arbitrary, Debug)]
struct Message {
    role: u8,
    other_role: String,
    content: String,
    name: Option<String>,
    tool_call_id: Option<String>,
    /// JSON text; used when it parses.
    tool_calls: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Render with this template source instead of the ChatML one.
    source: Option<String>,
    messages: Vec<Message>,
    /// JSON text of the tool definitions; used when it parses.
    tools: Option<String>,
    bos: String,
    eos: String,
}

fuzz_target!(|input: Input| {
    let messages: Vec<ChatMessage> = input
        .messages
        .into_iter()
        .map(|m| {
            let role = match m.role % 5 {
                0 => "system".to_owned(),
                1 => "user".to_owned(),
                2 => "assistant".to_owned(),
                3 => "tool".to_owned(),
                _ => m.other_role,
            };
            ChatMessage {
                role,
                content: m.content,
                tool_calls: m.tool_calls.and_then(|t| serde_json::from_str(&t).ok()),
                tool_call_id: m.tool_call_id,
                name: m.name,
            }
        })
        .collect();
    let tools: Option<serde_json::Value> =
        input.tools.and_then(|t| serde_json::from_str(&t).ok());
    let source = input.source.as_deref().unwrap_or(CHATML_TOOLS);
    if let Ok(template) = ChatTemplate::new(source) {
        let template = template.with_tokens(&input.bos, &input.eos);
        let rendered = template.render(&messages, tools.as_ref());
        let tools_listed = tools.as_ref().is_none_or(serde_json::Value::is_array);
        if input.source.is_none()
            && tools_listed
            && messages.iter().all(|m| m.tool_calls.is_none())
        {
            // The ChatML template renders every conversation without tool
            // calls (a call of another shape than OpenAI's may not render),
            // with tools absent or a list, as the API's types guarantee.
            let text = rendered.expect("ChatML renders");
            assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
        }
    }
});
