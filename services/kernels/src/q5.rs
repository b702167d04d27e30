/*!
GGUF Q5_0 and Q5_1 weights times activations quantized to Q8 ([`Q8Rows`]).
Q5_0 blocks of 32 hold `d` (f16), 32 fifth bits and 16 nibble bytes, a
weight being `d * (q - 16)` with `q` in 0..=31: per block `d_w * d_x *
(sum(q_w * q_x) - 16 * sum(q_x))`, ggml's `ggml_vec_dot_q5_0_q8_0`. Q5_1
blocks add `m` (f16) after `d`, a weight being `d * q + m`: per block `d_w *
d_x * sum(q_w * q_x) + m_w * s_x`, ggml's `ggml_vec_dot_q5_1_q8_1`. Integer
sums are exact: the weights stay unsigned (0..=31, as `maddubs` and
`vpdpbusd` take them) and Q5_0's `16 * sum(q_x)` comes off each block's i32
sum from the activations' exact block sums. k-quant files use these for the
matrices whose rows are not a multiple of 256 long (`Q4_K_M` takes Q5_0,
`Q5_K_M` Q5_1): the demo model's 576-column matrices, Gemma 3 270M's
640-column ones.

At load the blocks' fields are split into nibbles, scales and two arrays of
fifth bits, those of each block's values 0..16 and those of its values
16..32 (every bit kept), so that the fifth bits of consecutive blocks line
up with their low or high nibbles in one load. [`Isa::Avx2`] has a 256-bit
kernel (two blocks per step; the fifth bits spread to bytes with a shuffle,
an `and` and a compare, then or-ed in as 16; `maddubs`, `madd`);
[`Isa::Avx512`] a VNNI one (four blocks per step; the fifth bits of the four
blocks' low or high halves are a 64-bit mask that adds 16 to the nibbles in
one masked byte add; `vpdpbusd`). Both take up to four activation rows at
once: the weights' 5-bit quants and scales are rebuilt once for all of them,
and each row's f32 operations are those it does alone. The AVX-512 kernel
also takes two weight rows at once (with several activation rows; see
`par_rows`), loading each activation row's quants once for both.
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
    /// The fifth bits of each block's values 0..16 (bit `i` for value `i`).
    qhl: Vec<u16>,
    /// The fifth bits of each block's values 16..32 (bit `i` for value `16 + i`).
    qhh: Vec<u16>,
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
        let mut qhl = Vec::with_capacity(count);
        let mut qhh = Vec::with_capacity(count);
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
            qhl.push(u16::from_le_bytes([rest[0], rest[1]]));
            qhh.push(u16::from_le_bytes([rest[2], rest[3]]));
            qs.extend_from_slice(&rest[4..]);
        }
        Some(Self {
            n,
            k,
            m,
            qs,
            qhl,
            qhh,
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
            qhl: Vec::new(),
            qhh: Vec::new(),
            d: Vec::new(),
            isa: first.isa,
        };
        for p in parts {
            out.n += p.n;
            out.qs.extend_from_slice(&p.qs);
            out.qhl.extend_from_slice(&p.qhl);
            out.qhh.extend_from_slice(&p.qhh);
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
        // Checked once per call rather than per dot product.
        assert!(
            self.isa.available(),
            "{:?} kernels on a CPU without them",
            self.isa
        );
        par_rows(self.n, self.k, q.rows(), out, Q5Rows { mm: self, q });
    }
}

/// The Q5_0/Q5_1 dot products of one [`Q5MatMul::matmul_q8`] call; built
/// only after that call has checked that `mm.isa` is available.
struct Q5Rows<'a> {
    mm: &'a Q5MatMul,
    q: &'a Q8Rows,
}

impl Q5Rows<'_> {
    /// Weight row `j`.
    #[inline]
    fn wrow(&self, j: usize) -> WRow<'_> {
        let mm = self.mm;
        let nb = mm.k / QK;
        WRow {
            qs: &mm.qs[j * nb * QK / 2..(j + 1) * nb * QK / 2],
            qhl: &mm.qhl[j * nb..(j + 1) * nb],
            qhh: &mm.qhh[j * nb..(j + 1) * nb],
            d: &mm.d[j * nb..(j + 1) * nb],
            m: mm.m.get(j * nb..(j + 1) * nb),
        }
    }
}

impl RowsDot for Q5Rows<'_> {
    #[inline]
    fn dot<const R: usize>(&self, j: usize, r: usize) -> [f32; R] {
        let [out] = self.dots::<1, R>(j, r);
        out
    }

    #[inline]
    fn dots<const W: usize, const R: usize>(&self, j: usize, r: usize) -> [[f32; R]; W] {
        let q = self.q;
        let ws = std::array::from_fn(|i| self.wrow(j + i));
        let xs = std::array::from_fn(|i| XRow {
            qs: q.row_qs(r + i),
            d: q.row_d(r + i),
            s: q.row_s(r + i),
            isum: q.row_isum(r + i),
        });
        // SAFETY: `matmul_q8` asserted that `mm.isa` is available before
        // building this `Q5Rows`.
        unsafe { dot(self.mm.isa, &ws, &xs) }
    }
}

/// One weight row; `m` only for Q5_1.
struct WRow<'a> {
    qs: &'a [u8],
    qhl: &'a [u16],
    qhh: &'a [u16],
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

/// The dot products of each row of `ws` with each row of `xs`; element
/// `[v][i]` is bit for bit what `ws[v]` and `xs[i]` alone give.
///
/// # Safety
/// `isa` must be available on this CPU ([`Isa::available`]).
///
/// # Panics
/// If the rows hold different block counts or the weight rows differ in type.
unsafe fn dot<const W: usize, const R: usize>(
    isa: Isa,
    ws: &[WRow<'_>; W],
    xs: &[XRow<'_>; R],
) -> [[f32; R]; W] {
    let Some(first) = ws.first() else {
        return [[0.0; R]; W];
    };
    let (nb, q51) = (first.d.len(), first.m.is_some());
    assert!(
        ws.iter().all(|w| w.d.len() == nb
            && w.qhl.len() == nb
            && w.qhh.len() == nb
            && w.m.is_some() == q51
            && w.m.is_none_or(|m| m.len() == nb)
            && w.qs.len() == nb * QK / 2)
            && xs.iter().all(|x| x.s.len() == nb
                && x.d.len() == nb
                && x.isum.len() == nb
                && x.qs.len() == nb * QK),
        "block counts"
    );
    match isa {
        Isa::Scalar => ws
            .each_ref()
            .map(|w| std::array::from_fn(|i| dot_scalar(w, &xs[i]))),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => ws.each_ref().map(|w| {
            // SAFETY: avx2, fma, f16c available (caller); every slice holds
            // `nb` blocks (asserted above); `m` is there exactly for Q5_1.
            unsafe {
                if q51 {
                    x86::dot_avx2::<R, true>(w, xs)
                } else {
                    x86::dot_avx2::<R, false>(w, xs)
                }
            }
        }),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: avx512f/bw/vl/vnni, avx2, fma, f16c available (caller);
            // every slice holds `nb` blocks (asserted above); `m` is there
            // exactly for Q5_1, in every weight row.
            unsafe {
                if q51 {
                    x86::dot_avx512::<W, R, true>(ws, xs)
                } else {
                    x86::dot_avx512::<W, R, false>(ws, xs)
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => ws
            .each_ref()
            .map(|w| std::array::from_fn(|i| dot_scalar(w, &xs[i]))),
    }
}

/// The exact `sum(q_w * q_x)` of block `b`, less `16 * sum(q_x)` for Q5_0.
fn block_sumi(w: &WRow<'_>, x: &XRow<'_>, nb: usize, b: usize) -> i32 {
    let (lo, hi) = half_offsets(nb, b);
    let (hl, hh) = (u32::from(w.qhl[b]), u32::from(w.qhh[b]));
    let mut sumi = 0i32;
    for j in 0..QK / 2 {
        let byte = w.qs[b * QK / 2 + j];
        let vl = i32::from(byte & 0x0F) | (((hl >> j) & 1) as i32) << 4;
        let vh = i32::from(byte >> 4) | (((hh >> j) & 1) as i32) << 4;
        sumi += vl * i32::from(x.qs[lo + j]) + vh * i32::from(x.qs[hi + j]);
    }
    if w.m.is_some() {
        sumi
    } else {
        sumi - 16 * x.isum[b]
    }
}

/// Block `b`'s `d_w * d_x * sumi + m_w * s_x` (no min term for Q5_0).
#[inline]
fn block_dot(w: &WRow<'_>, x: &XRow<'_>, nb: usize, b: usize) -> f32 {
    let scaled = block_sumi(w, x, nb, b) as f32 * (f16::from_bits(w.d[b]).to_f32() * x.d[b]);
    match w.m {
        Some(m) => scaled + f16::from_bits(m[b]).to_f32() * x.s[b],
        None => scaled,
    }
}

/// The portable reference: the blocks' terms added in order.
fn dot_scalar(w: &WRow<'_>, x: &XRow<'_>) -> f32 {
    let nb = w.d.len();
    (0..nb).map(|b| block_dot(w, x, nb, b)).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{block_dot, WRow, XRow};
    use crate::lanes::{hsum128, hsum256};
    use crate::QK;

    /// Byte `i` of the result is 0x10 when bit `i` of `bits` is set, else 0:
    /// the u32 broadcast, each byte lane given the byte holding its bit,
    /// masked with the lane's bit, compared to 0x00/0xFF, and-ed with 0x10.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fifth_bits(bits: u32) -> __m256i {
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// The f32 values of the two f16s at `p`, in lanes 0 and 1.
    ///
    /// Safety: f16c available; two `u16`s readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x2(p: *const u16) -> __m128 {
        // SAFETY: 4 bytes readable at `p` (caller); unaligned load.
        _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
            (p as *const i32).read_unaligned()
        }))
    }

    /// `d_w * d_x` for the pair of blocks at `b` in lanes 0..4 and 4..8,
    /// from the weights' `d`s in lanes 0, 1 of `dw`.
    ///
    /// Safety: avx2, fma available; `b + 1 < nb`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales2(dw: __m128, x: &XRow<'_>, b: usize) -> __m256 {
        // SAFETY: blocks b, b + 1 exist (caller): 8 bytes of f32s in `x.d`; unaligned load.
        let dx = unsafe { _mm_castpd_ps(_mm_load_sd(x.d.as_ptr().add(b) as *const f64)) };
        _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_mul_ps(dw, dx)),
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
        )
    }

    /// `m_w * s_x` of the pair of blocks at `b` added into lanes 0, 1 of
    /// `accm`, from the weights' `m`s in lanes 0, 1 of `mw`.
    ///
    /// Safety: fma available; `b + 1 < nb`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mins2(mw: __m128, x: &XRow<'_>, b: usize, accm: &mut __m128) {
        // SAFETY: blocks b, b + 1 exist (caller): 8 bytes of f32s in `x.s`; unaligned load.
        let sx = unsafe { _mm_castpd_ps(_mm_load_sd(x.s.as_ptr().add(b) as *const f64)) };
        *accm = _mm_fmadd_ps(mw, sx, *accm);
    }

    /// Q5_0's `16 * sum(q_x)` of the pair of blocks at `b`, in lane 0
    /// (first block) and lane 5 (second block) of 8 i32 lanes, 0 elsewhere:
    /// taken off the pair's i32 sums (four lanes per block), it makes them
    /// exactly the sums of `(q_w - 16) * q_x`.
    ///
    /// Safety: avx2 available; `b + 1 < nb`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn offsets2(x: &XRow<'_>, b: usize) -> __m256i {
        // SAFETY: blocks b, b + 1 exist (caller): 8 bytes of i32s in `x.isum`;
        // unaligned load.
        let s = unsafe { (x.isum.as_ptr().add(b) as *const i64).read_unaligned() };
        let s = _mm256_blend_epi32(_mm256_setzero_si256(), _mm256_set1_epi64x(s), 0b0010_0001);
        _mm256_slli_epi32(s, 4)
    }

    /// AVX2: two blocks per step, laid out as Q4_1's kernel lays them: the
    /// pair's nibbles in one 32-byte load, low nibbles against the pair's
    /// first halves, high against the second, the fifth bits (32 of the
    /// pair's low halves, 32 of their high halves, one load each) or-ed in
    /// as 16 (see [`fifth_bits`]). `maddubs` (at most 2 * 31 * 127 per i16,
    /// halves summed 15748), `madd` to i32 (four lanes per block), then
    /// (Q5_0) `16 * sum(q_x)` taken off one lane per block, exactly; (Q5_1)
    /// `m_w * s_x` of both blocks added into their own accumulator. The
    /// weights' quants and scales are rebuilt once per step for all `R`
    /// rows; each row has its own accumulators and does the same f32
    /// operations as alone.
    ///
    /// Safety: avx2, fma, f16c available; every slice holds `w.d.len()`
    /// blocks; `w.m` is `Some` if and only if `Q51`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2<const R: usize, const Q51: bool>(
        w: &WRow<'_>,
        xs: &[XRow<'_>; R],
    ) -> [f32; R] {
        let nb = w.d.len();
        let full4 = nb / 4 * 4;
        let pairs_end = if nb - full4 >= 2 { full4 + 2 } else { full4 };
        let m4 = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let wm = w.m.map_or(std::ptr::null(), |m| m.as_ptr());
        let mut acc = [_mm256_setzero_ps(); R];
        let mut accm = [_mm_setzero_ps(); R];
        let wq = w.qs.as_ptr();
        let mut b = 0;
        while b < pairs_end {
            // Offsets of the pair's first and second halves in the grouped layout.
            let (lo, hi) = if b < full4 {
                let (g, h) = (b / 4, (b % 4) / 2);
                (g * 128 + h * 32, g * 128 + 64 + h * 32)
            } else {
                (full4 * 32, full4 * 32 + 32)
            };
            // SAFETY: blocks b, b + 1 < nb: 32 nibble bytes at b * 16 in `w.qs`, two
            // u16s at b in `w.qhl`, `w.qhh`, `w.d` and (Q5_1) `w.m`; unaligned loads.
            let (nib, bl, bh, dw, mw) = unsafe {
                (
                    _mm256_loadu_si256(wq.add(b * (QK / 2)) as *const __m256i),
                    (w.qhl.as_ptr().add(b) as *const u32).read_unaligned(),
                    (w.qhh.as_ptr().add(b) as *const u32).read_unaligned(),
                    f16x2(w.d.as_ptr().add(b)),
                    if Q51 {
                        f16x2(wm.add(b))
                    } else {
                        _mm_setzero_ps()
                    },
                )
            };
            let ql = _mm256_or_si256(_mm256_and_si256(nib, m4), fifth_bits(bl));
            let qh = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(nib, 4), m4),
                fifth_bits(bh),
            );
            for (x, (acc, accm)) in xs.iter().zip(acc.iter_mut().zip(accm.iter_mut())) {
                let xq = x.qs.as_ptr();
                // SAFETY: the pair's halves (32 bytes each) at `lo`, `hi` < nb * 32 in
                // `x.qs`; unaligned loads. Blocks b, b + 1 < nb for the helpers.
                let (ylo, yhi, sc) = unsafe {
                    (
                        _mm256_loadu_si256(xq.add(lo) as *const __m256i),
                        _mm256_loadu_si256(xq.add(hi) as *const __m256i),
                        scales2(dw, x, b),
                    )
                };
                let p16 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(ql, ylo), _mm256_maddubs_epi16(qh, yhi));
                let mut p = _mm256_madd_epi16(p16, ones);
                if Q51 {
                    // SAFETY: b + 1 < nb.
                    unsafe { mins2(mw, x, b, accm) };
                } else {
                    // SAFETY: b + 1 < nb.
                    p = _mm256_sub_epi32(p, unsafe { offsets2(x, b) });
                }
                *acc = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), *acc);
            }
            b += 2;
        }
        std::array::from_fn(|i| {
            let mut sum = hsum256(acc[i]);
            if Q51 {
                sum += hsum128(accm[i]);
            }
            if b < nb {
                sum += block_dot(w, &xs[i], nb, b);
            }
            sum
        })
    }

    /// AVX-512 VNNI: four blocks per step. One 64-byte load holds the four
    /// blocks' nibbles; masked and shifted, they meet the group's first and
    /// second halves. The fifth bits of the four blocks' first halves (four
    /// u16s, one u64 load) are the byte mask of a masked add of 16 to the
    /// low nibbles, those of the second halves likewise for the high ones.
    /// Two `vpdpbusd` (u8 x i8 quads summed into i32 lanes, four lanes per
    /// block) make the sums; for Q5_0 they start from `-16 * sum(q_x)` in
    /// one lane per block (the four blocks' sums broadcast, lanes 0, 5, 10,
    /// 15 kept), so they end exact sums of `(q_w - 16) * q_x`; for Q5_1 the
    /// `m_w * s_x` of the four blocks go to their own accumulator. The
    /// scales of four blocks are loaded at once, multiplied, and spread over
    /// their lanes with one permute. A last pair of blocks takes the same
    /// steps at 256 bits, a last single block the scalar ones. The `W`
    /// weight rows' quants and scales are rebuilt once per step for all `R`
    /// activation rows, and each activation row's quants are loaded once
    /// for all `W` weight rows; each (weight row, activation row) pair has
    /// its own accumulators and does the same f32 operations as alone.
    ///
    /// Safety: avx512f/bw/vl/vnni, avx2, fma, f16c available; every slice
    /// holds `ws[0].d.len()` blocks; every `w.m` is `Some` if and only if `Q51`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx512<const W: usize, const R: usize, const Q51: bool>(
        ws: &[WRow<'_>; W],
        xs: &[XRow<'_>; R],
    ) -> [[f32; R]; W] {
        let nb = ws.first().map_or(0, |w| w.d.len());
        let full4 = nb / 4 * 4;
        let m4 = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(0x10);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let mut wm = [std::ptr::null(); W];
        for (p, w) in wm.iter_mut().zip(ws) {
            if let Some(m) = w.m {
                *p = m.as_ptr();
            }
        }
        let mut acc = [[_mm512_setzero_ps(); R]; W];
        let mut accm = [[_mm_setzero_ps(); R]; W];
        let mut b = 0;
        while b < full4 {
            let mut ql = [_mm512_setzero_si512(); W];
            let mut qh = [_mm512_setzero_si512(); W];
            let mut dw = [_mm_setzero_ps(); W];
            let mut mw = [_mm_setzero_ps(); W];
            for (v, w) in ws.iter().enumerate() {
                // SAFETY: blocks b..b + 4 <= nb: 64 nibble bytes at b * 16 in `w.qs`,
                // four u16s at b in `w.qhl`, `w.qhh`, `w.d` and (Q5_1) `w.m`;
                // unaligned loads.
                let (nib, kl, kh) = unsafe {
                    dw[v] = _mm_cvtph_ps(_mm_loadl_epi64(w.d.as_ptr().add(b) as *const __m128i));
                    if Q51 {
                        mw[v] = _mm_cvtph_ps(_mm_loadl_epi64(wm[v].add(b) as *const __m128i));
                    }
                    (
                        _mm512_loadu_si512(w.qs.as_ptr().add(b * QK / 2) as *const __m512i),
                        (w.qhl.as_ptr().add(b) as *const u64).read_unaligned(),
                        (w.qhh.as_ptr().add(b) as *const u64).read_unaligned(),
                    )
                };
                let l = _mm512_and_si512(nib, m4);
                ql[v] = _mm512_mask_add_epi8(l, kl, l, sixteen);
                let h = _mm512_and_si512(_mm512_srli_epi16(nib, 4), m4);
                qh[v] = _mm512_mask_add_epi8(h, kh, h, sixteen);
            }
            for (i, x) in xs.iter().enumerate() {
                let xq = x.qs.as_ptr();
                // SAFETY: blocks b..b + 4 <= nb: 128 quant bytes at b * 32 in `x.qs`
                // (group b / 4), four f32s at b in `x.d`, `x.s`, four i32s at b in
                // `x.isum`; unaligned loads.
                let (ylo, yhi, dx, sx, isum) = unsafe {
                    (
                        _mm512_loadu_si512(xq.add(b * QK) as *const __m512i),
                        _mm512_loadu_si512(xq.add(b * QK + 64) as *const __m512i),
                        _mm_loadu_ps(x.d.as_ptr().add(b)),
                        _mm_loadu_ps(x.s.as_ptr().add(b)),
                        _mm_loadu_si128(x.isum.as_ptr().add(b) as *const __m128i),
                    )
                };
                let p0 = if Q51 {
                    _mm512_setzero_si512()
                } else {
                    let off = _mm512_slli_epi32(_mm512_broadcast_i32x4(isum), 4);
                    _mm512_maskz_sub_epi32(0x8421, _mm512_setzero_si512(), off)
                };
                for v in 0..W {
                    if Q51 {
                        accm[v][i] = _mm_fmadd_ps(mw[v], sx, accm[v][i]);
                    }
                    let p = _mm512_dpbusd_epi32(p0, ql[v], ylo);
                    let p = _mm512_dpbusd_epi32(p, qh[v], yhi);
                    let sc = _mm512_permutexvar_ps(
                        spread,
                        _mm512_castps128_ps512(_mm_mul_ps(dw[v], dx)),
                    );
                    acc[v][i] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc[v][i]);
                }
            }
            b += 4;
        }
        // Plain loops rather than closures here and below: a closure would
        // not be compiled with this function's target features.
        let mut sum = [[0f32; R]; W];
        for (sum, acc) in sum.iter_mut().zip(&acc) {
            for (s, &a) in sum.iter_mut().zip(acc) {
                *s = _mm512_reduce_add_ps(a);
            }
        }
        if nb - full4 >= 2 {
            let (m4, sixteen) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
            for (v, w) in ws.iter().enumerate() {
                // SAFETY: blocks b, b + 1 < nb: 32 nibble bytes at b * 16 in `w.qs`,
                // two u16s at b in `w.qhl`, `w.qhh`, `w.d` and (Q5_1) `w.m`;
                // unaligned loads.
                let (nib, kl, kh, dw, mw) = unsafe {
                    (
                        _mm256_loadu_si256(w.qs.as_ptr().add(b * QK / 2) as *const __m256i),
                        (w.qhl.as_ptr().add(b) as *const u32).read_unaligned(),
                        (w.qhh.as_ptr().add(b) as *const u32).read_unaligned(),
                        f16x2(w.d.as_ptr().add(b)),
                        if Q51 {
                            f16x2(wm[v].add(b))
                        } else {
                            _mm_setzero_ps()
                        },
                    )
                };
                let ql = _mm256_and_si256(nib, m4);
                let ql = _mm256_mask_add_epi8(ql, kl, ql, sixteen);
                let qh = _mm256_and_si256(_mm256_srli_epi16(nib, 4), m4);
                let qh = _mm256_mask_add_epi8(qh, kh, qh, sixteen);
                for (x, (sum, accm)) in xs.iter().zip(sum[v].iter_mut().zip(accm[v].iter_mut())) {
                    let xq = x.qs.as_ptr();
                    // SAFETY: the pair's halves are 32 bytes at b * 32 and b * 32 + 32
                    // (grouped layout) in `x.qs`; unaligned loads. Blocks b, b + 1 < nb
                    // for the helpers.
                    let (ylo, yhi, sc) = unsafe {
                        (
                            _mm256_loadu_si256(xq.add(b * QK) as *const __m256i),
                            _mm256_loadu_si256(xq.add(b * QK + 32) as *const __m256i),
                            scales2(dw, x, b),
                        )
                    };
                    let p0 = if Q51 {
                        // SAFETY: b + 1 < nb.
                        unsafe { mins2(mw, x, b, accm) };
                        _mm256_setzero_si256()
                    } else {
                        // SAFETY: b + 1 < nb.
                        _mm256_sub_epi32(_mm256_setzero_si256(), unsafe { offsets2(x, b) })
                    };
                    let p = _mm256_dpbusd_epi32(p0, ql, ylo);
                    let p = _mm256_dpbusd_epi32(p, qh, yhi);
                    *sum += hsum256(_mm256_mul_ps(sc, _mm256_cvtepi32_ps(p)));
                }
            }
            b += 2;
        }
        for (v, w) in ws.iter().enumerate() {
            for (i, x) in xs.iter().enumerate() {
                if Q51 {
                    sum[v][i] += hsum128(accm[v][i]);
                }
                if b < nb {
                    sum[v][i] += block_dot(w, x, nb, b);
                }
            }
        }
        sum
    }
}
