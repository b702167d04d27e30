/*!
GGUF k-quant weights (Q4_K, Q5_K, Q6_K: super-blocks of 256 values) times
f32 activations quantized to Q8_K ([`Q8KRows`]), ggml's
`ggml_vec_dot_q{4,5,6}_K_q8_K`: per super-block the exact integer sum of the
sub-blocks' `scale * sum(q_w * q_x)` and, for Q4_K/Q5_K, of `min *
sum(q_x)`, then `d_x * (d_w * sumi - dmin_w * summ)`.

The weights are kept as the file's blocks, byte for byte (no repacking: a
row is `k / 256` blocks of 144, 176 or 210 bytes). Q4_K and Q6_K together
make up the common `Q4_K_M` files, Q5_K and Q6_K the `Q5_K_M` ones.

[`Isa::Avx2`] has 256-bit kernels (`maddubs`, then `madd` with the
sub-blocks' scales); [`Isa::Avx512`] has 512-bit VNNI ones (`vpdpbusd` on
64 weights at a time, then `vpdpwssd` with the scales, see `x86::avx512`).
Both compute every block's integer sum exactly, so they differ from the
scalar reference only in the order of the f32 additions. Both take one
weight row with up to four activation rows: a block's quants, scales, mins
and `d`s are decoded once for all of them, and each row's f32 operations
are those it does alone.
*/

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use crate::q8k::{Q8KRows, QK_K};
use crate::{input_rows, par_rows, Isa, RowsDot};

/// A k-quant weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KQuant {
    /// 4-bit quants, 6-bit scales and mins per 32 (4.5 bits per weight).
    Q4K,
    /// 5-bit quants, 6-bit scales and mins per 32 (5.5 bits per weight).
    Q5K,
    /// 6-bit quants, 8-bit scales per 16 (6.5625 bits per weight).
    Q6K,
}

impl KQuant {
    /// Bytes of one super-block of 256 values.
    pub fn block_bytes(self) -> usize {
        match self {
            KQuant::Q4K => 144,
            KQuant::Q5K => 176,
            KQuant::Q6K => 210,
        }
    }

    /// The GGML name (`Q4_K`, ...).
    pub fn name(self) -> &'static str {
        match self {
            KQuant::Q4K => "Q4_K",
            KQuant::Q5K => "Q5_K",
            KQuant::Q6K => "Q6_K",
        }
    }

    /// The format of a candle dtype, if it is one of these.
    pub fn from_dtype(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(KQuant::Q4K),
            GgmlDType::Q5K => Some(KQuant::Q5K),
            GgmlDType::Q6K => Some(KQuant::Q6K),
            _ => None,
        }
    }
}

/// A k-quant weight matrix `[n, k]` ready to multiply activations `[.., k]` into `[.., n]`.
#[derive(Clone)]
pub struct KQuantMatMul {
    kind: KQuant,
    n: usize,
    k: usize,
    /// The file's blocks, row-major.
    blocks: Vec<u8>,
    isa: Isa,
}

impl std::fmt::Debug for KQuantMatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KQuantMatMul")
            .field("kind", &self.kind)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("isa", &self.isa)
            .finish()
    }
}

impl KQuantMatMul {
    /// Takes the weights of a 2-D Q4_K/Q5_K/Q6_K `QTensor` of shape `[n, k]`.
    /// `None` for another dtype or shape, or if its bytes cannot be read.
    pub fn from_qtensor(t: &QTensor) -> Option<Self> {
        let kind = KQuant::from_dtype(t.dtype())?;
        let (n, k) = t.shape().dims2().ok()?;
        let data = t.data().ok()?;
        Self::from_blocks(kind, n, k, &data)
    }

    /// Builds from raw GGUF blocks of `kind` for a `[n, k]` matrix. `None` if
    /// `k` is not a positive multiple of 256 or the byte count does not match.
    pub fn from_blocks(kind: KQuant, n: usize, k: usize, blocks: impl AsRef<[u8]>) -> Option<Self> {
        let blocks = blocks.as_ref();
        if k == 0 || !k.is_multiple_of(QK_K) || blocks.len() != n * (k / QK_K) * kind.block_bytes()
        {
            return None;
        }
        let isa = Isa::detect();
        tracing::trace!(n, k, ?isa, kind = kind.name(), "k-quant matmul");
        Some(Self {
            kind,
            n,
            k,
            blocks: blocks.to_vec(),
            isa,
        })
    }

