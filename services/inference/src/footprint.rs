//! What a stage of a model holds in memory, by part, without loading it: the
//! numbers a ring plans with.

use std::path::Path;

use crate::error::InferenceError;
use crate::weights::{Name, Weights};

/// Bytes a [`crate::Stage`] holds for each part of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Decoder layers.
    pub layers: usize,
    /// Weights of the largest decoder layer.
    pub layer_bytes: u64,
    /// The embedding table (first stage only; held as f32).
    pub embed_bytes: u64,
    /// The final norm and the output head (last stage only; a tied head is a
    /// second, quantized copy of the embedding).
    pub head_bytes: u64,
    /// KV cache for one position of one layer (keys and values, f32).
    pub kv_bytes_per_position: u64,
}

impl Footprint {
    /// Reads the sizes from a model's metadata (a GGUF file or a safetensors
    /// directory); no tensor data is read.
    pub fn of(path: &Path) -> Result<Self, InferenceError> {
        let (weights, config, _) = Weights::open(path)?;
        let held = |name: Name, as_f32: bool| {
            weights
                .held_bytes(name, as_f32)
                .ok_or_else(|| InferenceError::Model(format!("tensor {name:?} is missing")))
        };
        let mut layer_bytes = 0;
        for i in 0..config.layers {
            let mut bytes = held(Name::AttnNorm(i), true)? + held(Name::FfnNorm(i), true)?;
            // What only some architectures have (biases, q/k norms, post-norms).
            for name in [
                Name::QBias(i),
                Name::KBias(i),
                Name::VBias(i),
                Name::QNorm(i),
                Name::KNorm(i),
                Name::PostAttnNorm(i),
                Name::PostFfnNorm(i),
            ] {
                bytes += weights.held_bytes(name, true).unwrap_or(0);
            }
            for name in [
                Name::Q(i),
                Name::K(i),
                Name::V(i),
                Name::O(i),
                Name::Gate(i),
                Name::Up(i),
                Name::Down(i),
            ] {
                bytes += held(name, false)?;
            }
            layer_bytes = layer_bytes.max(bytes);
        }
        let output = if weights.has(Name::Output) {
            Name::Output
        } else {
            Name::Embed
        };
        let head_dim = config.hidden / config.heads;
        Ok(Self {
            layers: config.layers,
            layer_bytes,
            embed_bytes: held(Name::Embed, true)?,
            head_bytes: held(Name::Norm, true)? + held(output, false)?,
            kv_bytes_per_position: 2 * (config.kv_heads * head_dim) as u64 * 4,
        })
    }
}

impl crate::ModelConfig {
    /// Reads a model's configuration (a GGUF file or a safetensors
    /// directory); no tensor data is read.
    pub fn of(path: &Path) -> Result<Self, InferenceError> {
        Ok(Weights::open(path)?.1)
    }
}
