/*!
GGUF Q5_0 and Q5_1 weights times activations quantized to Q8 ([`Q8Rows`]).
Q5_0 blocks of 32 hold `d` (f16), 32 fifth bits and 16 nibble bytes, a
weight being `d * (q - 16)` with `q` in 0..=31: per block `d_w * d_x *
(sum(q_w * q_x) - 16 * sum(q_x))`, ggml's `ggml_vec_dot_q5_0_q8_0`. Q5_1
blocks add `m` (f16) after `d`, a weight being `d * q + m`: per block `d_w *
d_x * sum(q_w * q_x) + m_w * s_x`, ggml's `ggml_vec_dot_q5_1_q8_1`. Integer
sums are exact. k-quant files use these for the matrices whose rows are not
a multiple of 256 long (`Q4_K_M` takes Q5_0, `Q5_K_M` Q5_1): the demo
model's 576-column matrices, Gemma 3 270M's 640-column ones.

At load the blocks' fields are split into nibbles, fifth bits and scales
(every bit kept). The AVX2 kernel serves [`Isa::Avx2`] and [`Isa::Avx512`],
for up to four activation rows at once: the weights' 5-bit quants are
rebuilt once for all of them, each row's f32 operations are those it does
alone.
*/

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use crate::q8::half_offsets;
use crate::{par_rows, quantize_input, Isa, Q8Rows, RowsDot, QK};

/// Bytes of one GGUF Q5_0 block.
pub const Q5_0_BLOCK_BYTES: usize = 22;
/// Bytes of one GGUF Q5_1 block.
pub const Q5_1_BLOCK_BYTES: usize = 24;

/// A Q5_0 or Q5_1 weight matrix `[n, k]` ready to multiply activations `[.., k]` into `[.., n]`.
#[derive(Clone)]
pub struct Q5MatMul {
    n: usize,
    k: usize,
    /// The f16 bits of each block's `m` (Q5_1), empty for Q5_0.
    m: Vec<u16>,
    /// 16 nibble bytes per block (values 0..16 low, 16..32 high), row-major.
    qs: Vec<u8>,
    /// The fifth bits of each block (bit `i` for value `i`).
    qh: Vec<u32>,
    /// The f16 bits of each block's `d`.
    d: Vec<u16>,
    isa: Isa,
}

impl std::fmt::Debug for Q5MatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q5MatMul")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .finish()
    }
}

impl Q5MatMul {
    /// Takes the weights of a 2-D Q5_0 or Q5_1 `QTensor` `[n, k]`; `None` otherwise.
    pub fn from_qtensor(t: &QTensor) -> Option<Self> {
        let with_m = match t.dtype() {
            GgmlDType::Q5_0 => false,
            GgmlDType::Q5_1 => true,
            _ => return None,
        };
        let (n, k) = t.shape().dims2().ok()?;
        let data = t.data().ok()?;
        Self::from_blocks(with_m, n, k, &data)
    }

    /// Builds from raw GGUF Q5_1 (`with_m`) or Q5_0 bytes for a `[n, k]`
    /// matrix. `None` if `k` is not a positive multiple of 32 or the byte
    /// count does not match.
    pub fn from_blocks(with_m: bool, n: usize, k: usize, blocks: impl AsRef<[u8]>) -> Option<Self> {
        let blocks = blocks.as_ref();
        let size = if with_m {
            Q5_1_BLOCK_BYTES
        } else {
            Q5_0_BLOCK_BYTES
        };
        if k == 0 || !k.is_multiple_of(QK) || blocks.len() != n * (k / QK) * size {
            return None;
        }
        let count = n * (k / QK);
        let mut qs = Vec::with_capacity(count * QK / 2);
        let mut qh = Vec::with_capacity(count);
        let mut d = Vec::with_capacity(count);
        let mut m = Vec::new();
        for blk in blocks.chunks_exact(size) {
            d.push(u16::from_le_bytes([blk[0], blk[1]]));
            let rest = if with_m {
                m.push(u16::from_le_bytes([blk[2], blk[3]]));
                &blk[4..]
            } else {
                &blk[2..]
            };
            qh.push(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
            qs.extend_from_slice(&rest[4..]);
        }
        Some(Self {
            n,
            k,
            m,
            qs,
            qh,
            d,
            isa: Isa::detect(),
        })
    }

    /// `Q5_0` or `Q5_1`.
    pub fn name(&self) -> &'static str {
        if self.m.is_empty() {
            "Q5_0"
        } else {
            "Q5_1"
        }
    }

