//! The ring's inference frames (**API Boundary: the ring protocol**).
//!
//! A frame is one ring message on the inference channel: a protocol version
//! (`u16`, little-endian), then the frame in postcard encoding. A frame of
//! another version is refused with [`ProtocolError::Version`] before it is
//! parsed. Hidden states and logits travel as little-endian `f32` bytes.

use serde::{Deserialize, Serialize};
use sovereign_inference::Sampler;

/// This build's protocol version (2: the last stage may sample a row's
/// token itself, [`Row::sample`]).
pub const VERSION: u16 = 2;

/// Largest frame accepted (a prefill chunk's hidden states; the ring's own
/// frame limit applies first).
pub const MAX_FRAME: usize = 16 << 20;

/// One sequence's rows in a [`Step`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The sequence, unique per entry node.
    pub seq: u64,
    /// Position of the row's first token; the stage's cache for `seq` must
    /// hold exactly this many positions (0 starts the sequence afresh).
    pub position: u32,
    /// Tokens in this row.
    pub len: u32,
    /// Whether the entry wants the logits of the row's last token.
    pub logits: bool,
    /// With `logits`: the last stage samples the row's next token with this
    /// sampler (counter-based: any node draws the same) and answers the
    /// token instead of the logits, when nothing else needs them.
    pub sample: Option<Sampler>,
}

/// What a step carries into a stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    /// Token ids (to the first stage).
    Tokens(Vec<u32>),
    /// Hidden states, `[rows, hidden]` as little-endian f32 (to later stages).
    Hidden(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A forward step of a batch of sequences, passed from stage to stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The plan the entry ran it on ([`crate::plan::Plan::id`]).
    pub plan: u64,
    /// The entry node, which gets the logits.
    pub entry: String,
    /// The entry's number for this step.
    pub step: u64,
    /// The sequences, in payload order.
    pub rows: Vec<Row>,
    /// Tokens or hidden states of every row, concatenated.
    pub payload: Payload,
}

/// Messages of the inference channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Run a step (entry to the first stage, stage to stage).
    Step(Step),
    /// The last stage's answer to the entry: one row of logits per row that
    /// asked for them without a sampler (little-endian f32), and one token
    /// per row that asked with one, each in row order.
    Answer {
        /// The step answered.
        step: u64,
        /// The logits.
        #[serde(with = "serde_bytes")]
        values: Vec<u8>,
        /// The sampled tokens.
        tokens: Vec<u32>,
    },
    /// A stage could not run a step (another plan, a cache it lost).
    Failed {
        /// The step.
        step: u64,
        /// Why.
        reason: String,
    },
    /// The entry is done with these sequences: free their caches.
    Release {
        /// The entry node.
        entry: String,
        /// Its sequences.
        seqs: Vec<u64>,
    },
}

/// A frame that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Another protocol version.
    #[error("ring protocol version {0} is not supported (this node speaks {VERSION})")]
    Version(u16),
    /// Too short, too long, or not a frame.
    #[error("malformed ring frame: {0}")]
    Malformed(String),
}

impl Frame {
    /// The frame's bytes, version first.
    pub fn encode(&self) -> Vec<u8> {
        let out = VERSION.to_le_bytes().to_vec();
        // Serializing into a Vec cannot fail for these types.
        match postcard::to_extend(self, out) {
            Ok(out) => out,
            Err(e) => unreachable!("postcard into a Vec: {e}"),
        }
    }

    /// Reads a frame, checking the version first.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        if bytes.len() > MAX_FRAME {
            return Err(ProtocolError::Malformed(format!(
                "{} bytes exceed the limit of {MAX_FRAME}",
                bytes.len()
            )));
        }
        let (version, body) = match bytes {
            [a, b, body @ ..] => (u16::from_le_bytes([*a, *b]), body),
            _ => return Err(ProtocolError::Malformed("shorter than its version".into())),
        };
        if version != VERSION {
            return Err(ProtocolError::Version(version));
        }
        postcard::from_bytes(body).map_err(|e| ProtocolError::Malformed(e.to_string()))
    }
}

/// `f32` values as little-endian bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian bytes as `f32` values.
pub fn bytes_f32(bytes: &[u8]) -> Result<Vec<f32>, ProtocolError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(ProtocolError::Malformed(format!(
            "{} bytes are not a whole number of f32",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step() -> Frame {
        Frame::Step(Step {
            plan: 7,
            entry: "a".into(),
            step: 3,
            rows: vec![Row {
                seq: 1,
                position: 0,
                len: 2,
                logits: true,
                sample: Some(Sampler {
                    temperature: 0.7,
                    top_k: 40,
                    top_p: 0.9,
                    seed: 5,
                }),
            }],
            payload: Payload::Hidden(f32_bytes(&[1.5, -0.0, f32::MIN_POSITIVE, 3.0e7])),
        })
    }

    #[test]
    fn frames_round_trip_bit_for_bit() {
        for frame in [
            step(),
            Frame::Answer {
                step: 3,
                values: f32_bytes(&[0.25; 5]),
                tokens: vec![17],
            },
            Frame::Failed {
                step: 9,
                reason: "plan".into(),
            },
            Frame::Release {
                entry: "b".into(),
                seqs: vec![1, 2],
            },
        ] {
            assert_eq!(Frame::decode(&frame.encode()).unwrap(), frame);
        }
        let values = [1.5f32, -0.0, f32::MIN_POSITIVE, f32::NAN];
        let back = bytes_f32(&f32_bytes(&values)).unwrap();
        assert!(values
            .iter()
            .zip(&back)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn another_version_and_garbage_are_refused() {
        let mut bytes = step().encode();
        bytes[0] = 1;
        assert!(matches!(
            Frame::decode(&bytes),
            Err(ProtocolError::Version(1))
        ));
        assert!(matches!(
            Frame::decode(&[1]),
            Err(ProtocolError::Malformed(_))
        ));
        let mut garbage = VERSION.to_le_bytes().to_vec();
        garbage.extend([0xff; 32]);
        assert!(matches!(
            Frame::decode(&garbage),
            Err(ProtocolError::Malformed(_))
        ));
        let truncated = &step().encode()[..20];
        assert!(matches!(
            Frame::decode(truncated),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(bytes_f32(&[0; 5]).is_err());
    }
}
