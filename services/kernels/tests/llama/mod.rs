//! A minimal Llama forward pass (greedy decode) on the demo GGUF, written
//! with candle-core ops and candle-nn's fused RMSNorm, RoPE and softmax, to check and time these kernels inside a
//! whole model: the same code runs with this crate's kernels (at a chosen
//! instruction set) or with candle's `QMatMul`. Test and benchmark harness
//! only; the product's engine is `services/inference`.

#![allow(dead_code)]

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use sovereign_kernels::{Isa, Q41MatMul, Q80MatMul};

/// Which matmul code runs the quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// This crate, with the given instruction set (q|k|v and gate|up stacked).
    Sovereign(Isa),
    /// candle's `QMatMul` for every quantized weight.
    Candle,
}

enum Lin {
    Ours(Q41MatMul),
    Candle(QMatMul),
}

impl Lin {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Lin::Ours(m) => m.forward(x),
            Lin::Candle(m) => m.forward(x),
        }
    }
}

enum Head {
    Ours(Q80MatMul),
    Candle(QMatMul),
}

struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// q|k|v stacked (ours) or q, k, v.
    qkv: Vec<Lin>,
    o: Lin,
    /// gate|up stacked (ours) or gate, up.
    gate_up: Vec<Lin>,
    down: Lin,
    /// FFN width.
    ffn: usize,
}

/// The model and its KV cache.
pub struct Llama {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Head,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    /// RoPE tables, [positions, head_dim / 2].
    cos: Tensor,
    sin: Tensor,
    cache: Vec<Option<(Tensor, Tensor)>>,
    pos: usize,
}

fn meta_u32(c: &gguf_file::Content, k: &str) -> Result<usize> {
    match c.metadata.get(k) {
        Some(v) => Ok(v.to_u32()? as usize),
        None => candle_core::bail!("GGUF has no {k}"),
    }
}

