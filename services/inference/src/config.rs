//! A model's architecture and hyper-parameters, from GGUF metadata.

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::InferenceError;

/// The transformer families the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM, Mistral (GGUF `llama`): RoPE on adjacent pairs.
    Llama,
    /// Qwen 2 / 2.5: biases on q, k and v.
    Qwen2,
    /// Qwen 3: RMSNorm on each head of q and k.
    Qwen3,
    /// Gemma 3: q/k norms, norms after attention and MLP, GELU, scaled
    /// embedding, sliding-window layers with their own RoPE base.
    Gemma3,
}

impl Arch {
    /// The architecture named by `general.architecture`; `None` if unsupported.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    /// The GGUF name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// The names `general.architecture` may hold.
    pub const SUPPORTED: &'static str = "llama, qwen2, qwen3, gemma3";
}

/// The most positions a sequence may hold, whatever a model's metadata
/// claims (128 Ki: Llama 3.1's window). The RoPE tables are sized by it, so
/// a file claiming 2^40 positions cannot size an allocation.
pub const MAX_CONTEXT: usize = 1 << 17;

/// The largest attention head accepted (real models use 64 to 256); it
/// sizes the RoPE tables too.
pub const MAX_HEAD_DIM: usize = 1024;

/// The architecture numbers of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The transformer family.
    pub arch: Arch,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Size of one attention head (`hidden / heads` unless the file says otherwise).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base frequency (of the global-attention layers).
    pub rope_base: f32,
    /// RoPE base of the sliding-window layers (Gemma 3: 10 000).
    pub rope_base_local: f32,
    /// Linear RoPE scaling factor of the global layers (1 if none).
    pub rope_scale: f32,
    /// Sliding attention window, if the model has one.
    pub sliding_window: Option<usize>,
    /// With a window: every `n`-th layer (`layer % n == n - 1`) attends
    /// globally; 1 means every layer slides (Mistral).
    pub swa_pattern: usize,
    /// Longest sequence served: what the model was trained for, at most
    /// [`MAX_CONTEXT`].
    pub context: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata; an unknown architecture is
    /// refused by name.
    pub fn from_gguf(content: &Content) -> Result<Self, InferenceError> {
        let name = match content.metadata.get("general.architecture") {
            Some(v) => v.to_string().map_err(InferenceError::Tensor)?.clone(),
            None => return Err(InferenceError::Model("no general.architecture".into())),
        };
        let arch = Arch::from_name(&name).ok_or_else(|| {
            InferenceError::Model(format!(
                "architecture {name:?} is not supported (supported: {})",
                Arch::SUPPORTED
            ))
        })?;
        let meta = |key: &str| content.metadata.get(&format!("{name}.{key}"));
        let int = |key: &str| -> Result<usize, InferenceError> {
            meta(key)
                .and_then(int_value)
                .ok_or_else(|| InferenceError::Model(format!("missing or bad {name}.{key}")))
        };
        let float = |key: &str, default: f32| meta(key).and_then(float_value).unwrap_or(default);
        let heads = int("attention.head_count")?;
        let hidden = int("embedding_length")?;
        let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(InferenceError::Model(format!(
                "inconsistent shape: heads {heads}, kv heads {kv_heads}"
            )));
        }
        let head_dim = match int("attention.key_length") {
            Ok(d) => d,
            Err(_) if hidden.is_multiple_of(heads) => hidden / heads,
            Err(_) => {
                return Err(InferenceError::Model(format!(
                    "inconsistent shape: hidden {hidden}, heads {heads}"
                )))
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
            return Err(InferenceError::Model(format!("bad head size {head_dim}")));
        }
        let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => return Err(InferenceError::Model("no tokenizer.ggml.tokens".into())),
        };
        let sliding_window = int("attention.sliding_window").ok().filter(|&w| w > 0);
        let linear = meta("rope.scaling.type")
            .and_then(|v| v.to_string().ok())
            .is_some_and(|t| t == "linear");
        let rope_scale = if linear {
            float("rope.scaling.factor", 1.0)
        } else {
            1.0
        };
        let context = int("context_length").unwrap_or(2048).min(MAX_CONTEXT);
        // Every layer has tensors of its own: a count beyond the tensor
        // table's is a lie (and would size allocations from it).
        let layers = int("block_count")?;
        if layers == 0 || layers > content.tensor_infos.len() {
            return Err(InferenceError::Model(format!(
                "block_count {layers} does not fit the file's {} tensors",
                content.tensor_infos.len()
            )));
        }
        Ok(Self {
            arch,
            layers,
            heads,
            kv_heads,
            hidden,
            head_dim,
            eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base: float("rope.freq_base", 10_000.0),
            rope_base_local: if arch == Arch::Gemma3 {
                10_000.0
            } else {
                float("rope.freq_base", 10_000.0)
            },
            rope_scale: if rope_scale > 0.0 { rope_scale } else { 1.0 },
            sliding_window,
            swa_pattern: if arch == Arch::Gemma3 { 6 } else { 1 },
            context,
            vocab,
        })
    }

    /// The attention window of layer `i`, if it slides.
    pub fn window(&self, i: usize) -> Option<usize> {
        let w = self.sliding_window?;
        (self.swa_pattern <= 1 || i % self.swa_pattern != self.swa_pattern - 1).then_some(w)
    }
}

fn int_value(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(usize::from(*x)),
        Value::U16(x) => Some(usize::from(*x)),
        Value::U32(x) => usize::try_from(*x).ok(),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

fn float_value(v: &Value) -> Option<f32> {
    match v {
        Value::F32(x) => Some(*x),
        Value::F64(x) => Some(*x as f32),
        _ => None,
    }
}
