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
use crate::forward;
use crate::linear::{Fused, Linear};
use crate::weights::{Name, Weights};

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// q, k and v.
    qkv: Fused,
    /// Biases of q, k and v one after another (Qwen 2).
    qkv_bias: Option<Vec<f32>>,
    /// RMSNorm weights over each head of q and k (Qwen 3, Gemma 3).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    o: Linear,
    /// Norms of the attention and MLP outputs (Gemma 3).
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
    /// gate and up.
    gate_up: Fused,
    down: Linear,
    /// The attention window of this layer, if it slides.
    window: Option<usize>,
}

/// The keys and values of one layer: one row of `kv_heads * head_dim` per position.
#[derive(Clone, Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The key/value cache of one sequence for one stage's layers.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// Values per position and layer, for keys (and again for values).
    width: usize,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cached positions.
    pub fn bytes(&self) -> usize {
        self.len * self.layers.len() * 2 * self.width * 4
    }

    /// Forgets the positions from `len` on (nothing if it holds fewer).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for layer in &mut self.layers {
                layer.k.truncate(len * self.width);
                layer.v.truncate(len * self.width);
            }
            self.len = len;
        }
    }

    /// A copy of the first `len` positions (all of them if it holds fewer).
    pub fn prefix(&self, len: usize) -> KvCache {
        let len = len.min(self.len);
        let cut = len * self.width;
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerKv {
                    k: l.k[..cut].to_vec(),
                    v: l.v[..cut].to_vec(),
                })
                .collect(),
            width: self.width,
            len,
        }
    }
}

/// One sequence's rows in a batch: the next `len` rows of the hidden states,
/// at the positions after those already in `cache`.
pub struct Chunk<'a> {
    /// The sequence's cache for this stage's layers; extended by `len` positions.
    pub cache: &'a mut KvCache,
    /// Rows of the batch that belong to it.
    pub len: usize,
}

/// A contiguous range of a model's layers, with the embedding if it starts at
/// layer 0 and the final norm and head if it ends at the last layer.
pub struct Stage {
    config: ModelConfig,
    range: Range<usize>,
    embed: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Option<Vec<f32>>,
    head: Option<Linear>,
    /// RoPE cos/sin tables (`[context, head_dim / 2]`) of the global layers.
    rope_global: (Vec<f32>, Vec<f32>),
    /// RoPE cos/sin tables of the sliding-window layers.
    rope_local: (Vec<f32>, Vec<f32>),
    /// RoPE on adjacent pairs (GGUF Llama) rather than on halves.
    interleaved: bool,
}

