/*!
GGUF Q8_0 weights (blocks of 32: `d` f16, 32 signed bytes) times f32
activations quantized to Q8_0 (the quants and `d` of [`Q8Rows`]): per block
`d_w * d_x * sumi` with the exact integer `sumi`, ggml's
`ggml_vec_dot_q8_0_q8_0`. The demo model's output head (tied `token_embd`,
49152 x 576) is Q8_0 and is the largest matrix of a decode step.

At load the weight bytes are put in the activations' grouped layout (see
[`crate::q8`]) and stored offset by 128 (`u = w + 128`, a bit flip of the
sign bit), so AVX-512 VNNI's unsigned-by-signed `vpdpbusd` applies; the
offset is taken back exactly with `128 * sum(q_x)` per block. The AVX-512
kernel sums whole blocks in i32 across sixteen blocks before converting, so
its correction, scaling and f32 accumulation take one vector per sixteen
blocks. The values are
not requantized: every weight is recovered bit for bit by `u - 128`.

The AVX2 and AVX-512 kernels take up to four activation rows at once (the
weights' bytes, `|w|` and scales taken once for all, each row's f32
operations those it does alone).
*/

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use crate::q8::half_offsets;
use crate::{par_rows, quantize_input, Isa, Q8Rows, RowsDot, QK};

/// Bytes of one GGUF Q8_0 block: `d` (f16) and 32 signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 34;

/// A Q8_0 weight matrix `[n, k]` ready to multiply activations `[.., k]` into `[.., n]`.
#[derive(Clone)]
pub struct Q80MatMul {
    n: usize,
    k: usize,
    /// `w + 128` of every weight, each row in the grouped layout.
    u: Vec<u8>,
    /// The f16 bits of every block's `d`, row-major.
    d: Vec<u16>,
    isa: Isa,
}

impl std::fmt::Debug for Q80MatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q80MatMul")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .finish()
    }
}

impl Q80MatMul {
    /// Takes the weights of a 2-D Q8_0 `QTensor` of shape `[n, k]`. `None` if
    /// the dtype is not Q8_0, the tensor is not 2-D, or its bytes cannot be read.
    pub fn from_qtensor(t: &QTensor) -> Option<Self> {
        if t.dtype() != GgmlDType::Q8_0 {
            return None;
        }
        let (n, k) = t.shape().dims2().ok()?;
        let data = t.data().ok()?;
        Self::from_blocks(n, k, &data)
    }

    /// Builds from raw GGUF Q8_0 bytes for a `[n, k]` matrix. `None` if `k`
    /// is not a positive multiple of 32 or the byte count does not match.
    pub fn from_blocks(n: usize, k: usize, blocks: impl AsRef<[u8]>) -> Option<Self> {
        let blocks = blocks.as_ref();
        let nb = k / QK;
        if k == 0 || !k.is_multiple_of(QK) || blocks.len() != n * nb * Q8_0_BLOCK_BYTES {
            return None;
        }
        let mut u = vec![0u8; n * k];
        let mut d = Vec::with_capacity(n * nb);
        for (j, row) in blocks.chunks_exact(nb * Q8_0_BLOCK_BYTES).enumerate() {
            let out = &mut u[j * k..(j + 1) * k];
            for (b, blk) in row.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
                d.push(u16::from_le_bytes([blk[0], blk[1]]));
                let (lo, hi) = half_offsets(nb, b);
                for (i, &w) in blk[2..].iter().enumerate() {
                    let at = if i < QK / 2 { lo + i } else { hi + i - QK / 2 };
                    out[at] = w ^ 0x80;
                }
            }
        }
        let isa = Isa::detect();
        Some(Self { n, k, u, d, isa })
    }

    /// The same weights with the kernels of `isa`; `None` if this CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Option<Self> {
        if !isa.available() {
            return None;
        }
        self.isa = isa;
        Some(self)
    }

    /// The instruction set in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Output features (rows of the weight matrix).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (columns of the weight matrix).
    pub fn k(&self) -> usize {
        self.k
    }

    /// `x @ w^T` for f32 `x` of shape `[.., k]` on the CPU, giving `[.., n]`;
    /// the semantics of `candle_core::quantized::QMatMul::forward`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (q, mut out_dims) = quantize_input("Q8_0", x, self.k)?;
        let mut out = vec![0f32; q.rows() * self.n];
        self.matmul_q8(&q, &mut out);
        out_dims.push(self.n);
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }

    /// `out[r * n + j] = dot(activation row r, weight row j)` for already
    /// quantized activations (their quants and `d`), over candle's worker pool.
    ///
    /// # Panics
    /// If `q` was not quantized with this matrix's `k` or `out` is not `q.rows() * n` long.
    pub fn matmul_q8(&self, q: &Q8Rows, out: &mut [f32]) {
        assert_eq!(q.k(), self.k, "activations quantized for another k");
        // Checked once per call rather than per dot product (the check is
        // not free next to a 1-row dot of a small matrix).
        assert!(
            self.isa.available(),
            "{:?} kernels on a CPU without them",
            self.isa
        );
        par_rows(self.n, self.k, q.rows(), out, Q80Rows { mm: self, q });
    }
}