    /// One matrix with the rows of `parts` one after another (same format and
    /// `k`), for projections that read the same input. `None` if `parts` is
    /// empty or they differ in format or `k`.
    pub fn stack_rows(parts: &[&KQuantMatMul]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.k != first.k || p.kind != first.kind) {
            return None;
        }
        let mut out = Self {
            kind: first.kind,
            n: 0,
            k: first.k,
            blocks: Vec::new(),
            isa: first.isa,
        };
        for p in parts {
            out.n += p.n;
            out.blocks.extend_from_slice(&p.blocks);
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

    /// The instruction set in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The weight format.
    pub fn kind(&self) -> KQuant {
        self.kind
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
        let (xs, m, mut out_dims) = input_rows(self.kind.name(), x, self.k)?;
        let q = Q8KRows::quantize(&xs, m, self.k);
        let mut out = vec![0f32; m * self.n];
        self.matmul_q8k(&q, &mut out);
        out_dims.push(self.n);
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }

    /// `out[r * n + j] = dot(activation row r, weight row j)` for already
    /// quantized activations, spread over the worker pool. Each output is
    /// computed on its own, so a row's result does not depend on the others.
    ///
    /// # Panics
    /// If `q` was not quantized with this matrix's `k` or `out` is not `q.rows() * n` long.
    pub fn matmul_q8k(&self, q: &Q8KRows, out: &mut [f32]) {
        assert_eq!(q.k(), self.k, "activations quantized for another k");
        // Checked once per call rather than per dot product.
        assert!(
            self.isa.available(),
            "{:?} kernels on a CPU without them",
            self.isa
        );
        par_rows(self.n, self.k, q.rows(), out, KQuantRows { mm: self, q });
    }
}

/// The k-quant dot products of one [`KQuantMatMul::matmul_q8k`] call; built
/// only after that call has checked that `mm.isa` is available.
struct KQuantRows<'a> {
    mm: &'a KQuantMatMul,
    q: &'a Q8KRows,
}

impl RowsDot for KQuantRows<'_> {
    #[inline]
    fn dot<const R: usize>(&self, j: usize, r: usize) -> [f32; R] {
        let (mm, q) = (self.mm, self.q);
        let row_bytes = mm.k / QK_K * mm.kind.block_bytes();
        let w = &mm.blocks[j * row_bytes..(j + 1) * row_bytes];
        let xs = std::array::from_fn(|i| XRow {
            qs: q.row_qs(r + i),
            d: q.row_d(r + i),
            bsums: q.row_bsums(r + i),
        });
        // SAFETY: `matmul_q8k` asserted that `mm.isa` is available before
        // building this `KQuantRows`.
        unsafe { dot(mm.kind, mm.isa, w, &xs) }
    }
}

/// One Q8_K activation row.
pub(crate) struct XRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub bsums: &'a [i16],
}