    /// The same weights with the kernels of `isa`; `None` if this CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Option<Self> {
        if !isa.available() {
            return None;
        }
        self.isa = isa;
        Some(self)
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// One matrix with the rows of `parts` one after another (same type and `k`).
    pub fn stack_rows(parts: &[&Q5MatMul]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.k != first.k || p.m.is_empty() != first.m.is_empty())
        {
            return None;
        }
        let mut out = Self {
            n: 0,
            k: first.k,
            m: Vec::new(),
            qs: Vec::new(),
            qh: Vec::new(),
            d: Vec::new(),
            isa: first.isa,
        };
        for p in parts {
            out.n += p.n;
            out.qs.extend_from_slice(&p.qs);
            out.qh.extend_from_slice(&p.qh);
            out.d.extend_from_slice(&p.d);
            out.m.extend_from_slice(&p.m);
        }
        Some(out)
    }

    /// `x @ w^T` for f32 `x` of shape `[.., k]` on the CPU, giving `[.., n]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (q, mut out_dims) = quantize_input(self.name(), x, self.k)?;
        let mut out = vec![0f32; q.rows() * self.n];
        self.matmul_q8(&q, &mut out);
        out_dims.push(self.n);
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }

    /// `out[r * n + j] = dot(activation row r, weight row j)`, over the pool.
    ///
    /// # Panics
    /// If `q` was not quantized with this matrix's `k` or `out` is not `q.rows() * n` long.
    pub fn matmul_q8(&self, q: &Q8Rows, out: &mut [f32]) {
        assert_eq!(q.k(), self.k, "activations quantized for another k");
        par_rows(self.n, self.k, q.rows(), out, Q5Rows { mm: self, q });
    }
}

/// The Q5_0/Q5_1 dot products of one [`Q5MatMul::matmul_q8`] call.
struct Q5Rows<'a> {
    mm: &'a Q5MatMul,
    q: &'a Q8Rows,
}

impl RowsDot for Q5Rows<'_> {
    #[inline]
    fn dot<const R: usize>(&self, j: usize, r: usize) -> [f32; R] {
        let (mm, q) = (self.mm, self.q);
        let nb = mm.k / QK;
        let w = WRow {
            qs: &mm.qs[j * nb * QK / 2..(j + 1) * nb * QK / 2],
            qh: &mm.qh[j * nb..(j + 1) * nb],
            d: &mm.d[j * nb..(j + 1) * nb],
            m: mm.m.get(j * nb..(j + 1) * nb),
        };
        let xs = std::array::from_fn(|i| XRow {
            qs: q.row_qs(r + i),
            d: q.row_d(r + i),
            s: q.row_s(r + i),
            isum: q.row_isum(r + i),
        });
        dot(mm.isa, &w, &xs)
    }
}

/// One weight row; `m` only for Q5_1.
struct WRow<'a> {
    qs: &'a [u8],
    qh: &'a [u32],
    d: &'a [u16],
    m: Option<&'a [u16]>,
}

/// One activation row: quants (grouped layout), `d`, `s` and exact `sum(q)` per block.
struct XRow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    isum: &'a [i32],
}

/// The dot products of `w` with each row of `xs`; element `i` is bit for
/// bit what `xs[i]` alone gives.
///
/// # Panics
/// If the rows hold different block counts, or `isa` is not available.
fn dot<const R: usize>(isa: Isa, w: &WRow<'_>, xs: &[XRow<'_>; R]) -> [f32; R] {
    let nb = w.d.len();
    assert!(
        w.qh.len() == nb
            && w.m.is_none_or(|m| m.len() == nb)
            && w.qs.len() == nb * QK / 2
            && xs.iter().all(|x| x.s.len() == nb
                && x.d.len() == nb
                && x.isum.len() == nb
                && x.qs.len() == nb * QK),
        "block counts"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            assert!(Isa::Avx2.available(), "AVX2 kernel on a CPU without AVX2");
            // SAFETY: avx2, fma, f16c available (checked above); every slice holds
            // `nb` blocks (asserted above).
            unsafe { x86::dot(w, xs) }
        }
        _ => std::array::from_fn(|i| dot_scalar(w, &xs[i])),
    }
}

/// The exact `sum(q_w * q_x)` of block `b`, less `16 * sum(q_x)` for Q5_0.
fn block_sumi(w: &WRow<'_>, x: &XRow<'_>, nb: usize, b: usize) -> i32 {
    let (lo, hi) = half_offsets(nb, b);
    let h = w.qh[b];
    let mut sumi = 0i32;
    for j in 0..QK / 2 {
        let byte = w.qs[b * QK / 2 + j];
        let vl = i32::from(byte & 0x0F) | (((h >> j) & 1) as i32) << 4;
        let vh = i32::from(byte >> 4) | (((h >> (j + 16)) & 1) as i32) << 4;
        sumi += vl * i32::from(x.qs[lo + j]) + vh * i32::from(x.qs[hi + j]);
    }
    if w.m.is_some() {
        sumi
    } else {
        sumi - 16 * x.isum[b]
    }
}

