/*!
F16 and BF16 weights times f32 activations: every weight widened to f32 and
multiplied with the activation as it is (no activation quantization), summed
in f32. The AVX2 kernel widens 8 weights per step (`vcvtph2ps` for F16, a
16-bit shift for BF16) into four FMA accumulators; [`Isa::Avx512`] uses it
too. The bits are kept as in the file.
*/

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::{input_rows, par_rows, Isa};

/// A 16-bit float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    /// IEEE half precision.
    F16,
    /// bfloat16 (the top half of an f32).
    Bf16,
}

impl Half {
    /// The GGML name.
    pub fn name(self) -> &'static str {
        match self {
            Half::F16 => "F16",
            Half::Bf16 => "BF16",
        }
    }

    #[inline]
    fn widen(self, bits: u16) -> f32 {
        match self {
            Half::F16 => half::f16::from_bits(bits).to_f32(),
            Half::Bf16 => f32::from_bits(u32::from(bits) << 16),
        }
    }
}

/// An F16/BF16 weight matrix `[n, k]` ready to multiply f32 activations `[.., k]`.
#[derive(Clone)]
pub struct HalfMatMul {
    kind: Half,
    n: usize,
    k: usize,
    bits: Vec<u16>,
    isa: Isa,
}

impl std::fmt::Debug for HalfMatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfMatMul")
            .field("kind", &self.kind)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .finish()
    }
}

impl HalfMatMul {
    /// Takes the weights of a 2-D F16 or BF16 `QTensor` of shape `[n, k]`.
    /// `None` for another dtype or shape, or if its bytes cannot be read.
    pub fn from_qtensor(t: &QTensor) -> Option<Self> {
        let kind = match t.dtype() {
            GgmlDType::F16 => Half::F16,
            GgmlDType::BF16 => Half::Bf16,
            _ => return None,
        };
        let (n, k) = t.shape().dims2().ok()?;
        let data = t.data().ok()?;
        Self::from_bytes(kind, n, k, &data)
    }

    /// Builds from little-endian 16-bit values of a `[n, k]` matrix. `None`
    /// if `k` is 0 or the byte count does not match.
    pub fn from_bytes(kind: Half, n: usize, k: usize, bytes: impl AsRef<[u8]>) -> Option<Self> {
        let bytes = bytes.as_ref();
        if k == 0 || bytes.len() != n * k * 2 {
            return None;
        }
        let bits = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Some(Self {
            kind,
            n,
            k,
            bits,
            isa: Isa::detect(),
        })
    }

    /// One matrix with the rows of `parts` one after another (same format and `k`).
    pub fn stack_rows(parts: &[&HalfMatMul]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.k != first.k || p.kind != first.kind) {
            return None;
        }
        let mut out = Self {
            kind: first.kind,
            n: 0,
            k: first.k,
            bits: Vec::new(),
            isa: first.isa,
        };
        for p in parts {
            out.n += p.n;
            out.bits.extend_from_slice(&p.bits);
        }
        Some(out)
    }

    /// The same weights with the kernels of `isa`; `None` if this CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Option<Self> {
        if !isa.available() {
            return None;
        }
        self.isa = isa;
        Some(self)
    }

    /// The weight format.
    pub fn kind(&self) -> Half {
        self.kind
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `x @ w^T` for f32 `x` of shape `[.., k]` on the CPU, giving `[.., n]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (xs, m, mut out_dims) = input_rows(self.kind.name(), x, self.k)?;
        let mut out = vec![0f32; m * self.n];
        self.matmul(&xs, m, &mut out);
        out_dims.push(self.n);
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }

    /// `out[r * n + j] = dot(xs row r, weight row j)` for `m` rows of `k` values.
    ///
    /// # Panics
    /// If `xs` is not `m * k` long or `out` not `m * n`.
    pub fn matmul(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(xs.len(), m * self.k, "activation length");
        let (k, kind, isa) = (self.k, self.kind, self.isa);
        par_rows(self.n, k, m, out, |j, r| {
            let w = &self.bits[j * k..(j + 1) * k];
            let x = &xs[r * k..(r + 1) * k];
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Avx512 => {
                    assert!(Isa::Avx2.available(), "AVX2 kernel on a CPU without AVX2");
                    // SAFETY: avx2, fma, f16c available (checked above); `w` and `x`
                    // have the same length `k`.
                    unsafe { x86::dot(kind, w, x) }
                }
                _ => dot_scalar(kind, w, x),
            }
        });
    }
}

/// The portable reference: widen, multiply, add in order.
fn dot_scalar(kind: Half, w: &[u16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(&b, &v)| kind.widen(b) * v).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Half;

    /// Eight weights widened to f32.
    ///
    /// Safety: 8 values at `p`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(kind: Half, p: *const u16) -> __m256 {
        // SAFETY: 16 bytes at `p` (caller); unaligned load.
        let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
        match kind {
            Half::F16 => _mm256_cvtph_ps(v),
            Half::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)),
        }
    }

    /// Four accumulators of 8 lanes, 32 weights per step; the tail in scalar.
    ///
    /// Safety: avx2, fma, f16c available; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(kind: Half, w: &[u16], x: &[f32]) -> f32 {
        let k = w.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut i = 0;
        while i + 32 <= k {
            for (a, lane) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8a + 8 <= k values in both rows; unaligned loads.
                let (wv, xv) = unsafe {
                    (
                        load8(kind, wp.add(i + 8 * a)),
                        _mm256_loadu_ps(xp.add(i + 8 * a)),
                    )
                };
                *lane = _mm256_fmadd_ps(wv, xv, *lane);
            }
            i += 32;
        }
        while i + 8 <= k {
            // SAFETY: i + 8 <= k.
            let (wv, xv) = unsafe { (load8(kind, wp.add(i)), _mm256_loadu_ps(xp.add(i))) };
            acc[0] = _mm256_fmadd_ps(wv, xv, acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        let mut sum = _mm_cvtss_f32(h);
        while i < k {
            sum += kind.widen(w[i]) * x[i];
            i += 1;
        }
        sum
    }
}