/// The dot products of one weight row (`w`, whole blocks of `kind`) with
/// each row of `xs`; element `i` is bit for bit what `xs[i]` alone gives.
///
/// # Safety
/// `isa` must be available on this CPU ([`Isa::available`]).
///
/// # Panics
/// If the rows do not hold the same number of blocks.
unsafe fn dot<const R: usize>(kind: KQuant, isa: Isa, w: &[u8], xs: &[XRow<'_>; R]) -> [f32; R] {
    let nb = w.len() / kind.block_bytes();
    assert!(
        w.len() == nb * kind.block_bytes()
            && xs.iter().all(|x| x.d.len() == nb
                && x.qs.len() == nb * QK_K
                && x.bsums.len() == nb * QK_K / 16),
        "block counts"
    );
    match isa {
        Isa::Scalar => std::array::from_fn(|i| match kind {
            KQuant::Q4K => dot_q4k(w, &xs[i]),
            KQuant::Q5K => dot_q5k(w, &xs[i]),
            KQuant::Q6K => dot_q6k(w, &xs[i]),
        }),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: the CPU supports avx512f/bw/vl/vnni, avx2, fma and f16c
            // (caller), and every slice holds `nb` blocks (asserted above).
            unsafe {
                match kind {
                    KQuant::Q4K => x86::avx512::dot_q4k(w, xs),
                    KQuant::Q5K => x86::avx512::dot_q5k(w, xs),
                    KQuant::Q6K => x86::avx512::dot_q6k(w, xs),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: the CPU supports avx2, fma and f16c (caller), and
            // every slice holds `nb` blocks (asserted above).
            unsafe {
                match kind {
                    KQuant::Q4K => x86::dot_q4k(w, xs),
                    KQuant::Q5K => x86::dot_q5k(w, xs),
                    KQuant::Q6K => x86::dot_q6k(w, xs),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        // SAFETY: the scalar kernels run anywhere.
        _ => unsafe { dot(kind, Isa::Scalar, w, xs) },
    }
}

/// The f32 value of the f16 at `b[at..at + 2]`.
#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 8 six-bit scales and 8 six-bit mins of a Q4_K/Q5_K block's 12 scale bytes.
#[inline]
pub(crate) fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// `sum over the 8 sub-blocks of min * sum(q_x)` for one block.
#[inline]
fn mins_sum(mn: &[u8; 8], bsums: &[i16]) -> i32 {
    (0..8)
        .map(|s| i32::from(mn[s]) * (i32::from(bsums[2 * s]) + i32::from(bsums[2 * s + 1])))
        .sum()
}

/// Q4_K block (144 bytes): `d`, `dmin` (f16), 12 scale bytes, 128 nibble
/// bytes; 64 values per 32 bytes, low nibbles first.
fn dot_q4k(w: &[u8], x: &XRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let (sc, mn) = scales_mins(&blk[4..16]);
        let qs = &blk[16..144];
        let xq = &x.qs[b * QK_K..(b + 1) * QK_K];
        let mut sumi = 0i32;
        for j in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let byte = qs[32 * j + l];
                lo += i32::from(byte & 0x0F) * i32::from(xq[64 * j + l]);
                hi += i32::from(byte >> 4) * i32::from(xq[64 * j + 32 + l]);
            }
            sumi += i32::from(sc[2 * j]) * lo + i32::from(sc[2 * j + 1]) * hi;
        }
        let summ = mins_sum(&mn, &x.bsums[b * 16..(b + 1) * 16]);
        sum += x.d[b] * (f16_at(blk, 0) * sumi as f32 - f16_at(blk, 2) * summ as f32);
    }
    sum
}

/// Q5_K block (176 bytes): `d`, `dmin`, 12 scale bytes, 32 bytes of fifth
/// bits (bit `2j` / `2j + 1` for the low / high nibbles of 64-chunk `j`),
/// 128 nibble bytes.
fn dot_q5k(w: &[u8], x: &XRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (b, blk) in w.chunks_exact(176).enumerate() {
        let (sc, mn) = scales_mins(&blk[4..16]);
        let qh = &blk[16..48];
        let qs = &blk[48..176];
        let xq = &x.qs[b * QK_K..(b + 1) * QK_K];
        let mut sumi = 0i32;
        for j in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let byte = qs[32 * j + l];
                let vl = (byte & 0x0F) | (((qh[l] >> (2 * j)) & 1) << 4);
                let vh = (byte >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
                lo += i32::from(vl) * i32::from(xq[64 * j + l]);
                hi += i32::from(vh) * i32::from(xq[64 * j + 32 + l]);
            }
            sumi += i32::from(sc[2 * j]) * lo + i32::from(sc[2 * j + 1]) * hi;
        }
        let summ = mins_sum(&mn, &x.bsums[b * 16..(b + 1) * 16]);
        sum += x.d[b] * (f16_at(blk, 0) * sumi as f32 - f16_at(blk, 2) * summ as f32);
    }
    sum
}

/// Q6_K block (210 bytes): 128 bytes of low nibbles, 64 bytes of high bit
/// pairs, 16 signed scales (one per 16 values), `d`; a weight is
/// `d * scale * (q - 32)`.
fn dot_q6k(w: &[u8], x: &XRow<'_>) -> f32 {
    let mut sum = 0f32;
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let xq = &x.qs[b * QK_K..(b + 1) * QK_K];
        let sc = |s: usize| i32::from(blk[192 + s] as i8);
        let mut sumi = 0i32;
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
            let y = &xq[128 * h..128 * h + 128];
            for l in 0..32 {
                let is = 8 * h + l / 16;
                let q1 = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                let q2 = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                let q3 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                let q4 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                sumi += sc(is) * i32::from(q1) * i32::from(y[l])
                    + sc(is + 2) * i32::from(q2) * i32::from(y[l + 32])
                    + sc(is + 4) * i32::from(q3) * i32::from(y[l + 64])
                    + sc(is + 6) * i32::from(q4) * i32::from(y[l + 96]);
            }
        }
        let bs = &x.bsums[b * 16..(b + 1) * 16];
        let offset: i32 = (0..16).map(|s| sc(s) * i32::from(bs[s])).sum();
        sum += x.d[b] * f16_at(blk, 208) * (sumi - 32 * offset) as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{scales_mins, XRow};
    use crate::lanes::hsum256;
    use crate::q8k::QK_K;

    /// The f32 value of the f16 at `b[at..at + 2]` with F16C (exact, as
    /// [`super::f16_at`] but without its run-time feature check).
    #[inline]
    #[target_feature(enable = "f16c")]
    fn f16_at(b: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// The 8 mins as 16 i16 lanes, each repeated for its two 16-sums (the
    /// weights' half of the mins term, see [`mins_lanes`]).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mins_pairs(mn: &[u8; 8]) -> __m256i {
        let m8 = _mm_set_epi64x(0, i64::from_le_bytes(*mn));
        let dup = _mm_shuffle_epi8(
            m8,
            _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
        );
        _mm256_cvtepu8_epi16(dup)
    }

    /// `sum(min_s * (bsum_2s + bsum_2s+1))` in 8 i32 lanes: `madd` of the
    /// [`mins_pairs`] with a row's 16 sums adds each pair.
    ///
    /// Safety: `bsums` points to 16 readable values.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mins_lanes(pairs: __m256i, bsums: *const i16) -> __m256i {
        // SAFETY: 16 i16s at `bsums` (caller); unaligned load.
        let bs = unsafe { _mm256_loadu_si256(bsums as *const __m256i) };
        _mm256_madd_epi16(pairs, bs)
    }

    /// Q4_K and Q5_K: the scale and mins terms of block `b` for each row
    /// (`accm += dx * dmin * mins`), the block's 32-byte pieces of 64 values
    /// as `quants(j)` (unpacked once for all rows), and `acc += dx * d *
    /// sumi` per row. `maddubs` (u8 x i8 pairs, at most 2 * 31 * 127) then
    /// `madd` with the sub-block's scale widens to i32: exact integer sums
    /// per block, one f32 FMA per block and row.
    ///
    /// Safety: avx2, fma, f16c available; `blk` is a whole Q4_K/Q5_K block,
    /// and every row of `xs` holds block `b`'s quants and sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_q45k<const R: usize>(
        blk: &[u8],
        b: usize,
        xs: &[XRow<'_>; R],
        acc: &mut [__m256; R],
        accm: &mut [__m256; R],
        mut quants: impl FnMut(usize) -> (__m256i, __m256i),
    ) {
        let (sc, mn) = scales_mins(&blk[4..16]);
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let pairs = mins_pairs(&mn);
        for (x, accm) in xs.iter().zip(accm.iter_mut()) {
            // SAFETY: block b's 16 sums exist (caller).
            let pm = unsafe { mins_lanes(pairs, x.bsums.as_ptr().add(b * 16)) };
            fma_lanes(accm, x.d[b] * dmin, pm);
        }
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            let (lo, hi) = quants(j);
            let (sl, sh) = (
                _mm256_set1_epi16(i16::from(sc[2 * j])),
                _mm256_set1_epi16(i16::from(sc[2 * j + 1])),
            );
            for (x, sumi) in xs.iter().zip(sumi.iter_mut()) {
                // SAFETY: 64 quants at 64j < 256 of block b's activations (caller);
                // unaligned loads.
                let (xl, xh) = unsafe {
                    let xq = x.qs.as_ptr().add(b * QK_K + 64 * j);
                    (
                        _mm256_loadu_si256(xq as *const __m256i),
                        _mm256_loadu_si256(xq.add(32) as *const __m256i),
                    )
                };
                let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), sl);
                let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sh);
                *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(pl, ph));
            }
        }
        for ((x, acc), sumi) in xs.iter().zip(acc.iter_mut()).zip(sumi) {
            fma_lanes(acc, x.d[b] * d, sumi);
        }
    }

    /// `acc += scale * f32(v)` lane by lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fma_lanes(acc: &mut __m256, scale: f32, v: __m256i) {
        *acc = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(v), *acc);
    }

    /// Q4_K: per 64 values one 32-byte load of nibbles, low and high
    /// nibbles against their 32 activation bytes (see [`block_q45k`]).
    ///
    /// Safety: avx2, fma, f16c available; `w` holds the rows' block count
    /// of blocks and every row of `xs` their quants and sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4k<const R: usize>(w: &[u8], xs: &[XRow<'_>; R]) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut accm = [_mm256_setzero_ps(); R];
        for (b, blk) in w.chunks_exact(144).enumerate() {
            let qs = blk[16..].as_ptr();
            let quants = |j: usize| {
                // SAFETY: 32 nibble bytes at 16 + 32j < 144 of the block; unaligned load.
                let q4 = unsafe { _mm256_loadu_si256(qs.add(32 * j) as *const __m256i) };
                (
                    _mm256_and_si256(q4, m4),
                    _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4),
                )
            };
            // SAFETY: a whole block; the rows hold block b (caller).
            unsafe { block_q45k(blk, b, xs, &mut acc, &mut accm, quants) };
        }
        std::array::from_fn(|i| hsum256(acc[i]) - hsum256(accm[i]))
    }

    /// Q5_K: as Q4_K, with each value's fifth bit taken from the block's 32
    /// `qh` bytes (shifted right by 2 per 64 values) and or-ed in as 16.
    ///
    /// Safety: as [`dot_q4k`], with 176-byte blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q5k<const R: usize>(w: &[u8], xs: &[XRow<'_>; R]) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut accm = [_mm256_setzero_ps(); R];
        for (b, blk) in w.chunks_exact(176).enumerate() {
            let qs = blk[48..].as_ptr();
            // SAFETY: the block's 32 `qh` bytes at 16..48; unaligned load.
            let mut qh = unsafe { _mm256_loadu_si256(blk[16..].as_ptr() as *const __m256i) };
            // Called for j = 0, 1, 2, 3 in order: the fifth bits of piece j are
            // bits 2j and 2j + 1 of each `qh` byte, shifted down after each piece.
            let quants = |j: usize| {
                // SAFETY: 32 nibble bytes at 48 + 32j < 176 of the block; unaligned load.
                let q4 = unsafe { _mm256_loadu_si256(qs.add(32 * j) as *const __m256i) };
                let hl = _mm256_slli_epi16(_mm256_and_si256(qh, one), 4);
                let hh = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4);
                qh = _mm256_srli_epi16(qh, 2);
                (
                    _mm256_or_si256(_mm256_and_si256(q4, m4), hl),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), hh),
                )
            };
            // SAFETY: a whole block; the rows hold block b (caller).
            unsafe { block_q45k(blk, b, xs, &mut acc, &mut accm, quants) };
        }
        std::array::from_fn(|i| hsum256(acc[i]) - hsum256(accm[i]))
    }

    /// Q6_K: per 128 values, two loads of low nibbles and one of high bit
    /// pairs rebuild four vectors of 6-bit quants (0..=63), once for all
    /// rows; `maddubs` with each row's activations (at most 2 * 63 * 127),
    /// `madd` with the two 16-value sub-blocks' scales; the `- 32` is taken
    /// back once per block and row as `32 * sum(scale * bsum)`.
    ///
    /// Safety: as [`dot_q4k`], with 210-byte blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q6k<const R: usize>(w: &[u8], xs: &[XRow<'_>; R]) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        // Byte shuffles putting scale 2k in bytes 0..8 and 2k + 1 in 8..16.
        let mut picks = [_mm_setzero_si128(); 8];
        for (k, pick) in picks.iter_mut().enumerate() {
            let (a, b) = (2 * k as i8, 2 * k as i8 + 1);
            *pick = _mm_setr_epi8(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
        }
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, blk) in w.chunks_exact(210).enumerate() {
            let p = blk.as_ptr();
            // SAFETY: 16 scale bytes at 192..208 of the block.
            let scales = unsafe { _mm_loadu_si128(p.add(192) as *const __m128i) };
            let scales16 = _mm256_cvtepi8_epi16(scales);
            let mut sumi = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                // SAFETY: 64 bytes at 64h < 128 (low nibbles), 32 bytes at
                // 128 + 32h < 192 (high bits).
                let (ql0, ql1, qh) = unsafe {
                    (
                        _mm256_loadu_si256(p.add(64 * h) as *const __m256i),
                        _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i),
                        _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i),
                    )
                };
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4),
                    ),
                ];
                for (i, q) in q.into_iter().enumerate() {
                    let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, picks[4 * h + i]));
                    for (x, sumi) in xs.iter().zip(sumi.iter_mut()) {
                        // SAFETY: 32 activations at 128h + 32i < 256 of block b's
                        // (caller); unaligned load.
                        let y = unsafe {
                            _mm256_loadu_si256(
                                x.qs.as_ptr().add(b * QK_K + 128 * h + 32 * i) as *const __m256i
                            )
                        };
                        let p16 = _mm256_maddubs_epi16(q, y);
                        *sumi = _mm256_add_epi32(*sumi, _mm256_madd_epi16(p16, sc));
                    }
                }
            }
            let d = f16_at(blk, 208);
            for ((x, acc), sumi) in xs.iter().zip(acc.iter_mut()).zip(sumi) {
                // SAFETY: block b's 16 sums (caller); unaligned load.
                let bs =
                    unsafe { _mm256_loadu_si256(x.bsums.as_ptr().add(b * 16) as *const __m256i) };
                let offset = _mm256_madd_epi16(scales16, bs);
                let total = _mm256_sub_epi32(sumi, _mm256_slli_epi32(offset, 5));
                fma_lanes(acc, x.d[b] * d, total);
            }
        }
        std::array::from_fn(|i| hsum256(acc[i]))
    }

    /// The AVX-512 VNNI kernels.
    ///
    /// Per 64 weights, one 512-bit vector of unsigned quants (unpacked once
    /// per block for all rows) meets 64 contiguous activation bytes of each
    /// row in one `vpdpbusd` (u8 x i8 quads into 16 i32 lanes, each at most
    /// 4 * 63 * 128 = 32256 in magnitude, so they fit in i16). Two such
    /// vectors are narrowed to i16 with `vpackssdw` (exact, no saturation)
    /// and multiplied by their sub-blocks' scales with `vpdpwssd` (i16 pairs
    /// into i32 lanes): the block's exact integer sum, then one f32 FMA per
    /// block and row. `vpackssdw` interleaves its two sources per 128-bit
    /// lane, so the scale vectors are permuted to match (`scale_picks`).
    pub(super) mod avx512 {
        use std::arch::x86_64::*;

        use super::super::{scales_mins, XRow};
        use super::{f16_at, fma_lanes, hsum256, mins_lanes, mins_pairs};
        use crate::q8k::QK_K;

        /// Word indices for `vpermw`: word `8L + p` (128-bit lane `L`,
        /// position `p`) of the result picks scale `pick(L, p >= 4)`, the
        /// scale of the values behind that word after `vpackssdw` (positions
        /// 0..4 from its first source, 4..8 from its second).
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn scale_picks(pick: impl Fn(usize, bool) -> usize) -> __m512i {
            let idx: [i16; 32] = std::array::from_fn(|w| pick(w / 8, w % 8 >= 4) as i16);
            // SAFETY: 64 bytes of `idx`; unaligned load.
            unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) }
        }

        /// `sumi += scales * pack(dpbusd(w0, x[0..64]), dpbusd(w1, x[64..128]))`
        /// for one row's 128 activations at `xq` (see the module docs).
        ///
        /// Safety: 128 readable bytes at `xq`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        unsafe fn sum128(
            sumi: &mut __m512i,
            (w0, w1): (__m512i, __m512i),
            scales: __m512i,
            xq: *const i8,
        ) {
            // SAFETY: 128 bytes at `xq` (caller); unaligned loads.
            let (x0, x1) = unsafe {
                (
                    _mm512_loadu_si512(xq as *const __m512i),
                    _mm512_loadu_si512(xq.add(64) as *const __m512i),
                )
            };
            let zero = _mm512_setzero_si512();
            let p = _mm512_packs_epi32(
                _mm512_dpbusd_epi32(zero, w0, x0),
                _mm512_dpbusd_epi32(zero, w1, x1),
            );
            *sumi = _mm512_dpwssd_epi32(*sumi, p, scales);
        }

        /// Q4_K and Q5_K: the mins term of block `b` for each row (`accm +=
        /// dx * dmin * mins`, as the AVX2 kernel), the block's quants as
        /// `quants(j)` for j = 0..4 in order (64 values each: sub-block 2j in
        /// the low 32 bytes, 2j + 1 in the high ones, unpacked once for all
        /// rows), and `acc += dx * d * sumi` per row.
        ///
        /// Safety: avx512f/bw/vl/vnni, avx2, fma, f16c available; `blk` is a
        /// whole Q4_K/Q5_K block, and every row of `xs` holds block `b`'s
        /// quants and sums.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn block_q45k<const R: usize>(
            blk: &[u8],
            b: usize,
            xs: &[XRow<'_>; R],
            acc: &mut [__m512; R],
            accm: &mut [__m256; R],
            picks: &[__m512i; 2],
            mut quants: impl FnMut(usize) -> __m512i,
        ) {
            let (sc, mn) = scales_mins(&blk[4..16]);
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let pairs = mins_pairs(&mn);
            for (x, accm) in xs.iter().zip(accm.iter_mut()) {
                // SAFETY: block b's 16 sums exist (caller).
                let pm = unsafe { mins_lanes(pairs, x.bsums.as_ptr().add(b * 16)) };
                fma_lanes(accm, x.d[b] * dmin, pm);
            }
            let sc16 = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi64x(
                0,
                i64::from_le_bytes(sc),
            )));
            let mut sumi = [_mm512_setzero_si512(); R];
            for (h, &pick) in picks.iter().enumerate() {
                let w = (quants(2 * h), quants(2 * h + 1));
                let scales = _mm512_permutexvar_epi16(pick, sc16);
                for (x, sumi) in xs.iter().zip(sumi.iter_mut()) {
                    // SAFETY: 128 activations at 128h of block b (caller).
                    unsafe { sum128(sumi, w, scales, x.qs.as_ptr().add(b * QK_K + 128 * h)) };
                }
            }
            for ((x, acc), sumi) in xs.iter().zip(acc.iter_mut()).zip(sumi) {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(x.d[b] * d), _mm512_cvtepi32_ps(sumi), *acc);
            }
        }

        /// The [`scale_picks`] of Q4_K/Q5_K: pieces 2h and 2h + 1 hold
        /// sub-blocks 4h + L / 2 (first source) and 4h + 2 + L / 2 (second)
        /// in 128-bit lane `L`.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn q45k_picks() -> [__m512i; 2] {
            std::array::from_fn(|h| {
                scale_picks(|l, second| 4 * h + l / 2 + 2 * usize::from(second))
            })
        }

        /// Q4_K: per 64 values a 32-byte load of nibbles, its low nibbles in
        /// the low half of a 512-bit vector and its high nibbles in the high
        /// half (values 64j..64j + 32 and 64j + 32..64j + 64).
        ///
        /// Safety: avx512f/bw/vl/vnni, avx2, fma, f16c available; `w` holds
        /// the rows' block count of blocks and every row of `xs` their quants
        /// and sums.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub(in super::super) unsafe fn dot_q4k<const R: usize>(
            w: &[u8],
            xs: &[XRow<'_>; R],
        ) -> [f32; R] {
            let m4 = _mm512_set1_epi8(0x0F);
            let picks = q45k_picks();
            let mut acc = [_mm512_setzero_ps(); R];
            let mut accm = [_mm256_setzero_ps(); R];
            for (b, blk) in w.chunks_exact(144).enumerate() {
                let qs = blk[16..].as_ptr();
                let quants = |j: usize| {
                    // SAFETY: 32 nibble bytes at 16 + 32j < 144 of the block;
                    // unaligned load.
                    let q4 = unsafe { _mm256_loadu_si256(qs.add(32 * j) as *const __m256i) };
                    let both =
                        _mm512_inserti64x4(_mm512_castsi256_si512(q4), _mm256_srli_epi16(q4, 4), 1);
                    _mm512_and_si512(both, m4)
                };
                // SAFETY: a whole block; the rows hold block b (caller).
                unsafe { block_q45k(blk, b, xs, &mut acc, &mut accm, &picks, quants) };
            }
            std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]) - hsum256(accm[i]))
        }

        /// Q5_K: as Q4_K, with the fifth bits from the 32 `qh` bytes: bit 2j
        /// of each byte for the low half of piece j, bit 2j + 1 for the high
        /// half, or-ed in as 16.
        ///
        /// Safety: as [`dot_q4k`], with 176-byte blocks.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub(in super::super) unsafe fn dot_q5k<const R: usize>(
            w: &[u8],
            xs: &[XRow<'_>; R],
        ) -> [f32; R] {
            let m4 = _mm512_set1_epi8(0x0F);
            let one = _mm512_set1_epi8(1);
            let picks = q45k_picks();
            let mut acc = [_mm512_setzero_ps(); R];
            let mut accm = [_mm256_setzero_ps(); R];
            for (b, blk) in w.chunks_exact(176).enumerate() {
                let qs = blk[48..].as_ptr();
                // SAFETY: the block's 32 `qh` bytes at 16..48; unaligned load.
                let qh = unsafe { _mm256_loadu_si256(blk[16..].as_ptr() as *const __m256i) };
                // Bit 0 of each byte: the fifth bit of piece 0's low half (low
                // 32 bytes) and high half (high 32 bytes); shifted down by 2
                // after each piece (bits shifted in from the next byte stay
                // above bit 0).
                let mut hb =
                    _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 1), 1);
                // Called for j = 0, 1, 2, 3 in order.
                let quants = |j: usize| {
                    // SAFETY: 32 nibble bytes at 48 + 32j < 176 of the block;
                    // unaligned load.
                    let q4 = unsafe { _mm256_loadu_si256(qs.add(32 * j) as *const __m256i) };
                    let both =
                        _mm512_inserti64x4(_mm512_castsi256_si512(q4), _mm256_srli_epi16(q4, 4), 1);
                    let fifth = _mm512_slli_epi16(_mm512_and_si512(hb, one), 4);
                    hb = _mm512_srli_epi16(hb, 2);
                    _mm512_or_si512(_mm512_and_si512(both, m4), fifth)
                };
                // SAFETY: a whole block; the rows hold block b (caller).
                unsafe { block_q45k(blk, b, xs, &mut acc, &mut accm, &picks, quants) };
            }
            std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]) - hsum256(accm[i]))
        }

        /// Q6_K: per 128 values one 64-byte load of low nibbles and one
        /// 32-byte load of high bit pairs make two vectors of 6-bit quants
        /// (0..=63) for 64 contiguous values each, once for all rows. Each
        /// row's block sum starts at `-32 * sum(scale * bsum)` (the `- 32`
        /// of every weight, taken back exactly) and the sub-blocks' signed
        /// scales multiply with `vpdpwssd`.
        ///
        /// Safety: as [`dot_q4k`], with 210-byte blocks.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        pub(in super::super) unsafe fn dot_q6k<const R: usize>(
            w: &[u8],
            xs: &[XRow<'_>; R],
        ) -> [f32; R] {
            let m4 = _mm512_set1_epi8(0x0F);
            let m2 = _mm512_set1_epi8(3);
            // Half h: values 128h..128h + 64 (sub-blocks 8h + L) first,
            // 128h + 64..128h + 128 (8h + 4 + L) second.
            let picks: [__m512i; 2] = std::array::from_fn(|h| {
                scale_picks(|l, second| 8 * h + l + 4 * usize::from(second))
            });
            let mut acc = [_mm512_setzero_ps(); R];
            for (b, blk) in w.chunks_exact(210).enumerate() {
                let p = blk.as_ptr();
                // SAFETY: 16 scale bytes at 192..208 of the block; unaligned load.
                let sc16 =
                    _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(p.add(192) as *const __m128i) });
                // -32 * scale fits in i16 (scales are i8).
                let off = _mm256_mullo_epi16(sc16, _mm256_set1_epi16(-32));
                let sc16 = _mm512_zextsi256_si512(sc16);
                let mut sumi: [__m512i; R] = std::array::from_fn(|i| {
                    // SAFETY: block b's 16 sums (caller); unaligned load.
                    let bs = unsafe {
                        _mm256_loadu_si256(xs[i].bsums.as_ptr().add(b * 16) as *const __m256i)
                    };
                    _mm512_zextsi256_si512(_mm256_madd_epi16(off, bs))
                });
                for (h, &pick) in picks.iter().enumerate() {
                    // SAFETY: 64 bytes at 64h < 128 (low nibbles), 32 bytes at
                    // 128 + 32h < 192 (high bits); unaligned loads.
                    let (ql, qh) = unsafe {
                        (
                            _mm512_loadu_si512(p.add(64 * h) as *const __m512i),
                            _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i),
                        )
                    };
                    // Bits 0..2 of each byte: the high bits of the values in
                    // the first 32 (qh) and second 32 (qh >> 2) bytes of `ql`'s
                    // low nibbles; bits 4..6 those of its high nibbles.
                    let hb =
                        _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
                    let q0 = _mm512_or_si512(
                        _mm512_and_si512(ql, m4),
                        _mm512_slli_epi16(_mm512_and_si512(hb, m2), 4),
                    );
                    let q1 = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                        _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 4), m2), 4),
                    );
                    let scales = _mm512_permutexvar_epi16(pick, sc16);
                    for (x, sumi) in xs.iter().zip(sumi.iter_mut()) {
                        // SAFETY: 128 activations at 128h of block b (caller).
                        unsafe {
                            sum128(
                                sumi,
                                (q0, q1),
                                scales,
                                x.qs.as_ptr().add(b * QK_K + 128 * h),
                            )
                        };
                    }
                }
                let d = f16_at(blk, 208);
                for ((x, acc), sumi) in xs.iter().zip(acc.iter_mut()).zip(sumi) {
                    *acc =
                        _mm512_fmadd_ps(_mm512_set1_ps(x.d[b] * d), _mm512_cvtepi32_ps(sumi), *acc);
                }
            }
            std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]))
        }
    }
}