impl Llama {
    /// Loads the GGUF at `path` with the given kernels.
    pub fn load(path: &Path, kernels: Kernels) -> Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let c = gguf_file::Content::read(&mut file)?;
        let n_layers = meta_u32(&c, "llama.block_count")?;
        let heads = meta_u32(&c, "llama.attention.head_count")?;
        let kv_heads = meta_u32(&c, "llama.attention.head_count_kv")?;
        let hidden = meta_u32(&c, "llama.embedding_length")?;
        let eps = match c.metadata.get("llama.attention.layer_norm_rms_epsilon") {
            Some(v) => f64::from(v.to_f32()?),
            None => 1e-5,
        };
        let rope_base = match c.metadata.get("llama.rope.freq_base") {
            Some(v) => v.to_f32()?,
            None => 10000.0,
        };
        let dev = Device::Cpu;
        let mut get = |name: &str| c.tensor(&mut file, name, &dev);
        let lin = |t: candle_core::quantized::QTensor| -> Result<Lin> {
            match kernels {
                Kernels::Candle => Ok(Lin::Candle(QMatMul::from_qtensor(t)?)),
                Kernels::Sovereign(isa) => {
                    if t.dtype() != GgmlDType::Q4_1 {
                        candle_core::bail!("expected Q4_1, got {:?}", t.dtype());
                    }
                    match Q41MatMul::from_qtensor(&t).and_then(|m| m.with_isa(isa)) {
                        Some(m) => Ok(Lin::Ours(m)),
                        None => candle_core::bail!("Q4_1 weights not usable with {isa:?}"),
                    }
                }
            }
        };
        let stack = |parts: Vec<Lin>| -> Result<Vec<Lin>> {
            let ours: Vec<&Q41MatMul> = parts
                .iter()
                .filter_map(|p| match p {
                    Lin::Ours(m) => Some(m),
                    Lin::Candle(_) => None,
                })
                .collect();
            if ours.len() == parts.len() {
                match Q41MatMul::stack_rows(&ours) {
                    Some(m) => Ok(vec![Lin::Ours(m)]),
                    None => candle_core::bail!("cannot stack"),
                }
            } else {
                Ok(parts)
            }
        };
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("blk.{i}.");
            let qkv = vec![
                lin(get(&format!("{p}attn_q.weight"))?)?,
                lin(get(&format!("{p}attn_k.weight"))?)?,
                lin(get(&format!("{p}attn_v.weight"))?)?,
            ];
            let gate = get(&format!("{p}ffn_gate.weight"))?;
            let ffn = gate.shape().dims2()?.0;
            let gate_up = vec![lin(gate)?, lin(get(&format!("{p}ffn_up.weight"))?)?];
            layers.push(Layer {
                attn_norm: get(&format!("{p}attn_norm.weight"))?.dequantize(&dev)?,
                ffn_norm: get(&format!("{p}ffn_norm.weight"))?.dequantize(&dev)?,
                qkv: stack(qkv)?,
                o: lin(get(&format!("{p}attn_output.weight"))?)?,
                gate_up: stack(gate_up)?,
                down: lin(get(&format!("{p}ffn_down.weight"))?)?,
                ffn,
            });
        }
        let embed_q = get("token_embd.weight")?;
        let embed = embed_q.dequantize(&dev)?;
        let head = match kernels {
            Kernels::Candle => Head::Candle(QMatMul::from_qtensor(embed_q)?),
            Kernels::Sovereign(isa) => {
                match Q80MatMul::from_qtensor(&embed_q).and_then(|m| m.with_isa(isa)) {
                    Some(m) => Head::Ours(m),
                    None => candle_core::bail!("token_embd is not Q8_0"),
                }
            }
        };
        let norm = get("output_norm.weight")?.dequantize(&dev)?;
        let head_dim = hidden / heads;
        let positions = 2048;
        let mut cos = Vec::with_capacity(positions * head_dim / 2);
        let mut sin = Vec::with_capacity(positions * head_dim / 2);
        for p in 0..positions {
            for i in 0..head_dim / 2 {
                let theta = p as f32 * rope_base.powf(-2.0 * i as f32 / head_dim as f32);
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (positions, head_dim / 2), &dev)?;
        let sin = Tensor::from_vec(sin, (positions, head_dim / 2), &dev)?;
        Ok(Self {
            embed,
            layers,
            norm,
            head,
            heads,
            kv_heads,
            head_dim,
            eps,
            cos,
            sin,
            cache: (0..n_layers).map(|_| None).collect(),
            pos: 0,
        })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, w, self.eps as f32)
    }

    /// RoPE on adjacent pairs (llama.cpp's "normal" mode), `x`: [heads, seq, dim].
    fn rope(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq = x.dim(1)?;
        if pos + seq > self.cos.dim(0)? {
            candle_core::bail!("position {} past the RoPE table", pos + seq);
        }
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        candle_nn::rotary_emb::rope_i(&x.unsqueeze(0)?, &cos, &sin)?.squeeze(0)
    }

    fn project(parts: &[Lin], x: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
        if parts.len() == 1 {
            let all = parts[0].forward(x)?;
            let mut out = Vec::new();
            let mut at = 0;
            for &s in sizes {
                out.push(all.narrow(D::Minus1, at, s)?);
                at += s;
            }
            Ok(out)
        } else {
            parts.iter().map(|p| p.forward(x)).collect()
        }
    }

    /// Runs `tokens` at the next positions; returns the last position's logits.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let seq = tokens.len();
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?; // [seq, hidden]
        let (hd, nh, nkv) = (self.head_dim, self.heads, self.kv_heads);
        let pos = self.pos;
        for li in 0..self.layers.len() {
            let layer = &self.layers[li];
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let qkv = Self::project(&layer.qkv, &h, &[nh * hd, nkv * hd, nkv * hd])?;
            let q = qkv[0]
                .reshape((seq, nh, hd))?
                .transpose(0, 1)?
                .contiguous()?;
            let k = qkv[1]
                .reshape((seq, nkv, hd))?
                .transpose(0, 1)?
                .contiguous()?;
            let v = qkv[2]
                .reshape((seq, nkv, hd))?
                .transpose(0, 1)?
                .contiguous()?;
            let q = self.rope(&q, pos)?;
            let k = self.rope(&k, pos)?;
            let (k, v) = match &self.cache[li] {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
                None => (k, v),
            };
            self.cache[li] = Some((k.clone(), v.clone()));
            let total = k.dim(1)?;
            let group = nh / nkv;
            let k = k
                .unsqueeze(1)?
                .broadcast_as((nkv, group, total, hd))?
                .reshape((nh, total, hd))?;
            let v = v
                .unsqueeze(1)?
                .broadcast_as((nkv, group, total, hd))?
                .reshape((nh, total, hd))?;
            let mut att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?; // [nh, seq, total]
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
            x = (x + layer.o.forward(&o)?)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let gu = Self::project(&layer.gate_up, &h, &[layer.ffn, layer.ffn])?;
            let m = (gu[0].silu()? * &gu[1])?;
            x = (x + layer.down.forward(&m)?)?;
        }
        self.pos += seq;
        let last = self.rms_norm(&x.narrow(0, seq - 1, 1)?, &self.norm)?;
        let logits = match &self.head {
            Head::Ours(m) => m.forward(&last)?,
            Head::Candle(m) => m.forward(&last)?,
        };
        logits.squeeze(0)?.to_dtype(DType::F32)
    }
}

/// Index of the largest logit.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    let v = logits.to_vec1::<f32>()?;
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// The demo model's path (runs scripts/fetch-model; panics loudly on failure).
pub fn demo_model() -> std::path::PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/fetch-model");
    let out = std::process::Command::new(script)
        .output()
        .expect("run scripts/fetch-model");
    assert!(
        out.status.success(),
        "fetch-model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 path")
        .trim()
        .into()
}

/// "What is the capital of France? Answer in one sentence." in the GGUF's
/// ChatML template, tokenized by llama.cpp (llama-cpp-python 0.3.36's
/// vendored tree): `llama-tokenize -m SmolLM2-135M-Instruct.Q4_1.gguf --ids
/// -p "<|im_start|>user\nWhat is ...<|im_end|>\n<|im_start|>assistant\n"`.
pub const PROMPT: [u32; 21] = [
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 19842, 281, 582, 6330, 30, 2, 198, 1, 520,
    9531, 198,
];
