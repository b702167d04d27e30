//! Constrained decoding with llguidance: a JSON schema becomes a mask of the
//! tokens allowed at each step, so a finished output always parses and
//! matches the schema. llguidance sees the vocabulary as the bytes of every
//! token, which this module derives from the `tokenizers` tokenizer.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tokenizers::{DecoderWrapper, Tokenizer};

use crate::error::InferenceError;
use crate::sequence::LogitsProcessor;

/// The bytes of every token; control tokens carry llguidance's marker byte
/// so that grammars never produce them as text.
pub(crate) fn token_bytes(tokenizer: &Tokenizer, vocab: usize) -> Vec<Vec<u8>> {
    let byte_level = matches!(tokenizer.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
    // GPT-2's byte-to-character table, inverted: printable bytes stand for
    // themselves, the others were shifted to characters from U+0100 on.
    let mut from_char: HashMap<char, u8> = HashMap::new();
    let mut shifted = 0u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(byte)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or('\0')
        };
        from_char.insert(c, byte);
    }
    let special: HashMap<u32, bool> = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, token)| (id, token.special))
        .collect();
    (0..vocab as u32)
        .map(|id| {
            let Some(name) = tokenizer.id_to_token(id) else {
                return vec![TokTrie::SPECIAL_TOKEN_MARKER];
            };
            if special.get(&id).copied().unwrap_or(false) {
                let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                bytes.extend_from_slice(name.as_bytes());
                return bytes;
            }
            if byte_level {
                if let Some(bytes) = name
                    .chars()
                    .map(|c| from_char.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                {
                    return bytes;
                }
            }
            let hex = name
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .filter(|h| h.len() == 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(byte) => vec![byte],
                None => name.replace('\u{2581}', " ").into_bytes(),
            }
        })
        .collect()
}

/// The vocabulary as llguidance's tokenizer environment.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// Makes constraints for one model's vocabulary.
pub(crate) struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// The grammar engine for `tokenizer`; `eos` ends a finished output.
    pub(crate) fn new(
        tokenizer: &Tokenizer,
        bytes: &[Vec<u8>],
        eos: &[u32],
    ) -> Result<Self, InferenceError> {
        let first_eos = eos.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(bytes.len() as u32, first_eos);
        let mut trie = TokTrie::from(&info, bytes);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(Vocabulary {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| InferenceError::Grammar(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A constraint to output JSON that matches `schema`, compact (single
    /// spaces after `:` and `,`, no newlines).
    pub(crate) fn json(&self, schema: &serde_json::Value) -> Result<Constraint, InferenceError> {
        let mut schema = schema.clone();
        if let Some(object) = schema.as_object_mut() {
            object.insert(
                "x-guidance".into(),
                serde_json::json!({
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                }),
            );
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| InferenceError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(InferenceError::Grammar(error));
        }
        Ok(Constraint { matcher })
    }
}

/// The grammar state of one generation.
pub struct Constraint {
    matcher: Matcher,
}

impl LogitsProcessor for Constraint {
    /// Sets the logits of tokens the grammar does not allow next to -inf
    /// (only end-of-sequence once the output is complete).
    fn process(&mut self, _generated: &[u32], logits: &mut [f32]) -> Result<(), InferenceError> {
        let allowed: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| InferenceError::Grammar(e.to_string()))?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar by the chosen token.
    fn accepted(&mut self, token: u32) -> Result<(), InferenceError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| InferenceError::Grammar(e.to_string()))
    }
}
