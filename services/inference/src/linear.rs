//! Matrix products with quantized weights: this project's SIMD kernels for
//! Q4_1, Q8_0, Q5_0, Q5_1, the k-quants (Q4_K, Q5_K, Q6_K) and F16/BF16, candle's
//! `QMatMul` for every other type.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Result, Tensor};
use sovereign_kernels::{HalfMatMul, KQuantMatMul, Q41MatMul, Q5MatMul, Q80MatMul};

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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Q41(m) => m.forward(x),
            Self::Q80(m) => m.forward(x),
            Self::Q5(m) => m.forward(x),
            Self::KQuant(m) => m.forward(x),
            Self::Half(m) => m.forward(x),
            Self::Candle(m, _) => candle_core::Module::forward(m, x),
            Self::Dense(w) => x.broadcast_matmul(&w.t()?),
        }
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
    /// The stacked matrix, the parts' output sizes, and their paths.
    Stacked(Linear, Vec<usize>, Vec<String>),
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
                all.and_then(|a| {
                    Some((
                        Linear::Q41(Q41MatMul::stack_rows(&a)?),
                        sizes(&a, Q41MatMul::n),
                    ))
                })
            }
            Some(Linear::Q5(_)) => {
                let all: Option<Vec<&Q5MatMul>> = parts
                    .iter()
                    .map(|p| match p {
                        Linear::Q5(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                all.and_then(|a| {
                    Some((
                        Linear::Q5(Q5MatMul::stack_rows(&a)?),
                        sizes(&a, Q5MatMul::n),
                    ))
                })
            }
            Some(Linear::KQuant(_)) => {
                let all: Option<Vec<&KQuantMatMul>> = parts
                    .iter()
                    .map(|p| match p {
                        Linear::KQuant(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                all.and_then(|a| {
                    Some((
                        Linear::KQuant(KQuantMatMul::stack_rows(&a)?),
                        sizes(&a, KQuantMatMul::n),
                    ))
                })
            }
            Some(Linear::Half(_)) => {
                let all: Option<Vec<&HalfMatMul>> = parts
                    .iter()
                    .map(|p| match p {
                        Linear::Half(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                all.and_then(|a| {
                    Some((
                        Linear::Half(HalfMatMul::stack_rows(&a)?),
                        sizes(&a, HalfMatMul::n),
                    ))
                })
            }
            _ => None,
        };
        match stacked {
            Some((linear, sizes)) => Self::Stacked(linear, sizes, paths),
            None => Self::Separate(parts),
        }
    }

    /// The path of each part, in order.
    pub fn paths(&self) -> Vec<String> {
        match self {
            Self::Stacked(_, _, paths) => paths.clone(),
            Self::Separate(parts) => parts.iter().map(Linear::path).collect(),
        }
    }

    /// One output per matrix, in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Self::Stacked(linear, sizes, _) => {
                let all = linear.forward(x)?;
                let mut at = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        let part = all.narrow(candle_core::D::Minus1, at, n);
                        at += n;
                        part
                    })
                    .collect()
            }
        }
    }
}

fn sizes<T>(parts: &[&T], n: fn(&T) -> usize) -> Vec<usize> {
    parts.iter().map(|p| n(p)).collect()
}