/// The Q8_0 dot products of one [`Q80MatMul::matmul_q8`] call; built only
/// after that call has checked that `mm.isa` is available.
struct Q80Rows<'a> {
    mm: &'a Q80MatMul,
    q: &'a Q8Rows,
}

impl RowsDot for Q80Rows<'_> {
    #[inline]
    fn dot<const R: usize>(&self, j: usize, r: usize) -> [f32; R] {
        let (mm, q) = (self.mm, self.q);
        let (k, nb) = (mm.k, mm.k / QK);
        let w = WRow {
            u: &mm.u[j * k..(j + 1) * k],
            d: &mm.d[j * nb..(j + 1) * nb],
        };
        let xs = std::array::from_fn(|i| XRow {
            qs: q.row_qs(r + i),
            d: q.row_d(r + i),
            isum: q.row_isum(r + i),
        });
        // SAFETY: `matmul_q8` asserted that `mm.isa` is available before
        // building this `Q80Rows`.
        unsafe { dot(mm.isa, &w, &xs) }
    }
}

/// One weight row: `w + 128` in the grouped layout and each block's `d` (f16 bits).
struct WRow<'a> {
    u: &'a [u8],
    d: &'a [u16],
}

/// One activation row: quants (grouped layout), `d` and exact `sum(q)` per block.
struct XRow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    isum: &'a [i32],
}

