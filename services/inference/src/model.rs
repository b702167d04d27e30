//! The transformer, by layer range: embedding, decoder layers, head.
//! One code path for every supported architecture; what differs (biases,
//! q/k norms, extra norms, activation, windows, RoPE) comes from [`Arch`]
//! and the tensors the file holds.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::error::InferenceError;
use crate::linear::{Fused, Linear};
use crate::weights::{Name, Weights};

struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// q, k and v.
    qkv: Fused,
    /// Biases of q, k and v (Qwen 2).
    qkv_bias: Option<[Tensor; 3]>,
    /// RMSNorm weights over each head of q and k (Qwen 3, Gemma 3).
    qk_norm: Option<(Tensor, Tensor)>,
    o: Linear,
    /// Norms of the attention and MLP outputs (Gemma 3).
    post_norms: Option<(Tensor, Tensor)>,
    /// gate and up.
    gate_up: Fused,
    down: Linear,
    /// The attention window of this layer, if it slides.
    window: Option<usize>,
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
    /// RoPE cos/sin tables of the global layers.
    rope_global: (Tensor, Tensor),
    /// RoPE cos/sin tables of the sliding-window layers.
    rope_local: (Tensor, Tensor),
    /// RoPE on adjacent pairs (GGUF Llama) rather than on halves.
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
            let qkv_bias = match config.arch {
                Arch::Qwen2 => Some([
                    weights.tensor(Name::QBias(i))?,
                    weights.tensor(Name::KBias(i))?,
                    weights.tensor(Name::VBias(i))?,
                ]),
                _ => None,
            };
            let qk_norm = match config.arch {
                Arch::Qwen3 | Arch::Gemma3 => Some((
                    weights.tensor(Name::QNorm(i))?,
                    weights.tensor(Name::KNorm(i))?,
                )),
                _ => None,
            };
            let post_norms = match config.arch {
                Arch::Gemma3 => Some((
                    weights.tensor(Name::PostAttnNorm(i))?,
                    weights.tensor(Name::PostFfnNorm(i))?,
                )),
                _ => None,
            };
            layers.push(Layer {
                attn_norm: weights.tensor(Name::AttnNorm(i))?,
                ffn_norm: weights.tensor(Name::FfnNorm(i))?,
                qkv: Fused::new(vec![
                    weights.linear(Name::Q(i))?,
                    weights.linear(Name::K(i))?,
                    weights.linear(Name::V(i))?,
                ]),
                qkv_bias,
                qk_norm,
                o: weights.linear(Name::O(i))?,
                post_norms,
                gate_up: Fused::new(vec![
                    weights.linear(Name::Gate(i))?,
                    weights.linear(Name::Up(i))?,
                ]),
                down: weights.linear(Name::Down(i))?,
                window: config.window(i),
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
        let freqs = weights.optional(Name::RopeFreqs)?;
        let freqs = freqs.map(|f| f.to_vec1::<f32>()).transpose()?;
        let rope_global = rope_tables(
            &config,
            config.rope_base,
            config.rope_scale,
            freqs.as_deref(),
        )?;
        let rope_local = if config.sliding_window.is_some()
            && (config.rope_base_local != config.rope_base || config.rope_scale != 1.0)
        {
            rope_tables(&config, config.rope_base_local, 1.0, freqs.as_deref())?
        } else {
            rope_global.clone()
        };
        Ok(Self {
            config,
            range,
            embed,
            layers,
            norm,
            head,
            rope_global,
            rope_local,
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

    /// How many of this stage's matrices each code path multiplies
    /// (`"Q4_K kernel"`, `"Q5_0 candle"`, ...).
    pub fn matrix_paths(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        let mut add = |p: String| *out.entry(p).or_insert(0) += 1;
        for layer in &self.layers {
            layer.qkv.paths().into_iter().for_each(&mut add);
            add(layer.o.path());
            layer.gate_up.paths().into_iter().for_each(&mut add);
            add(layer.down.path());
        }
        if let Some(head) = &self.head {
            add(head.path());
        }
        out
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
        let x = embed.index_select(&ids, 0)?;
        if self.config.arch == Arch::Gemma3 {
            return Ok((x * (self.config.hidden as f64).sqrt())?);
        }
        Ok(x)
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
        let seq = hidden.dim(0)?;
        Ok(self.head_rows(&hidden.narrow(0, seq - 1, 1)?)?.squeeze(0)?)
    }

    /// Final norm and output projection of every position of `hidden`
    /// (`[tokens, hidden]`): logits `[tokens, vocab]` (last stage only).
    pub fn head_rows(&self, hidden: &Tensor) -> Result<Tensor, InferenceError> {
        let (norm, head) = match (&self.norm, &self.head) {
            (Some(n), Some(h)) => (n, h),
            _ => {
                return Err(InferenceError::Request(
                    "this stage does not hold the head".into(),
                ))
            }
        };
        let x = candle_nn::ops::rms_norm(&hidden.contiguous()?, norm, self.config.eps)?;
        Ok(head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// The final norm of every position (`[tokens, hidden]`), the hidden
    /// states that embeddings pool (last stage only).
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor, InferenceError> {
        let norm = self.norm.as_ref().ok_or_else(|| {
            InferenceError::Request("this stage does not hold the final norm".into())
        })?;
        Ok(candle_nn::ops::rms_norm(hidden, norm, self.config.eps)?.to_dtype(DType::F32)?)
    }

    fn layer(
        &self,
        layer: &Layer,
        x: Tensor,
        slot: &mut Option<(Tensor, Tensor)>,
        pos: usize,
    ) -> Result<Tensor, InferenceError> {
        let c = &self.config;
        let (seq, hd, nh, nkv) = (x.dim(0)?, c.head_dim, c.heads, c.kv_heads);
        let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.eps)?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((seq, n, hd))?.transpose(0, 1)?.contiguous()
        };
        let mut qkv = layer.qkv.forward(&h)?.into_iter();
        let mut next = || {
            qkv.next()
                .ok_or_else(|| InferenceError::Model("q/k/v projection missing".into()))
        };
        let (mut q, mut k, mut v) = (next()?, next()?, next()?);
        if let Some([qb, kb, vb]) = &layer.qkv_bias {
            q = q.broadcast_add(qb)?;
            k = k.broadcast_add(kb)?;
            v = v.broadcast_add(vb)?;
        }
        let (mut q, mut k) = (heads(q.contiguous()?, nh)?, heads(k.contiguous()?, nkv)?);
        if let Some((qn, kn)) = &layer.qk_norm {
            q = candle_nn::ops::rms_norm(&q, qn, c.eps)?;
            k = candle_nn::ops::rms_norm(&k, kn, c.eps)?;
        }
        let rope = if layer.window.is_some() {
            &self.rope_local
        } else {
            &self.rope_global
        };
        let q = self.rope(&q, pos, rope)?;
        let k = self.rope(&k, pos, rope)?;
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
        // Causal, and inside the window: query at p sees keys in (p - w, p].
        let window = layer.window.unwrap_or(usize::MAX);
        if seq > 1 || total > window {
            let mask: Vec<f32> = (0..seq)
                .flat_map(|i| {
                    let p = pos + i;
                    (0..total).map(move |j| {
                        if j > p || p - j >= window {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            att = att.broadcast_add(&Tensor::from_vec(mask, (1, seq, total), &Device::Cpu)?)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v)?.transpose(0, 1)?.reshape((seq, nh * hd))?;
        let mut o = layer.o.forward(&o)?;
        if let Some((post_attn, _)) = &layer.post_norms {
            o = candle_nn::ops::rms_norm(&o, post_attn, c.eps)?;
        }
        let x = (x + o)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.eps)?;
        let gate_up = layer.gate_up.forward(&h)?;
        let (gate, up) = match gate_up.as_slice() {
            [gate, up] => (gate, up),
            _ => return Err(InferenceError::Model("gate/up projection missing".into())),
        };
        let act = match c.arch {
            Arch::Gemma3 => gate.gelu()?,
            _ => gate.silu()?,
        };
        let mut m = layer.down.forward(&(act * up)?)?;
        if let Some((_, post_ffn)) = &layer.post_norms {
            m = candle_nn::ops::rms_norm(&m, post_ffn, c.eps)?;
        }
        Ok((x + m)?)
    }

    /// RoPE, `x`: `[heads, seq, head_dim]`, with the tables `rope`.
    fn rope(
        &self,
        x: &Tensor,
        pos: usize,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor, InferenceError> {
        let seq = x.dim(1)?;
        let cos = rope.0.narrow(0, pos, seq)?;
        let sin = rope.1.narrow(0, pos, seq)?;
        let x = x.unsqueeze(0)?;
        let rotated = if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?
        };
        Ok(rotated.squeeze(0)?)
    }
}

/// cos/sin of `p / scale * base^(-2i / head_dim) / freqs[i]` for every
/// position `p` of the context and `i < head_dim / 2`.
fn rope_tables(
    config: &ModelConfig,
    base: f32,
    scale: f32,
    freqs: Option<&[f32]>,
) -> Result<(Tensor, Tensor), InferenceError> {
    let half = config.head_dim / 2;
    if freqs.is_some_and(|f| f.len() != half) {
        return Err(InferenceError::Model(format!(
            "rope_freqs has the wrong length for head size {}",
            config.head_dim
        )));
    }
    let inv: Vec<f32> = (0..half)
        .map(|i| {
            let f = base.powf(-2.0 * i as f32 / config.head_dim as f32) / scale;
            f / freqs.map_or(1.0, |fr| fr[i])
        })
        .collect();
    let mut cos = Vec::with_capacity(config.context * half);
    let mut sin = Vec::with_capacity(config.context * half);
    for p in 0..config.context {
        for &f in &inv {
            let theta = p as f32 * f;
            cos.push(theta.cos());
            sin.push(theta.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (config.context, half), &Device::Cpu)?,
        Tensor::from_vec(sin, (config.context, half), &Device::Cpu)?,
    ))
}
