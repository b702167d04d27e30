//! Where a model's tensors come from: a GGUF file (quantized or not) or a
//! Hugging Face directory (`config.json` + `*.safetensors`, F16/BF16/F32).
//! Either way only the tensors asked for are read from disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::config::{Arch, ModelConfig};
use crate::error::InferenceError;
use crate::linear::Linear;

/// A tensor of a supported architecture, by role.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Name {
    Embed,
    Norm,
    Output,
    /// RoPE frequency divisors (Llama 3.1+ files).
    RopeFreqs,
    AttnNorm(usize),
    FfnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    QNorm(usize),
    KNorm(usize),
    O(usize),
    PostAttnNorm(usize),
    PostFfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl Name {
    fn gguf(self) -> String {
        match self {
            Name::Embed => "token_embd.weight".into(),
            Name::Norm => "output_norm.weight".into(),
            Name::Output => "output.weight".into(),
            Name::RopeFreqs => "rope_freqs.weight".into(),
            Name::AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
            Name::FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
            Name::Q(i) => format!("blk.{i}.attn_q.weight"),
            Name::K(i) => format!("blk.{i}.attn_k.weight"),
            Name::V(i) => format!("blk.{i}.attn_v.weight"),
            Name::QBias(i) => format!("blk.{i}.attn_q.bias"),
            Name::KBias(i) => format!("blk.{i}.attn_k.bias"),
            Name::VBias(i) => format!("blk.{i}.attn_v.bias"),
            Name::QNorm(i) => format!("blk.{i}.attn_q_norm.weight"),
            Name::KNorm(i) => format!("blk.{i}.attn_k_norm.weight"),
            Name::PostAttnNorm(i) => format!("blk.{i}.post_attention_norm.weight"),
            Name::PostFfnNorm(i) => format!("blk.{i}.post_ffw_norm.weight"),
            Name::O(i) => format!("blk.{i}.attn_output.weight"),
            Name::Gate(i) => format!("blk.{i}.ffn_gate.weight"),
            Name::Up(i) => format!("blk.{i}.ffn_up.weight"),
            Name::Down(i) => format!("blk.{i}.ffn_down.weight"),
        }
    }

    fn hf(self) -> String {
        match self {
            Name::Embed => "model.embed_tokens.weight".into(),
            Name::Norm => "model.norm.weight".into(),
            Name::Output => "lm_head.weight".into(),
            Name::RopeFreqs => "rope_freqs.weight".into(),
            Name::AttnNorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
            Name::FfnNorm(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
            Name::Q(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
            Name::K(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
            Name::V(i) => format!("model.layers.{i}.self_attn.v_proj.weight"),
            Name::QBias(i) => format!("model.layers.{i}.self_attn.q_proj.bias"),
            Name::KBias(i) => format!("model.layers.{i}.self_attn.k_proj.bias"),
            Name::VBias(i) => format!("model.layers.{i}.self_attn.v_proj.bias"),
            Name::QNorm(i) => format!("model.layers.{i}.self_attn.q_norm.weight"),
            Name::KNorm(i) => format!("model.layers.{i}.self_attn.k_norm.weight"),
            Name::PostAttnNorm(i) => format!("model.layers.{i}.post_attention_norm.weight"),
            Name::PostFfnNorm(i) => format!("model.layers.{i}.post_feedforward_layernorm.weight"),
            Name::O(i) => format!("model.layers.{i}.self_attn.o_proj.weight"),
            Name::Gate(i) => format!("model.layers.{i}.mlp.gate_proj.weight"),
            Name::Up(i) => format!("model.layers.{i}.mlp.up_proj.weight"),
            Name::Down(i) => format!("model.layers.{i}.mlp.down_proj.weight"),
        }
    }
}

/// One tensor's place in a safetensors file.
pub(crate) struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// An open model's tensors.
pub(crate) enum Weights {
    Gguf {
        file: File,
        content: gguf_file::Content,
    },
    Safetensors {
        files: Vec<(PathBuf, File)>,
        entries: HashMap<String, Entry>,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> InferenceError + '_ {
    move |source| InferenceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `config.json` of a Hugging Face Llama model.
#[derive(Deserialize)]
struct HfConfig {
    hidden_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    max_position_embeddings: Option<usize>,
    vocab_size: usize,
}

impl Weights {
    /// Opens a GGUF file or a safetensors model directory. The bool is whether
    /// RoPE pairs are interleaved (GGUF's layout) rather than split in halves.
    pub fn open(path: &Path) -> Result<(Self, ModelConfig, bool), InferenceError> {
        if path.is_dir() {
            return Self::open_safetensors(path);
        }
        let mut file = File::open(path).map_err(io(path))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            InferenceError::Model(format!("{}: not a GGUF file: {e}", path.display()))
        })?;
        let length = file.metadata().map_err(io(path))?.len();
        check_tensor_table(&content, length)?;
        let config = ModelConfig::from_gguf(&content)?;
        // llama.cpp's converter permutes Llama's q/k rows for pairwise RoPE;
        // the other architectures keep Hugging Face's halves.
        let interleaved = config.arch == Arch::Llama;
        Ok((Self::Gguf { file, content }, config, interleaved))
    }

    fn open_safetensors(dir: &Path) -> Result<(Self, ModelConfig, bool), InferenceError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| InferenceError::Model(format!("{}: {e}", config_path.display())))?;
        let heads = hf.num_attention_heads;
        let kv_heads = hf.num_key_value_heads.unwrap_or(heads);
        if heads == 0
            || kv_heads == 0
            || !hf.hidden_size.is_multiple_of(heads)
            || !heads.is_multiple_of(kv_heads)
        {
            return Err(InferenceError::Model(
                "config.json: inconsistent head counts".into(),
            ));
        }
        let rope_base = hf.rope_theta.unwrap_or(10_000.0);
        let config = ModelConfig {
            arch: Arch::Llama,
            layers: hf.num_hidden_layers,
            heads,
            kv_heads,
            hidden: hf.hidden_size,
            head_dim: hf.hidden_size / heads,
            eps: hf.rms_norm_eps.unwrap_or(1e-5),
            rope_base,
            rope_base_local: rope_base,
            rope_scale: 1.0,
            sliding_window: None,
            swa_pattern: 1,
            context: hf.max_position_embeddings.unwrap_or(2048).min(1 << 16),
            vocab: hf.vocab_size,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(InferenceError::Model(format!(
                "{} holds no .safetensors file",
                dir.display()
            )));
        }
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (index, path) in paths.into_iter().enumerate() {
            let mut file = File::open(&path).map_err(io(&path))?;
            let len = file.metadata().map_err(io(&path))?.len();
            let mut size = [0u8; 8];
            file.read_exact(&mut size).map_err(io(&path))?;
            let header_len = u64::from_le_bytes(size);
            if header_len > (100 << 20) || 8 + header_len > len {
                return Err(InferenceError::Model(format!(
                    "{}: bad safetensors header",
                    path.display()
                )));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact(&mut header).map_err(io(&path))?;
            let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| InferenceError::Model(format!("{}: {e}", path.display())))?;
            for (name, info) in header {
                if name == "__metadata__" {
                    continue;
                }
                let bad = || {
                    InferenceError::Model(format!("{}: tensor {name} is malformed", path.display()))
                };
                let dtype = match info["dtype"].as_str() {
                    Some("F32") => DType::F32,
                    Some("F16") => DType::F16,
                    Some("BF16") => DType::BF16,
                    other => {
                        return Err(InferenceError::Model(format!(
                        "{}: tensor {name} has dtype {other:?}; F32, F16 and BF16 are supported",
                        path.display()
                    )))
                    }
                };
                let shape: Vec<usize> = info["shape"]
                    .as_array()
                    .ok_or_else(bad)?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?;
                let offsets = info["data_offsets"].as_array().ok_or_else(bad)?;
                let (start, end) = match (
                    offsets.first().and_then(|v| v.as_u64()),
                    offsets.get(1).and_then(|v| v.as_u64()),
                ) {
                    (Some(s), Some(e)) if s <= e => (8 + header_len + s, 8 + header_len + e),
                    _ => return Err(bad()),
                };
                let expected =
                    shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
                if end > len || end - start != expected {
                    return Err(bad());
                }
                entries.insert(
                    name,
                    Entry {
                        file: index,
                        dtype,
                        shape,
                        start,
                        end,
                    },
                );
            }
            files.push((path, file));
        }
        Ok((Self::Safetensors { files, entries }, config, false))
    }

    /// Whether the model has this tensor.
    pub fn has(&self, name: Name) -> bool {
        match self {
            Weights::Gguf { content, .. } => content.tensor_infos.contains_key(&name.gguf()),
            Weights::Safetensors { entries, .. } => entries.contains_key(&name.hf()),
        }
    }

    /// A tensor as f32 if the model has it.
    pub fn optional(&mut self, name: Name) -> Result<Option<Tensor>, InferenceError> {
        if self.has(name) {
            self.tensor(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Bytes the engine holds for this tensor once loaded: `f32` when it is
    /// read with [`Weights::tensor`], as stored when with [`Weights::linear`]
    /// (quantized GGUF data is kept as it is in the file). `None` if absent.
    pub fn held_bytes(&self, name: Name, as_f32: bool) -> Option<u64> {
        match self {
            Weights::Gguf { content, .. } => {
                let info = content.tensor_infos.get(&name.gguf())?;
                let elems = info.shape.elem_count() as u64;
                if as_f32 {
                    return Some(elems * 4);
                }
                let dtype = info.ggml_dtype;
                Some(elems / dtype.block_size() as u64 * dtype.type_size() as u64)
            }
            Weights::Safetensors { entries, .. } => {
                let entry = entries.get(&name.hf())?;
                Some(entry.shape.iter().product::<usize>() as u64 * 4)
            }
        }
    }

    /// A tensor as f32.
    pub fn tensor(&mut self, name: Name) -> Result<Tensor, InferenceError> {
        match self {
            Weights::Gguf { file, content } => {
                let key = name.gguf();
                let q = content
                    .tensor(file, &key, &Device::Cpu)
                    .map_err(|e| InferenceError::Model(format!("tensor {key}: {e}")))?;
                Ok(q.dequantize(&Device::Cpu)?)
            }
            Weights::Safetensors { .. } => self.safetensor(name),
        }
    }

    fn safetensor(&mut self, name: Name) -> Result<Tensor, InferenceError> {
        let Weights::Safetensors { files, entries } = self else {
            return Err(InferenceError::Model("not a safetensors model".into()));
        };
        let key = name.hf();
        let entry = entries
            .get(&key)
            .ok_or_else(|| InferenceError::Model(format!("tensor {key} is missing")))?;
        let (path, file) = &mut files[entry.file];
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        file.seek(SeekFrom::Start(entry.start))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(io(path))?;
        let tensor = Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, &Device::Cpu)?;
        Ok(tensor.to_dtype(DType::F32)?)
    }

    /// A weight matrix for `x @ W^T`: quantized kernels for GGUF, dense otherwise.
    pub fn linear(&mut self, name: Name) -> Result<Linear, InferenceError> {
        match self {
            Weights::Gguf { file, content } => {
                let key = name.gguf();
                let q = content
                    .tensor(file, &key, &Device::Cpu)
                    .map_err(|e| InferenceError::Model(format!("tensor {key}: {e}")))?;
                Ok(Linear::new(q)?)
            }
            Weights::Safetensors { .. } => Ok(Linear::Dense(self.safetensor(name)?)),
        }
    }
}

/// Refuses a GGUF tensor table whose entries cannot be real: dimensions
/// whose product overflows, no elements at all (candle would build a slice
/// from an unaligned empty buffer), a size that is not whole blocks of its type, or
/// data that runs past the end of the file (`length` bytes). Checked once
/// when the file is opened, so nothing later computes with such a shape.
fn check_tensor_table(content: &gguf_file::Content, length: u64) -> Result<(), InferenceError> {
    for (name, info) in &content.tensor_infos {
        let bad = |why: &str| InferenceError::Model(format!("tensor {name}: {why}"));
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(|| bad("its dimensions overflow"))?;
        if elems == 0 {
            return Err(bad("it has no elements"));
        }
        let block = info.ggml_dtype.block_size() as u64;
        if elems % block != 0 {
            return Err(bad("its size is not a whole number of blocks of its type"));
        }
        let end = (elems / block)
            .checked_mul(info.ggml_dtype.type_size() as u64)
            .and_then(|bytes| bytes.checked_add(info.offset))
            .and_then(|end| end.checked_add(content.tensor_data_offset));
        if end.is_none_or(|end| end > length) {
            return Err(bad("its data runs past the end of the file"));
        }
    }
    Ok(())
}