/// The dot products of `w` with each row of `xs`, with the kernels for
/// `isa`; element `i` is bit for bit what `xs[i]` alone gives.
///
/// # Safety
/// `isa` must be available on this CPU ([`Isa::available`]).
///
/// # Panics
/// If the rows do not hold the same number of blocks.
unsafe fn dot<const R: usize>(isa: Isa, w: &WRow<'_>, xs: &[XRow<'_>; R]) -> [f32; R] {
    let nb = w.d.len();
    assert!(
        w.u.len() == nb * QK
            && xs
                .iter()
                .all(|x| x.qs.len() == nb * QK && x.d.len() == nb && x.isum.len() == nb),
        "block counts"
    );
    match isa {
        Isa::Scalar => std::array::from_fn(|i| dot_scalar(w, &xs[i])),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: the CPU supports avx2, fma, f16c (caller) and every
            // slice holds `nb` blocks (asserted above).
            unsafe { x86::dot_avx2(w, xs) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: the CPU supports avx512f/bw/vl/vnni, avx2, fma, f16c
            // (caller) and every slice holds `nb` blocks (asserted above).
            unsafe { x86::dot_avx512(w, xs) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => std::array::from_fn(|i| dot_scalar(w, &xs[i])),
    }
}

/// The exact integer sum of block `b`'s 32 products.
fn block_sumi(w: &WRow<'_>, x: &XRow<'_>, nb: usize, b: usize) -> i32 {
    let (lo, hi) = half_offsets(nb, b);
    let mut sumi = 0i32;
    for at in (lo..lo + QK / 2).chain(hi..hi + QK / 2) {
        sumi += (i32::from(w.u[at]) - 128) * i32::from(x.qs[at]);
    }
    sumi
}

/// The portable reference, ggml's generic `ggml_vec_dot_q8_0_q8_0`.
fn dot_scalar(w: &WRow<'_>, x: &XRow<'_>) -> f32 {
    let nb = w.d.len();
    let mut sumf = 0f32;
    for b in 0..nb {
        let d = f16::from_bits(w.d[b]).to_f32();
        sumf += block_sumi(w, x, nb, b) as f32 * (d * x.d[b]);
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{block_sumi, WRow, XRow};
    use crate::lanes::hsum256;
    use crate::QK;

    /// The last, unpaired block.
    fn single(w: &WRow<'_>, x: &XRow<'_>, nb: usize, b: usize) -> f32 {
        let d = half::f16::from_bits(w.d[b]).to_f32();
        block_sumi(w, x, nb, b) as f32 * (d * x.d[b])
    }

    /// The `d` of weight blocks `b`, `b + 1` in lanes 0, 1 (f32).
    ///
    /// Safety: `b + 1 < nb`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn wscales2(w: &WRow<'_>, b: usize) -> __m128 {
        // SAFETY: blocks b, b + 1 exist (caller): 2 f16s in `w.d`.
        _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
            (w.d.as_ptr().add(b) as *const i32).read_unaligned()
        }))
    }

    /// `d_w * d_x` of blocks `b`, `b + 1` spread over lanes 0..4 and 4..8,
    /// from the weights' `d` of [`wscales2`].
    ///
    /// Safety: `b + 1 < nb`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scales2(dw: __m128, x: &XRow<'_>, b: usize) -> __m256 {
        // SAFETY: blocks b, b + 1 exist (caller): 2 f32s in `x.d`.
        let dx = unsafe { _mm_castpd_ps(_mm_load_sd(x.d.as_ptr().add(b) as *const f64)) };
        _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_mul_ps(dw, dx)),
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
        )
    }

    /// AVX2: two blocks per step, ggml's sign trick: `|w|` (unsigned) times
    /// `sign(w) * x` with `maddubs` (pairs at most 2 * 128 * 127 = 32512, no
    /// saturation), widened to i32 with `madd` before the halves are added.
    /// The weights' bytes, `|w|` and scales are taken once per step for all
    /// `R` rows; each row has its own accumulator and does the same f32
    /// operations as alone.
    ///
    /// Safety: avx2, fma, f16c available; every slice holds `w.d.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2<const R: usize>(w: &WRow<'_>, xs: &[XRow<'_>; R]) -> [f32; R] {
        let nb = w.d.len();
        let full4 = nb / 4 * 4;
        let pairs_end = if nb - full4 >= 2 { full4 + 2 } else { full4 };
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let wu = w.u.as_ptr();
        let mut b = 0;
        while b < pairs_end {
            let (lo, hi) = if b < full4 {
                let (g, h) = (b / 4, (b % 4) / 2);
                (g * 128 + h * 32, g * 128 + 64 + h * 32)
            } else {
                (full4 * 32, full4 * 32 + 32)
            };
            // SAFETY: the pair's halves are 32 bytes at `lo` and `hi` (< nb * 32);
            // unaligned loads.
            let (ulo, uhi) = unsafe {
                (
                    _mm256_loadu_si256(wu.add(lo) as *const __m256i),
                    _mm256_loadu_si256(wu.add(hi) as *const __m256i),
                )
            };
            let (wlo, whi) = (_mm256_xor_si256(ulo, flip), _mm256_xor_si256(uhi, flip));
            let (alo, ahi) = (_mm256_abs_epi8(wlo), _mm256_abs_epi8(whi));
            // SAFETY: b + 1 < nb.
            let dw = unsafe { wscales2(w, b) };
            for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                let xq = x.qs.as_ptr();
                // SAFETY: the activations share the grouped layout: 32 bytes at
                // `lo` and `hi` (< nb * 32); unaligned loads.
                let (ylo, yhi) = unsafe {
                    (
                        _mm256_loadu_si256(xq.add(lo) as *const __m256i),
                        _mm256_loadu_si256(xq.add(hi) as *const __m256i),
                    )
                };
                let plo = _mm256_maddubs_epi16(alo, _mm256_sign_epi8(ylo, wlo));
                let phi = _mm256_maddubs_epi16(ahi, _mm256_sign_epi8(yhi, whi));
                let p =
                    _mm256_add_epi32(_mm256_madd_epi16(plo, ones), _mm256_madd_epi16(phi, ones));
                // SAFETY: b + 1 < nb.
                let sc = unsafe { scales2(dw, x, b) };
                *acc = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), *acc);
            }
            b += 2;
        }
        std::array::from_fn(|i| {
            let mut sum = hsum256(acc[i]);
            if b < nb {
                sum += single(w, &xs[i], nb, b);
            }
            sum
        })
    }

    /// AVX-512 VNNI: sixteen blocks per step, then four, then two, `vpdpbusd` on
    /// `u = w + 128` and the activation quants, minus `128 * sum(q_x)` per
    /// block (exact, in i32). In a sixteen-block step the four partial sums
    /// of each block are added across the four groups' vectors with unpacks
    /// (one exact sum per block in one vector, transposed, put back in block
    /// order by one permute), so the correction, scales and f32 operations
    /// take one vector per sixteen blocks instead of four. The weights'
    /// bytes and scales are loaded once per step for all `R` rows; each row
    /// has its own accumulator and does the same f32 operations as alone.
    ///
    /// Safety: avx512f/bw/vl/vnni, avx2, fma, f16c available; every slice
    /// holds `w.d.len()` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx512<const R: usize>(w: &WRow<'_>, xs: &[XRow<'_>; R]) -> [f32; R] {
        let nb = w.d.len();
        let full4 = nb / 4 * 4;
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let full16 = nb / 16 * 16;
        // Lane `4 * l + m` of a transposed sum holds block `4 * m + l`; the
        // transpose is its own inverse.
        let untranspose = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let mut acc = [_mm512_setzero_ps(); R];
        let wu = w.u.as_ptr();
        let mut b = 0;
        while b < full16 {
            // SAFETY: groups b / 4 .. b / 4 + 4 are 512 bytes at b * 32 (grouped
            // layout), with 16 f16s at b in `w.d`; unaligned loads.
            let (u, dw) = unsafe {
                let at = wu.add(b * QK);
                (
                    [0, 1, 2, 3, 4, 5, 6, 7]
                        .map(|h| _mm512_loadu_si512(at.add(h * 64) as *const __m512i)),
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(b) as *const __m256i)),
                )
            };
            for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                let xq = x.qs.as_ptr();
                // SAFETY: the activations share the grouped layout: 512 bytes at
                // b * 32, with 16 f32s / i32s at b in `x.d`, `x.isum`; unaligned loads.
                let (y, dx, isum) = unsafe {
                    let at = xq.add(b * QK);
                    (
                        [0, 1, 2, 3, 4, 5, 6, 7]
                            .map(|h| _mm512_loadu_si512(at.add(h * 64) as *const __m512i)),
                        _mm512_loadu_ps(x.d.as_ptr().add(b)),
                        _mm512_loadu_si512(x.isum.as_ptr().add(b) as *const __m512i),
                    )
                };
                // Group g's products: 128-bit lane l holds block 4g + l's 4 partial sums.
                let p: [__m512i; 4] = std::array::from_fn(|g| {
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[2 * g], y[2 * g]);
                    _mm512_dpbusd_epi32(p, u[2 * g + 1], y[2 * g + 1])
                });
                // Partial sums added pairwise across groups (0, 1) and (2, 3),
                // then across the pairs: one exact sum per block, transposed.
                let s01 = _mm512_add_epi32(
                    _mm512_unpacklo_epi32(p[0], p[1]),
                    _mm512_unpackhi_epi32(p[0], p[1]),
                );
                let s23 = _mm512_add_epi32(
                    _mm512_unpacklo_epi32(p[2], p[3]),
                    _mm512_unpackhi_epi32(p[2], p[3]),
                );
                let t = _mm512_add_epi32(
                    _mm512_unpacklo_epi64(s01, s23),
                    _mm512_unpackhi_epi64(s01, s23),
                );
                let sumi = _mm512_sub_epi32(
                    _mm512_permutexvar_epi32(untranspose, t),
                    _mm512_slli_epi32(isum, 7),
                );
                *acc = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(sumi), *acc);
            }
            b += 16;
        }
        while b < full4 {
            // SAFETY: group b / 4 is 128 bytes at b * 32 (grouped layout), with
            // 4 f16s at b in `w.d`; unaligned loads.
            let (ulo, uhi, dw) = unsafe {
                (
                    _mm512_loadu_si512(wu.add(b * QK) as *const __m512i),
                    _mm512_loadu_si512(wu.add(b * QK + 64) as *const __m512i),
                    _mm_cvtph_ps(_mm_loadl_epi64(w.d.as_ptr().add(b) as *const __m128i)),
                )
            };
            for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                let xq = x.qs.as_ptr();
                // SAFETY: the activations share the grouped layout: 128 bytes at
                // b * 32, with 4 f32s / i32s at b in `x.d`, `x.isum`; unaligned loads.
                let (ylo, yhi, dx, isum) = unsafe {
                    (
                        _mm512_loadu_si512(xq.add(b * QK) as *const __m512i),
                        _mm512_loadu_si512(xq.add(b * QK + 64) as *const __m512i),
                        _mm_loadu_ps(x.d.as_ptr().add(b)),
                        _mm_loadu_si128(x.isum.as_ptr().add(b) as *const __m128i),
                    )
                };
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ulo, ylo);
                let p = _mm512_dpbusd_epi32(p, uhi, yhi);
                // 128 * sum(q_x) of block j, taken from lane 4j only.
                let corr = _mm512_maskz_permutexvar_epi32(
                    0x1111,
                    spread,
                    _mm512_castsi128_si512(_mm_slli_epi32(isum, 7)),
                );
                let p = _mm512_sub_epi32(p, corr);
                let sc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(dw, dx)));
                *acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), *acc);
            }
            b += 4;
        }
        if nb - full4 >= 2 {
            // Lanes 0..4 and 8..12 are block b's, 4..8 and 12..16 block b + 1's.
            let pair = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
            // SAFETY: the pair is 64 bytes at b * 32 (both first halves, then
            // both second halves) and b + 1 < nb; unaligned load.
            let (u, dw) = unsafe {
                (
                    _mm512_loadu_si512(wu.add(b * QK) as *const __m512i),
                    wscales2(w, b),
                )
            };
            for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                // SAFETY: the same 64 bytes in the activations, 2 f32s / i32s at
                // b in `x.d`, `x.isum`; unaligned loads.
                let (y, dx, isum) = unsafe {
                    (
                        _mm512_loadu_si512(x.qs.as_ptr().add(b * QK) as *const __m512i),
                        _mm_castpd_ps(_mm_load_sd(x.d.as_ptr().add(b) as *const f64)),
                        _mm_loadl_epi64(x.isum.as_ptr().add(b) as *const __m128i),
                    )
                };
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, y);
                // 128 * sum(q_x) of each block, taken from lane 0 (block b), 4 (b + 1) only.
                let corr = _mm512_maskz_permutexvar_epi32(
                    0x0011,
                    pair,
                    _mm512_castsi128_si512(_mm_slli_epi32(isum, 7)),
                );
                let p = _mm512_sub_epi32(p, corr);
                let sc = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(_mm_mul_ps(dw, dx)));
                *acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), *acc);
            }
            b += 2;
        }
        let sum: [f32; R] = std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]));
        std::array::from_fn(|i| {
            let mut s = sum[i];
            if b < nb {
                s += single(w, &xs[i], nb, b);
            }
            s
        })
    }
}