/// Block `b`'s `m_w * s_x` (Q5_1), 0 for Q5_0.
#[inline]
fn min_term(w: &WRow<'_>, x: &XRow<'_>, b: usize) -> f32 {
    w.m.map_or(0.0, |m| f16::from_bits(m[b]).to_f32() * x.s[b])
}

fn dot_scalar(w: &WRow<'_>, x: &XRow<'_>) -> f32 {
    let nb = w.d.len();
    (0..nb)
        .map(|b| {
            block_sumi(w, x, nb, b) as f32 * (f16::from_bits(w.d[b]).to_f32() * x.d[b])
                + min_term(w, x, b)
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{block_sumi, min_term, WRow, XRow};
    use crate::QK;

    /// Byte `i` of the result is 0x10 when bit `i` of `bits` is set, else 0.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fifth_bits(bits: u32) -> __m256i {
        let v = _mm256_set1_epi32(bits as i32);
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(
            _mm256_and_si256(_mm256_shuffle_epi8(v, spread), select),
            select,
        );
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Two blocks per step, laid out as Q4_1's kernel lays them: the pair's
    /// nibbles in one 32-byte load, low nibbles against the pair's first
    /// halves, high against the second; the fifth bits or-ed in as 16,
    /// `maddubs` (at most 2 * 31 * 127 per pair, halves summed 15748),
    /// `madd` to i32, then (Q5_0) `16 * sum(q_x)` taken off each block
    /// exactly or (Q5_1) `m_w * s_x` added per block. The weights' quants are
    /// rebuilt once per step for all `R` rows; each row has its own
    /// accumulators and does the same f32 operations as alone.
    ///
    /// Safety: avx2, fma, f16c available; every slice holds `w.d.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<const R: usize>(w: &WRow<'_>, xs: &[XRow<'_>; R]) -> [f32; R] {
        let nb = w.d.len();
        let full4 = nb / 4 * 4;
        let pairs_end = if nb - full4 >= 2 { full4 + 2 } else { full4 };
        let m4 = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        let offset = if w.m.is_some() { 0 } else { 16 };
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        let wq = w.qs.as_ptr();
        let mut b = 0;
        while b < pairs_end {
            let (lo, hi) = if b < full4 {
                let (g, h) = (b / 4, (b % 4) / 2);
                (g * 128 + h * 32, g * 128 + 64 + h * 32)
            } else {
                (full4 * 32, full4 * 32 + 32)
            };
            // SAFETY: blocks b, b + 1 < nb: 32 nibble bytes at b * 16; unaligned load.
            let nib = unsafe { _mm256_loadu_si256(wq.add(b * (QK / 2)) as *const __m256i) };
            let (h0, h1) = (w.qh[b], w.qh[b + 1]);
            let bl = fifth_bits((h0 & 0xFFFF) | (h1 << 16));
            let bh = fifth_bits((h0 >> 16) | (h1 & 0xFFFF_0000));
            let ql = _mm256_or_si256(_mm256_and_si256(nib, m4), bl);
            let qh = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(nib, 4), m4), bh);
            let (dw0, dw1) = (
                half::f16::from_bits(w.d[b]).to_f32(),
                half::f16::from_bits(w.d[b + 1]).to_f32(),
            );
            for ((x, acc), mins) in xs.iter().zip(acc.iter_mut()).zip(mins.iter_mut()) {
                let xq = x.qs.as_ptr();
                // SAFETY: the pair's halves (32 bytes each) at `lo`, `hi` < nb * 32;
                // unaligned loads.
                let (ylo, yhi) = unsafe {
                    (
                        _mm256_loadu_si256(xq.add(lo) as *const __m256i),
                        _mm256_loadu_si256(xq.add(hi) as *const __m256i),
                    )
                };
                let p16 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(ql, ylo), _mm256_maddubs_epi16(qh, yhi));
                let p = _mm256_madd_epi16(p16, ones);
                let corr =
                    _mm256_setr_epi32(offset * x.isum[b], 0, 0, 0, offset * x.isum[b + 1], 0, 0, 0);
                *mins += min_term(w, x, b) + min_term(w, x, b + 1);
                let sc = _mm256_permutevar8x32_ps(
                    _mm256_castps128_ps256(_mm_setr_ps(dw0 * x.d[b], dw1 * x.d[b + 1], 0.0, 0.0)),
                    spread,
                );
                *acc = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(_mm256_sub_epi32(p, corr)), *acc);
            }
            b += 2;
        }
        std::array::from_fn(|i| {
            let (acc, x) = (acc[i], &xs[i]);
            let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            let mut sum = _mm_cvtss_f32(s) + mins[i];
            if b < nb {
                let d = half::f16::from_bits(w.d[b]).to_f32() * x.d[b];
                sum += block_sumi(w, x, nb, b) as f32 * d + min_term(w, x, b);
            }
            sum
        })
    }
}
