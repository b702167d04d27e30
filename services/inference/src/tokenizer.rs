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
//!
//! [`PromptEncoder`] tokenizes a rendered chat prompt so that only the
//! template's own text yields control tokens: message text is tokenized
//! without special-token parsing (llama.cpp's `parse_special = false`), so a
//! `<|im_start|>` typed by a user stays ordinary text.

use std::collections::HashMap;

use aho_corasick::{AhoCorasick, MatchKind};

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

use crate::chat::{TEXT_CLOSE, TEXT_OPEN};
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

/// Tokenizes chat prompts rendered with message text marked
/// (`TEXT_OPEN`..`TEXT_CLOSE`): control tokens are matched only outside the
/// marks, as the full tokenizer matches them (leftmost longest); the text
/// between control tokens, marked or not, goes through the tokenizer with
/// special-token parsing off. An unmarked prompt gives exactly the tokens of
/// [`encode`].
pub(crate) struct PromptEncoder {
    /// The tokenizer with special tokens treated as text.
    plain: Tokenizer,
    /// The special tokens' texts; `ids[pattern]` is each one's id.
    matcher: Option<AhoCorasick>,
    ids: Vec<u32>,
}

impl PromptEncoder {
    /// The encoder for `tokenizer` (special tokens from its added vocabulary).
    pub(crate) fn new(tokenizer: &Tokenizer) -> Result<Self, InferenceError> {
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let mut special: Vec<(u32, String)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special && !token.content.is_empty())
            .map(|(id, token)| (id, token.content))
            .collect();
        special.sort();
        let matcher = if special.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(special.iter().map(|(_, text)| text))
                    .map_err(|e| InferenceError::Tokenizer(e.to_string()))?,
            )
        };
        Ok(Self {
            plain,
            matcher,
            ids: special.into_iter().map(|(id, _)| id).collect(),
        })
    }

    /// Token ids of a marked prompt; an unbalanced or nested mark (a template
    /// that cut a message's text) is refused rather than guessed at.
    pub(crate) fn encode(&self, marked: &str) -> Result<Vec<u32>, InferenceError> {
        let mut tokens = Vec::new();
        let mut run = String::new();
        let mut inside = false;
        let mut rest = marked;
        while !rest.is_empty() {
            let cut = rest.find([TEXT_OPEN, TEXT_CLOSE]).unwrap_or(rest.len());
            let (piece, after) = rest.split_at(cut);
            if inside {
                run.push_str(piece);
            } else {
                self.template_text(piece, &mut run, &mut tokens)?;
            }
            let Some(mark) = after.chars().next() else {
                break;
            };
            if (mark == TEXT_OPEN) == inside {
                return Err(InferenceError::Template(
                    "the template cut a message's text apart; the prompt cannot be tokenized safely"
                        .into(),
                ));
            }
            inside = !inside;
            rest = &after[mark.len_utf8()..];
        }
        if inside {
            return Err(InferenceError::Template(
                "the template cut a message's text apart; the prompt cannot be tokenized safely"
                    .into(),
            ));
        }
        self.flush(&mut run, &mut tokens)?;
        Ok(tokens)
    }

    /// Template text: its control tokens end the current run of text.
    fn template_text(
        &self,
        text: &str,
        run: &mut String,
        tokens: &mut Vec<u32>,
    ) -> Result<(), InferenceError> {
        let Some(matcher) = &self.matcher else {
            run.push_str(text);
            return Ok(());
        };
        let mut at = 0;
        for found in matcher.find_iter(text) {
            run.push_str(&text[at..found.start()]);
            self.flush(run, tokens)?;
            tokens.push(self.ids[found.pattern().as_usize()]);
            at = found.end();
        }
        run.push_str(&text[at..]);
        Ok(())
    }

    fn flush(&self, run: &mut String, tokens: &mut Vec<u32>) -> Result<(), InferenceError> {
        if !run.is_empty() {
            let encoding = self
                .plain
                .encode(run.as_str(), false)
                .map_err(|e| InferenceError::Tokenizer(e.to_string()))?;
            tokens.extend_from_slice(encoding.get_ids());
            run.clear();
        }
        Ok(())
    }
}
