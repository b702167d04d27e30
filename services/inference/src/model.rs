//! The transformer, by layer range: embedding, decoder layers, head.

use std::ops::Range;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use crate::error::InferenceError;
use crate::linear::{Fused, Linear};
use crate::weights::{Name, Weights};

/// The architecture numbers of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Hidden size.
    pub hidden: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// Longest sequence the model was trained for.
    pub context: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, InferenceError> {
        let arch = match content.metadata.get("general.architecture") {
            Some(v) => v.to_string().map_err(InferenceError::Tensor)?.clone(),
            None => return Err(InferenceError::Model("no general.architecture".into())),
        };
        if arch != "llama" {
            return Err(InferenceError::Model(format!(
                "architecture {arch:?} is not llama"
            )));
        }
        let int = |key: &str| -> Result<usize, InferenceError> {
            content
                .metadata
                .get(key)
                .and_then(|v| {
                    v.to_u32()
                        .ok()
                        .or_else(|| v.to_u64().ok().map(|x| x as u32))
                })
                .map(|v| v as usize)
                .ok_or_else(|| InferenceError::Model(format!("missing or bad {key}")))
        };
        let float = |key: &str, default: f32| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(default)
        };
        let heads = int("llama.attention.head_count")?;
        let hidden = int("llama.embedding_length")?;
        let kv_heads = int("llama.attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(InferenceError::Model(format!(
                "inconsistent shape: hidden {hidden}, heads {heads}, kv heads {kv_heads}"
            )));
        }
        let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(tokens)) => tokens.len(),
            _ => return Err(InferenceError::Model("no tokenizer.ggml.tokens".into())),
        };
        Ok(Self {
            layers: int("llama.block_count")?,
            heads,
            kv_heads,
            hidden,
            eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_base: float("llama.rope.freq_base", 10_000.0),
            context: int("llama.context_length").unwrap_or(2048),
            vocab,
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// q, k and v.
    qkv: Fused,
    o: Linear,
    /// gate and up.
    gate_up: Fused,
    down: Linear,
}

/// The key/value cache of one request for one stage's layers.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(1).ok())
            .unwrap_or(0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * 4)
            .sum()
    }
}

/// A contiguous range of a model's layers, with the embedding if it starts at
/// layer 0 and the final norm and head if it ends at the last layer.
pub struct Stage {
    config: ModelConfig,
    range: Range<usize>,
    embed: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Option<Tensor>,
    head: Option<Linear>,
    cos: Tensor,
    sin: Tensor,
    /// RoPE on adjacent pairs (GGUF) rather than on halves (Hugging Face).
    interleaved: bool,
}

impl Stage {
    /// Loads layers `range` of the model at `path` (a GGUF file or a
    /// safetensors model directory); only their tensors are read.
    pub fn load(path: &Path, range: Range<usize>) -> Result<Self, InferenceError> {
        let (mut weights, config, interleaved) = Weights::open(path)?;
        if range.start >= range.end || range.end > config.layers {
            return Err(InferenceError::Request(format!(
                "layer range {}..{} is not within 0..{}",
                range.start, range.end, config.layers
            )));
        }
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            layers.push(Layer {
                attn_norm: weights.tensor(Name::AttnNorm(i))?,
                ffn_norm: weights.tensor(Name::FfnNorm(i))?,
                qkv: Fused::new(vec![
                    weights.linear(Name::Q(i))?,
                    weights.linear(Name::K(i))?,
                    weights.linear(Name::V(i))?,
                ]),
                o: weights.linear(Name::O(i))?,
                gate_up: Fused::new(vec![
                    weights.linear(Name::Gate(i))?,
                    weights.linear(Name::Up(i))?,
                ]),
                down: weights.linear(Name::Down(i))?,
            });
        }
        let embed = if range.start == 0 {
            Some(weights.tensor(Name::Embed)?)
        } else {
            None
        };
        let (norm, head) = if range.end == config.layers {
            // Tied embeddings: without an output matrix the head is the embedding.
            let head = if weights.has(Name::Output) {
                weights.linear(Name::Output)?
            } else {
                weights.linear(Name::Embed)?
            };
            (Some(weights.tensor(Name::Norm)?), Some(head))
        } else {
            (None, None)
        };
        let (cos, sin) = rope_tables(&config, &Device::Cpu)?;
        Ok(Self {
            config,
            range,
            embed,
            layers,
            norm,
            head,
            cos,
            sin,
            interleaved,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The layers this stage runs.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// An empty cache for this stage's layers.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.layers.len()).map(|_| None).collect(),
        }
    }

