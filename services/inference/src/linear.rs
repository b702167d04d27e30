//! Matrix products with quantized weights: this project's SIMD kernels for
//! Q4_1, Q8_0, Q5_0, Q5_1, the k-quants (Q4_K, Q5_K, Q6_K) and F16/BF16, candle's
//! `QMatMul` for every other type.
//!
//! Every path computes each output row from its input row alone, so a row's
//! result does not depend on how many rows are multiplied with it (the
//! engine's batch invariance): the kernels quantize and dot each row on its
//! own; candle's f32 matrices are applied one row at a time.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Result, Tensor};
use sovereign_kernels::{
    HalfMatMul, KQuantMatMul, Q41MatMul, Q5MatMul, Q80MatMul, Q8KRows, Q8Rows,
};

/// A weight matrix `[n, k]` applied as `x @ W^T`.
pub(crate) enum Linear {
    Q41(Q41MatMul),
    Q80(Q80MatMul),
    Q5(Q5MatMul),
    KQuant(KQuantMatMul),
    Half(HalfMatMul),
    /// Any other GGUF type, through candle; the type's name for `path`.
    Candle(QMatMul, String),
    /// An f32 matrix (safetensors models).
    Dense(Tensor),
}

impl Linear {
    pub fn new(weight: QTensor) -> Result<Self> {
        if let Some(m) = Q41MatMul::from_qtensor(&weight) {
            return Ok(Self::Q41(m));
        }
        if let Some(m) = Q80MatMul::from_qtensor(&weight) {
            return Ok(Self::Q80(m));
        }
        if let Some(m) = Q5MatMul::from_qtensor(&weight) {
            return Ok(Self::Q5(m));
        }
        if let Some(m) = KQuantMatMul::from_qtensor(&weight) {
            return Ok(Self::KQuant(m));
        }
        if let Some(m) = HalfMatMul::from_qtensor(&weight) {
            return Ok(Self::Half(m));
        }
        let dtype = format!("{:?}", weight.dtype());
        Ok(Self::Candle(QMatMul::from_qtensor(weight)?, dtype))
    }

    /// Output features.
    pub fn n(&self) -> Result<usize> {
        match self {
            Self::Q41(m) => Ok(m.n()),
            Self::Q80(m) => Ok(m.n()),
            Self::Q5(m) => Ok(m.n()),
            Self::KQuant(m) => Ok(m.n()),
            Self::Half(m) => Ok(m.n()),
            Self::Candle(QMatMul::QTensor(t), _) => Ok(t.shape().dims2()?.0),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t), _) | Self::Dense(t) => {
                t.dim(0)
            }
        }
    }

    /// `out = x @ W^T` for `m` rows of `x` (`out` holds `m * n` values).
    pub fn forward_rows(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        let k = x.len() / m;
        match self {
            Self::Q41(w) => w.matmul_q8(&Q8Rows::quantize(x, m, k), out),
            Self::Q80(w) => w.matmul_q8(&Q8Rows::quantize(x, m, k), out),
            Self::Q5(w) => w.matmul_q8(&Q8Rows::quantize(x, m, k), out),
            Self::KQuant(w) => w.matmul_q8k(&Q8KRows::quantize(x, m, k), out),
            Self::Half(w) => w.matmul(x, m, out),
            Self::Candle(w, _) => {
                // candle quantizes and dots each row on its own.
                let x = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
                let y = candle_core::Module::forward(w, &x)?;
                out.copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
            }
            Self::Dense(w) => {
                let n = out.len() / m;
                let wt = w.t()?;
                for (row, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
                    let y = Tensor::from_slice(row, (1, k), &Device::Cpu)?.matmul(&wt)?;
                    dst.copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
                }
            }
        }
        Ok(())
    }

    /// Which code multiplies this matrix: `"<type> kernel"` for this
    /// project's SIMD kernels, `"<type> candle"` otherwise.
    pub fn path(&self) -> String {
        match self {
            Self::Q41(_) => "Q4_1 kernel".into(),
            Self::Q80(_) => "Q8_0 kernel".into(),
            Self::Q5(m) => format!("{} kernel", m.name()),
            Self::KQuant(m) => format!("{} kernel", m.kind().name()),
            Self::Half(m) => format!("{} kernel", m.kind().name()),
            Self::Candle(_, dtype) => format!("{dtype} candle"),
            Self::Dense(_) => "F32 candle".into(),
        }
    }
}

/// Several weight matrices applied to the same input. Matrices of one
/// kernel format are stacked into one, so the input is quantized once and
/// the thread pool is entered once (q|k|v, gate|up); anything else runs one
/// by one.
pub(crate) enum Fused {
    /// The stacked matrix and the parts' paths.
    Stacked(Linear, Vec<String>),
    Separate(Vec<Linear>),
}

impl Fused {
    pub fn new(parts: Vec<Linear>) -> Self {
        let paths: Vec<String> = parts.iter().map(Linear::path).collect();
        let stacked = match parts.first() {
            Some(Linear::Q41(_)) => {
                let all: Option<Vec<&Q41MatMul>> = parts
                    .iter()
                    .map(|p| match p {
                        Linear::Q41(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                all.and_then(|a| Some(Linear::Q41(Q41MatMul::stack_rows(&a)?)))
            }
            Some(Linear::Q5(_)) => {
                let all: Option<Vec<&Q5MatMul>> = parts
                    .iter()
                    .map(|p| match p {
                        Linear::Q5(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                all.and_then(|a| Some(Linear::Q5(Q5MatMul::stack_rows(&a)?)))
            }
            Some(Linear::KQuant(_)) => {
                let all: Option<Vec<&KQuantMatMul>> = parts
                    .iter()
                    .map(|p| match p {
                        Linear::KQuant(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                all.and_then(|a| Some(Linear::KQuant(KQuantMatMul::stack_rows(&a)?)))
            }
            Some(Linear::Half(_)) => {
                let all: Option<Vec<&HalfMatMul>> = parts
                    .iter()
                    .map(|p| match p {
                        Linear::Half(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                all.and_then(|a| Some(Linear::Half(HalfMatMul::stack_rows(&a)?)))
            }
            _ => None,
        };
        match stacked {
            Some(linear) => Self::Stacked(linear, paths),
            None => Self::Separate(parts),
        }
    }

    /// The output features of all matrices together.
    pub fn n(&self) -> Result<usize> {
        match self {
            Self::Stacked(linear, _) => linear.n(),
            Self::Separate(parts) => parts.iter().map(Linear::n).sum(),
        }
    }

    /// `m` rows of `x` times every matrix: each output row holds the
    /// matrices' outputs one after another (`out` holds `m * self.n()`).
    /// `scratch` is reused between calls.
    pub fn forward_rows(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        match self {
            Self::Stacked(linear, _) => linear.forward_rows(x, m, out),
            Self::Separate(parts) => {
                let total = out.len() / m.max(1);
                let mut at = 0;
                for part in parts {
                    let n = part.n()?;
                    scratch.resize(m * n, 0.0);
                    part.forward_rows(x, m, scratch)?;
                    for (src, dst) in scratch.chunks_exact(n).zip(out.chunks_exact_mut(total)) {
                        dst[at..at + n].copy_from_slice(src);
                    }
                    at += n;
                }
                Ok(())
            }
        }
    }

    /// The path of each part, in order.
    pub fn paths(&self) -> Vec<String> {
        match self {
            Self::Stacked(_, paths) => paths.clone(),
            Self::Separate(parts) => parts.iter().map(Linear::path).collect(),
        }
    }
}
