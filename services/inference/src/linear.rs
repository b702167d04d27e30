//! Matrix products with quantized weights: this project's SIMD kernels for
//! Q4_1 and Q8_0, candle's `QMatMul` for every other type.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Result, Tensor};
use sovereign_kernels::{Q41MatMul, Q80MatMul};

/// A weight matrix `[n, k]` applied as `x @ W^T`.
pub(crate) enum Linear {
    Q41(Q41MatMul),
    Q80(Q80MatMul),
    Candle(QMatMul),
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
        Ok(Self::Candle(QMatMul::from_qtensor(weight)?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Q41(m) => m.forward(x),
            Self::Q80(m) => m.forward(x),
            Self::Candle(m) => candle_core::Module::forward(m, x),
            Self::Dense(w) => x.broadcast_matmul(&w.t()?),
        }
    }
}

/// Several weight matrices applied to the same input. Q4_1 matrices are
/// stacked into one, so the input is quantized once and the thread pool is
/// entered once (q|k|v, gate|up); anything else runs one by one.
pub(crate) enum Fused {
    Stacked(Linear, Vec<usize>),
    Separate(Vec<Linear>),
}

impl Fused {
    pub fn new(parts: Vec<Linear>) -> Self {
        let q41: Vec<&Q41MatMul> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Q41(m) => Some(m),
                _ => None,
            })
            .collect();
        if q41.len() == parts.len() {
            let sizes = q41.iter().map(|m| m.n()).collect();
            if let Some(stacked) = Q41MatMul::stack_rows(&q41) {
                return Self::Stacked(Linear::Q41(stacked), sizes);
            }
        }
        Self::Separate(parts)
    }

    /// One output per matrix, in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Self::Stacked(linear, sizes) => {
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