    /// Tokens to hidden states `[tokens, hidden]` (first stage only).
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, InferenceError> {
        let embed = self.embed.as_ref().ok_or_else(|| {
            InferenceError::Request("this stage does not hold the embedding".into())
        })?;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(InferenceError::Request(format!(
                "token {bad} is outside the vocabulary"
            )));
        }
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        Ok(embed.index_select(&ids, 0)?)
    }

    /// Runs this stage's layers on `hidden` (`[tokens, hidden]`) at the
    /// positions after those already in `cache`, extending the cache.
    pub fn run_layers(
        &self,
        hidden: Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor, InferenceError> {
        let pos = cache.len();
        let seq = hidden.dim(0)?;
        if pos + seq > self.config.context {
            return Err(InferenceError::Request(format!(
                "{} positions exceed the model's context of {}",
                pos + seq,
                self.config.context
            )));
        }
        let mut x = hidden;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = self.layer(layer, x, slot, pos)?;
        }
        Ok(x)
    }

    /// Final norm and output projection of the last position: logits `[vocab]` (last stage only).
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor, InferenceError> {
        let (norm, head) = match (&self.norm, &self.head) {
            (Some(n), Some(h)) => (n, h),
            _ => {
                return Err(InferenceError::Request(
                    "this stage does not hold the head".into(),
                ))
            }
        };
        let seq = hidden.dim(0)?;
        let last = candle_nn::ops::rms_norm(&hidden.narrow(0, seq - 1, 1)?, norm, self.config.eps)?;
        Ok(head.forward(&last)?.squeeze(0)?.to_dtype(DType::F32)?)
    }

    fn layer(
        &self,
        layer: &Layer,
        x: Tensor,
        slot: &mut Option<(Tensor, Tensor)>,
        pos: usize,
    ) -> Result<Tensor, InferenceError> {
        let c = &self.config;
        let (seq, hd, nh, nkv) = (x.dim(0)?, c.head_dim(), c.heads, c.kv_heads);
        let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.eps)?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((seq, n, hd))?.transpose(0, 1)?.contiguous()
        };
        let mut qkv = layer.qkv.forward(&h)?.into_iter();
        let mut next = || {
            qkv.next()
                .ok_or_else(|| InferenceError::Model("q/k/v projection missing".into()))
        };
        let (q, k, v) = (next()?, next()?, next()?);
        let q = self.rope(&heads(q.contiguous()?, nh)?, pos)?;
        let k = self.rope(&heads(k.contiguous()?, nkv)?, pos)?;
        let v = heads(v.contiguous()?, nkv)?;
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        let total = k.dim(1)?;
        let group = nh / nkv;
        let expand = |t: Tensor| -> candle_core::Result<Tensor> {
            t.unsqueeze(1)?
                .broadcast_as((nkv, group, total, hd))?
                .reshape((nh, total, hd))
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let mut att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        if seq > 1 {
            let mask: Vec<f32> = (0..seq)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            att = att.broadcast_add(&Tensor::from_vec(mask, (1, seq, total), &Device::Cpu)?)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v)?.transpose(0, 1)?.reshape((seq, nh * hd))?;
        let x = (x + layer.o.forward(&o)?)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.eps)?;
        let gate_up = layer.gate_up.forward(&h)?;
        let (gate, up) = match gate_up.as_slice() {
            [gate, up] => (gate, up),
            _ => return Err(InferenceError::Model("gate/up projection missing".into())),
        };
        let m = (gate.silu()? * up)?;
        Ok((x + layer.down.forward(&m)?)?)
    }

    /// RoPE, `x`: `[heads, seq, head_dim]`.
    fn rope(&self, x: &Tensor, pos: usize) -> Result<Tensor, InferenceError> {
        let seq = x.dim(1)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let x = x.unsqueeze(0)?;
        let rotated = if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?
        };
        Ok(rotated.squeeze(0)?)
    }
}

fn rope_tables(config: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor), InferenceError> {
    let half = config.head_dim() / 2;
    let mut cos = Vec::with_capacity(config.context * half);
    let mut sin = Vec::with_capacity(config.context * half);
    for p in 0..config.context {
        for i in 0..half {
            let theta = p as f32
                * config
                    .rope_base
                    .powf(-2.0 * i as f32 / config.head_dim() as f32);
            cos.push(theta.cos());
            sin.push(theta.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (config.context, half), device)?,
        Tensor::from_vec(sin, (config.context, half), device)?,
    ))
}
