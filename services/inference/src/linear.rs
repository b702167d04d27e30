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
