//! The tokenizer from GGUF metadata, built with the `tokenizers` crate:
//! byte-level BPE with the file's vocabulary and merges, digits split one by
//! one (GGUF `tokenizer.ggml.pre = "smollm"`, as llama.cpp does), and the
//! control tokens (`<|im_start|>`, ...) matched as special tokens.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::InferenceError;

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn strings(content: &Content, key: &str) -> Result<Vec<String>, InferenceError> {
    match content.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| InferenceError::Tokenizer(format!("{key}: {e}")))
            })
            .collect(),
        _ => Err(InferenceError::Tokenizer(format!("the model has no {key}"))),
    }
}

/// Builds the tokenizer of a GGUF model.
pub fn load_tokenizer(content: &Content) -> Result<Tokenizer, InferenceError> {
    let model = match content.metadata.get("tokenizer.ggml.model") {
        Some(v) => v.to_string().cloned().unwrap_or_default(),
        None => String::new(),
    };
    if model != "gpt2" {
        return Err(InferenceError::Tokenizer(format!(
            "tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" is)"
        )));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| InferenceError::Tokenizer(format!("bad merge {m:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = match content.metadata.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().cloned().unwrap_or_default(),
        None => "default".into(),
    };
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer = match pre.as_str() {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        "default" | "gpt2" => PreTokenizerWrapper::ByteLevel(byte_level),
        other => {
            return Err(InferenceError::Tokenizer(format!(
                "pre-tokenizer {other:?} is not supported (smollm and gpt2 are)"
            )))
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(byte_level));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

/// Token ids of `text`, special tokens recognised, no BOS added.
pub(crate) fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, InferenceError> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))
}
