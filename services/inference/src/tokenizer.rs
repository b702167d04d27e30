//! The tokenizer from GGUF metadata, built with the `tokenizers` crate:
//! - `gpt2` files: byte-level BPE with the file's vocabulary and merges,
//!   split first as llama.cpp does for the file's `tokenizer.ggml.pre`
//!   (`smollm`: digits one by one; `qwen2`, `llama-bpe`: their regexes);
//! - `llama` files (SentencePiece, Gemma): BPE over characters with byte
//!   fallback, merges ranked by the merged piece's score (what llama.cpp's
//!   SPM tokenizer merges first), spaces as `▁`;
//!
//! and the control and user-defined tokens (`<|im_start|>`, ...) matched as
//! special tokens.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use crate::error::InferenceError;

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// llama.cpp's split of `llama-bpe` (Llama 3) text before BPE.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's split of `qwen2` text before BPE (digits one by one).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let mut tokenizer = match model.as_str() {
        "gpt2" => byte_level_bpe(content, &tokens)?,
        "llama" => sentencepiece(content, &tokens)?,
        other => {
            return Err(InferenceError::Tokenizer(format!(
                "tokenizer model {other:?} is not supported (byte-level BPE \"gpt2\" and SentencePiece \"llama\" are)"
            )))
        }
    };
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

fn byte_level_bpe(content: &Content, tokens: &[String]) -> Result<Tokenizer, InferenceError> {
    let merges = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| InferenceError::Tokenizer(format!("bad merge {m:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, InferenceError> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])))
    };
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer = match pre.as_str() {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        "default" | "gpt2" => PreTokenizerWrapper::ByteLevel(byte_level),
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT)?,
        "qwen2" => split(QWEN2_SPLIT)?,
        other => {
            return Err(InferenceError::Tokenizer(format!(
                "pre-tokenizer {other:?} is not supported (smollm, gpt2, llama-bpe and qwen2 are)"
            )))
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(byte_level));
    Ok(tokenizer)
}

/// SentencePiece vocabularies as BPE: every token that is the concatenation
/// of two other tokens gives a merge, ranked by the token's score (highest
/// first), so merges happen in the order llama.cpp's SPM tokenizer picks.
fn sentencepiece(content: &Content, tokens: &[String]) -> Result<Tokenizer, InferenceError> {
    let scores: Vec<f32> = match content.metadata.get("tokenizer.ggml.scores") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
        _ => {
            return Err(InferenceError::Tokenizer(
                "the model has no tokenizer.ggml.scores".into(),
            ))
        }
    };
    if scores.len() != tokens.len() {
        return Err(InferenceError::Tokenizer(
            "tokenizer.ggml.scores and tokens differ in length".into(),
        ));
    }
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) {
                merges.push((scores[id], id, ia, ib));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = merges
        .into_iter()
        .map(|(_, _, a, b)| (tokens[a].clone(), tokens[b].clone()))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    let unk = content
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|i| tokens.get(i as usize));
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let space_prefix = content
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let escape =
        Replace::new(" ", "\u{2581}").map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    let unescape =
        Replace::new("\u{2581}", " ").map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(unescape),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if space_prefix {
        tokenizer
            .with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
                NormalizerWrapper::Prepend(Prepend::new("\u{2581}".into())),
                NormalizerWrapper::Replace(escape),
            ])))
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    } else {
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::Replace(escape)))
            .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Token ids of `text`, special tokens recognised, no BOS added.
pub(crate) fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, InferenceError> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| InferenceError::Tokenizer(e.to_string()))
}