fn vector(t: Tensor) -> Result<Vec<f32>, InferenceError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
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
                Arch::Qwen2 => {
                    let mut all = vector(weights.tensor(Name::QBias(i))?)?;
                    all.extend(vector(weights.tensor(Name::KBias(i))?)?);
                    all.extend(vector(weights.tensor(Name::VBias(i))?)?);
                    Some(all)
                }
                _ => None,
            };
            let qk_norm = match config.arch {
                Arch::Qwen3 | Arch::Gemma3 => Some((
                    vector(weights.tensor(Name::QNorm(i))?)?,
                    vector(weights.tensor(Name::KNorm(i))?)?,
                )),
                _ => None,
            };
            let post_norms = match config.arch {
                Arch::Gemma3 => Some((
                    vector(weights.tensor(Name::PostAttnNorm(i))?)?,
                    vector(weights.tensor(Name::PostFfnNorm(i))?)?,
                )),
                _ => None,
            };
            layers.push(Layer {
                attn_norm: vector(weights.tensor(Name::AttnNorm(i))?)?,
                ffn_norm: vector(weights.tensor(Name::FfnNorm(i))?)?,
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
            Some(weights.tensor(Name::Embed)?.to_dtype(DType::F32)?)
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
            (Some(vector(weights.tensor(Name::Norm)?)?), Some(head))
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
            layers: vec![LayerKv::default(); self.layers.len()],
            width: self.config.kv_heads * self.config.head_dim,
            len: 0,
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
        let len = hidden.dim(0)?;
        self.run_batch(hidden, &mut [Chunk { cache, len }])
    }

    /// Runs this stage's layers on a batch: `hidden` (`[rows, hidden]`) holds
    /// the rows of every chunk one after another. Each row's result depends
    /// only on its own sequence (its cache and the rows before it in its
    /// chunk), never on the other chunks or on how a sequence was split into
    /// chunks.
    pub fn run_batch(
        &self,
        hidden: Tensor,
        chunks: &mut [Chunk<'_>],
    ) -> Result<Tensor, InferenceError> {
        let c = &self.config;
        let rows = hidden.dim(0)?;
        if hidden.dims() != [rows, c.hidden] {
            return Err(InferenceError::Request(format!(
                "hidden states of shape {:?}, expected [rows, {}]",
                hidden.dims(),
                c.hidden
            )));
        }
        if chunks.iter().map(|ch| ch.len).sum::<usize>() != rows {
            return Err(InferenceError::Request(format!(
                "the chunks cover {} rows of {rows}",
                chunks.iter().map(|ch| ch.len).sum::<usize>()
            )));
        }
        for ch in chunks.iter() {
            if ch.cache.len + ch.len > c.context {
                return Err(InferenceError::Request(format!(
                    "{} positions exceed the model's context of {}",
                    ch.cache.len + ch.len,
                    c.context
                )));
            }
            if ch.cache.layers.len() != self.layers.len() {
                return Err(InferenceError::Request(
                    "a cache made for another stage".into(),
                ));
            }
        }
        let mut x = hidden
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut scratch = Scratch::default();
        for (li, layer) in self.layers.iter().enumerate() {
            self.layer(li, layer, &mut x, chunks, &mut scratch)?;
        }
        for ch in chunks.iter_mut() {
            ch.cache.len += ch.len;
        }
        Ok(Tensor::from_vec(x, (rows, c.hidden), &Device::Cpu)?)
    }

    /// Final norm and output projection of the last row: logits `[vocab]` (last stage only).
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor, InferenceError> {
        let rows = hidden.dim(0)?;
        if rows == 0 {
            return Err(InferenceError::Request("no hidden state".into()));
        }
        let mut logits = Vec::new();
        self.head_logits(hidden, &[rows - 1], &mut logits)?;
        let n = logits.len();
        Ok(Tensor::from_vec(logits, n, &Device::Cpu)?)
    }

    /// Final norm and output projection of every position of `hidden`
    /// (`[tokens, hidden]`): logits `[tokens, vocab]` (last stage only).
    pub fn head_rows(&self, hidden: &Tensor) -> Result<Tensor, InferenceError> {
        let rows = hidden.dim(0)?;
        let all: Vec<usize> = (0..rows).collect();
        let mut logits = Vec::new();
        self.head_logits(hidden, &all, &mut logits)?;
        let n = logits.len() / rows.max(1);
        Ok(Tensor::from_vec(logits, (rows, n), &Device::Cpu)?)
    }

    /// Final norm and output projection of `rows` of `hidden`: `logits` holds
    /// one row of `vocab` values per entry of `rows` (last stage only).
    pub fn head_logits(
        &self,
        hidden: &Tensor,
        rows: &[usize],
        logits: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        let (norm, head) = match (&self.norm, &self.head) {
            (Some(n), Some(h)) => (n, h),
            _ => {
                return Err(InferenceError::Request(
                    "this stage does not hold the head".into(),
                ))
            }
        };
        let k = self.config.hidden;
        let all = hidden.dim(0)?;
        if let Some(bad) = rows.iter().find(|&&r| r >= all) {
            return Err(InferenceError::Request(format!(
                "row {bad} of {all} hidden states"
            )));
        }
        let x = hidden
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut picked = Vec::with_capacity(rows.len() * k);
        for &r in rows {
            picked.extend_from_slice(&x[r * k..(r + 1) * k]);
        }
        let mut normed = vec![0f32; picked.len()];
        forward::rms_norm(&picked, norm, self.config.eps, &mut normed);
        let n = head.n()?;
        logits.clear();
        logits.resize(rows.len() * n, 0.0);
        head.forward_rows(&normed, rows.len(), logits)?;
        Ok(())
    }

    /// The final norm of every position (`[tokens, hidden]`), the hidden
    /// states that embeddings pool (last stage only).
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor, InferenceError> {
        let norm = self.norm.as_ref().ok_or_else(|| {
            InferenceError::Request("this stage does not hold the final norm".into())
        })?;
        let x = hidden
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut out = vec![0f32; x.len()];
        forward::rms_norm(&x, norm, self.config.eps, &mut out);
        Ok(Tensor::from_vec(out, hidden.dims(), &Device::Cpu)?)
    }

    fn layer(
        &self,
        li: usize,
        layer: &Layer,
        x: &mut [f32],
        chunks: &mut [Chunk<'_>],
        s: &mut Scratch,
    ) -> Result<(), InferenceError> {
        let c = &self.config;
        let (hd, nh, nkv) = (c.head_dim, c.heads, c.kv_heads);
        let (q_n, kv_n) = (nh * hd, nkv * hd);
        let rows = x.len() / c.hidden;
        let half = hd / 2;
        let (cos_table, sin_table) = if layer.window.is_some() {
            (&self.rope_local.0, &self.rope_local.1)
        } else {
            (&self.rope_global.0, &self.rope_global.1)
        };
        // Attention block.
        s.h.resize(x.len(), 0.0);
        forward::rms_norm(x, &layer.attn_norm, c.eps, &mut s.h);
        let qkv_n = q_n + 2 * kv_n;
        s.qkv.resize(rows * qkv_n, 0.0);
        layer
            .qkv
            .forward_rows(&s.h, rows, &mut s.qkv, &mut s.parts)?;
        let mut row = 0;
        for ch in chunks.iter_mut() {
            let cache = &mut ch.cache.layers[li];
            for i in 0..ch.len {
                let pos = ch.cache.len + i;
                let table = pos * half..(pos + 1) * half;
                let (cos, sin) = (&cos_table[table.clone()], &sin_table[table]);
                let r = &mut s.qkv[(row + i) * qkv_n..(row + i + 1) * qkv_n];
                if let Some(bias) = &layer.qkv_bias {
                    forward::add(r, bias);
                }
                let (q, kv) = r.split_at_mut(q_n);
                let (k, v) = kv.split_at_mut(kv_n);
                if let Some((qn, kn)) = &layer.qk_norm {
                    forward::rms_norm_in_place(q, qn, c.eps);
                    forward::rms_norm_in_place(k, kn, c.eps);
                }
                forward::rope(q, hd, cos, sin, self.interleaved);
                forward::rope(k, hd, cos, sin, self.interleaved);
                cache.k.extend_from_slice(k);
                cache.v.extend_from_slice(v);
            }
            row += ch.len;
        }
        // One work item per (row, head), each with its sequence's cache.
        s.items.clear();
        for (ci, ch) in chunks.iter().enumerate() {
            for i in 0..ch.len {
                s.items.push((ci, ch.cache.len + i));
            }
        }
        let caches: Vec<&LayerKv> = chunks.iter().map(|ch| &ch.cache.layers[li]).collect();
        s.att.resize(rows * q_n, 0.0);
        let (items, qkv, group) = (&s.items, &s.qkv, nh / nkv);
        let window = layer.window.unwrap_or(usize::MAX);
        sovereign_kernels::par_chunks_mut(
            &mut s.att,
            hd,
            rows * nh * (items.last().map_or(0, |i| i.1) + 1) * hd * 2,
            |i, out| {
                let (r, head) = (i / nh, i % nh);
                let (ci, pos) = items[r];
                let q = &qkv[r * qkv_n + head * hd..r * qkv_n + (head + 1) * hd];
                let kv = caches[ci];
                // Causal, and inside the window: position p sees (p - w, p].
                let first = (pos + 1).saturating_sub(window);
                let stride = kv_n;
                SCORES.with(|scores| {
                    sovereign_kernels::attend(
                        q,
                        &kv.k[first * stride..],
                        &kv.v[first * stride..],
                        stride,
                        (head / group) * hd,
                        pos + 1 - first,
                        &mut scores.borrow_mut(),
                        out,
                    )
                });
            },
        );
        s.tmp.resize(x.len(), 0.0);
        layer.o.forward_rows(&s.att, rows, &mut s.tmp)?;
        if let Some((post_attn, _)) = &layer.post_norms {
            forward::rms_norm_in_place(&mut s.tmp, post_attn, c.eps);
        }
        forward::add(x, &s.tmp);
        // Feed-forward block.
        forward::rms_norm(x, &layer.ffn_norm, c.eps, &mut s.h);
        let gu_n = layer.gate_up.n()?;
        s.gate_up.resize(rows * gu_n, 0.0);
        layer
            .gate_up
            .forward_rows(&s.h, rows, &mut s.gate_up, &mut s.parts)?;
        s.m.resize(rows * gu_n / 2, 0.0);
        match c.arch {
            Arch::Gemma3 => forward::gelu_gate(&s.gate_up, gu_n / 2, &mut s.m),
            _ => forward::silu_gate(&s.gate_up, gu_n / 2, &mut s.m),
        }
        layer.down.forward_rows(&s.m, rows, &mut s.tmp)?;
        if let Some((_, post_ffn)) = &layer.post_norms {
            forward::rms_norm_in_place(&mut s.tmp, post_ffn, c.eps);
        }
        forward::add(x, &s.tmp);
        Ok(())
    }
}

thread_local! {
    /// Attention scores of the row and head a worker is on (reused, so decode allocates nothing).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers of one batch step, reused across its layers.
#[derive(Default)]
struct Scratch {
    h: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    gate_up: Vec<f32>,
    m: Vec<f32>,
    parts: Vec<f32>,
    /// (chunk, position) of every row.
    items: Vec<(usize, usize)>,
}

/// cos/sin of `p / scale * base^(-2i / head_dim) / freqs[i]` for every
/// position `p` of the context and `i < head_dim / 2`.
fn rope_tables(
    config: &ModelConfig,
    base: f32,
    scale: f32,
    freqs: Option<&[f32]>,
) -> Result<(Vec<f32>, Vec<f32>), InferenceError> {
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
    Ok((cos, sin))
}
