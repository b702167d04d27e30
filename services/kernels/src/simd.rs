/*!
Dot products of one Q4_1 weight row with one or more Q8_1 activation rows,
per [`Isa`].

Per block: `d_w * d_x * sumi + m_w * s_x`, where `sumi` is the exact integer
sum of the 32 products of weight nibbles (0..=15; low nibbles are the values
0..16 of the block, high nibbles the values 16..32) with signed activation
bytes. The activations are in the grouped layout of [`crate::q8`]: groups of
4 blocks, then one of 2, then a single block.

The AVX2 and AVX-512 kernels take up to four activation rows at once, the
weight nibbles and scales unpacked once for all, each row with its own
accumulators.
*/

use half::f16;

use crate::q8::half_offsets;
use crate::{Isa, QK};

/// One weight row: `nb` blocks' nibbles (16 bytes each), `d` and `m` (f16 bits).
pub(crate) struct WRow<'a> {
    pub qs: &'a [u8],
    pub d: &'a [u16],
    pub m: &'a [u16],
}

/// One activation row: `nb` blocks' quants (grouped layout), `d` and `s`.
pub(crate) struct XRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// The dot products of `w` with each row of `xs`, with the kernels for `isa`;
/// element `i` is bit for bit what `xs[i]` alone (`R = 1`) gives.
///
/// # Panics
/// If the rows do not hold the same number of blocks, or `isa` is not
/// available on this CPU (callers check with [`Isa::available`]).
#[inline]
pub(crate) fn dot<const R: usize>(isa: Isa, w: &WRow<'_>, xs: &[XRow<'_>; R]) -> [f32; R] {
    let nb = w.d.len();
    assert!(
        w.m.len() == nb
            && w.qs.len() == nb * QK / 2
            && xs
                .iter()
                .all(|x| x.d.len() == nb && x.s.len() == nb && x.qs.len() == nb * QK),
        "block counts"
    );
    match isa {
        Isa::Scalar => std::array::from_fn(|i| dot_scalar(w, &xs[i])),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(
                isa.available(),
                "AVX2 kernel on a CPU without AVX2/FMA/F16C"
            );
            // SAFETY: the CPU supports avx2, fma and f16c (checked above, cached by std),
            // and every slice holds `nb` blocks (asserted above).
            unsafe { x86::dot_avx2(w, xs) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(
                isa.available(),
                "AVX-512 kernel on a CPU without AVX-512 VNNI"
            );
            // SAFETY: the CPU supports avx512f/bw/vl/vnni, avx2, fma and f16c (checked
            // above), and every slice holds `nb` blocks (asserted above).
            unsafe { x86::dot_avx512(w, xs) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => std::array::from_fn(|i| dot_scalar(w, &xs[i])),
    }
}

/// The integer sum of block `b`'s 32 products.
#[inline]
fn block_sumi(w: &WRow<'_>, x: &XRow<'_>, nb: usize, b: usize) -> i32 {
    let (lo, hi) = half_offsets(nb, b);
    let nib = &w.qs[b * QK / 2..(b + 1) * QK / 2];
    let mut sumi = 0i32;
    for (j, &byte) in nib.iter().enumerate() {
        sumi += i32::from(byte & 0x0F) * i32::from(x.qs[lo + j]);
        sumi += i32::from(byte >> 4) * i32::from(x.qs[hi + j]);
    }
    sumi
}

/// The portable reference, ggml's generic `ggml_vec_dot_q4_1_q8_1`.
pub(crate) fn dot_scalar(w: &WRow<'_>, x: &XRow<'_>) -> f32 {
    let nb = w.d.len();
    let mut sumf = 0f32;
    for b in 0..nb {
        let d = f16::from_bits(w.d[b]).to_f32();
        let m = f16::from_bits(w.m[b]).to_f32();
        sumf += block_sumi(w, x, nb, b) as f32 * d * x.d[b] + m * x.s[b];
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{block_sumi, WRow, XRow};
    use crate::lanes::{hsum128, hsum256};
    use crate::QK;

    /// The `d` and `m` of weight blocks `b`, `b + 1` in lanes 0, 1 (f32).
    ///
    /// Safety: `b + 1 < nb` for the row's `nb`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn wscales2(w: &WRow<'_>, b: usize) -> (__m128, __m128) {
        // SAFETY: blocks b, b + 1 exist (caller): 4 bytes of f16s in `w.d`, `w.m`;
        // unaligned loads.
        unsafe {
            (
                _mm_cvtph_ps(_mm_cvtsi32_si128(
                    (w.d.as_ptr().add(b) as *const i32).read_unaligned(),
                )),
                _mm_cvtph_ps(_mm_cvtsi32_si128(
                    (w.m.as_ptr().add(b) as *const i32).read_unaligned(),
                )),
            )
        }
    }

    /// `d_w * d_x` for blocks `b`, `b + 1` in lanes 0..4 and 4..8, and the
    /// `m_w * s_x` of both added into `accm`, from the weights' `(d, m)` of
    /// [`wscales2`].
    ///
    /// Safety: `b + 1 < nb` for the row's `nb`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales2(
        (dw, mw): (__m128, __m128),
        x: &XRow<'_>,
        b: usize,
        accm: &mut __m128,
    ) -> __m256 {
        // SAFETY: blocks b, b + 1 exist (caller): 8 bytes of f32s in `x.d`, `x.s`;
        // unaligned loads.
        let (dx, sx) = unsafe {
            (
                _mm_castpd_ps(_mm_load_sd(x.d.as_ptr().add(b) as *const f64)),
                _mm_castpd_ps(_mm_load_sd(x.s.as_ptr().add(b) as *const f64)),
            )
        };
        *accm = _mm_fmadd_ps(mw, sx, *accm);
        let sc = _mm_mul_ps(dw, dx);
        _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(sc),
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
        )
    }

    /// AVX2: two blocks per step. `maddubs` multiplies u8 nibbles by i8
    /// quants into i16 pairs (at most 2 * 15 * 128 = 3840), the low- and
    /// high-nibble halves are added (at most 7680, no overflow), and `madd`
    /// with ones widens to i32 lanes, four per block. The weights' nibbles
    /// and scales are unpacked once per step for all `R` rows; each row has
    /// its own accumulators and does the same f32 operations as alone.
    ///
    /// Safety: avx2, fma, f16c available; every slice holds `w.d.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2<const R: usize>(w: &WRow<'_>, xs: &[XRow<'_>; R]) -> [f32; R] {
        let nb = w.d.len();
        let full4 = nb / 4 * 4;
        let pairs_end = if nb - full4 >= 2 { full4 + 2 } else { full4 };
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
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
            // SAFETY: blocks b, b + 1 < nb: 32 nibble bytes at b * 16 in `w.qs`;
            // unaligned load.
            let nib = unsafe { _mm256_loadu_si256(wq.add(b * (QK / 2)) as *const __m256i) };
            let xlo = _mm256_and_si256(nib, mask);
            let xhi = _mm256_and_si256(_mm256_srli_epi16(nib, 4), mask);
            // SAFETY: b + 1 < nb.
            let ws = unsafe { wscales2(w, b) };
            for (x, (acc, accm)) in xs.iter().zip(acc.iter_mut().zip(accm.iter_mut())) {
                let xq = x.qs.as_ptr();
                // SAFETY: 32 quant bytes at each of `lo`, `hi` (< nb * 32) in `x.qs`;
                // unaligned loads.
                let (ylo, yhi) = unsafe {
                    (
                        _mm256_loadu_si256(xq.add(lo) as *const __m256i),
                        _mm256_loadu_si256(xq.add(hi) as *const __m256i),
                    )
                };
                let p16 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(xlo, ylo),
                    _mm256_maddubs_epi16(xhi, yhi),
                );
                let p = _mm256_madd_epi16(p16, ones);
                // SAFETY: b + 1 < nb.
                let sc = unsafe { scales2(ws, x, b, accm) };
                *acc = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), *acc);
            }
            b += 2;
        }
        std::array::from_fn(|i| {
            let mut sum = hsum256(acc[i]) + hsum128(accm[i]);
            if b < nb {
                sum += single(w, &xs[i], nb, b);
            }
            sum
        })
    }

    /// The last, unpaired block (scalar: at most one per row).
    #[inline]
    fn single(w: &WRow<'_>, x: &XRow<'_>, nb: usize, b: usize) -> f32 {
        let d = half::f16::from_bits(w.d[b]).to_f32();
        let m = half::f16::from_bits(w.m[b]).to_f32();
        block_sumi(w, x, nb, b) as f32 * d * x.d[b] + m * x.s[b]
    }

    /// AVX-512 VNNI: four blocks per step. One 64-byte load holds the four
    /// blocks' nibbles; masked and shifted, they meet the group's first and
    /// second halves in two `vpdpbusd` (u8 x i8 quads summed into i32 lanes,
    /// four lanes per block). The scales of four blocks are loaded at once,
    /// multiplied, and spread over their lanes with one permute. The weights'
    /// nibbles and scales are unpacked once per step for all `R` rows; each
    /// row has its own accumulators and does the same f32 operations as alone.
    ///
    /// Safety: avx512f/bw/vl/vnni, avx2, fma, f16c available; every slice
    /// holds `w.d.len()` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx512<const R: usize>(w: &WRow<'_>, xs: &[XRow<'_>; R]) -> [f32; R] {
        let nb = w.d.len();
        let full4 = nb / 4 * 4;
        let mask = _mm512_set1_epi8(0x0F);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut accm = [_mm_setzero_ps(); R];
        let wq = w.qs.as_ptr();
        let mut b = 0;
        while b < full4 {
            // SAFETY: blocks b..b + 4 <= nb: 64 nibble bytes at b * 16 in `w.qs`,
            // 4 f16s at b in `w.d`/`w.m`; unaligned loads.
            let (nib, dw, mw) = unsafe {
                (
                    _mm512_loadu_si512(wq.add(b * QK / 2) as *const __m512i),
                    _mm_cvtph_ps(_mm_loadl_epi64(w.d.as_ptr().add(b) as *const __m128i)),
                    _mm_cvtph_ps(_mm_loadl_epi64(w.m.as_ptr().add(b) as *const __m128i)),
                )
            };
            let xlo = _mm512_and_si512(nib, mask);
            let xhi = _mm512_and_si512(_mm512_srli_epi16(nib, 4), mask);
            for (x, (acc, accm)) in xs.iter().zip(acc.iter_mut().zip(accm.iter_mut())) {
                let xq = x.qs.as_ptr();
                // SAFETY: blocks b..b + 4 <= nb: 128 quant bytes at b * 32 in `x.qs`
                // (group b / 4), 4 f32s at b in `x.d`/`x.s`; unaligned loads.
                let (ylo, yhi, dx, sx) = unsafe {
                    (
                        _mm512_loadu_si512(xq.add(b * QK) as *const __m512i),
                        _mm512_loadu_si512(xq.add(b * QK + 64) as *const __m512i),
                        _mm_loadu_ps(x.d.as_ptr().add(b)),
                        _mm_loadu_ps(x.s.as_ptr().add(b)),
                    )
                };
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xlo, ylo);
                let p = _mm512_dpbusd_epi32(p, xhi, yhi);
                *accm = _mm_fmadd_ps(mw, sx, *accm);
                let sc = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(dw, dx)));
                *acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), *acc);
            }
            b += 4;
        }
        let mut sum: [f32; R] = std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]));
        if nb - full4 >= 2 {
            // SAFETY: blocks b, b + 1 < nb: 32 nibble bytes at b * 16; unaligned load.
            let nib = unsafe { _mm256_loadu_si256(wq.add(b * QK / 2) as *const __m256i) };
            let m4 = _mm256_set1_epi8(0x0F);
            let xlo = _mm256_and_si256(nib, m4);
            let xhi = _mm256_and_si256(_mm256_srli_epi16(nib, 4), m4);
            // SAFETY: b + 1 < nb.
            let ws = unsafe { wscales2(w, b) };
            for (x, (sum, accm)) in xs.iter().zip(sum.iter_mut().zip(accm.iter_mut())) {
                let xq = x.qs.as_ptr();
                // SAFETY: the pair's halves are 32 bytes at b * 32 and b * 32 + 32
                // (grouped layout) in `x.qs`; unaligned loads.
                let (ylo, yhi) = unsafe {
                    (
                        _mm256_loadu_si256(xq.add(b * QK) as *const __m256i),
                        _mm256_loadu_si256(xq.add(b * QK + 32) as *const __m256i),
                    )
                };
                let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), xlo, ylo);
                let p = _mm256_dpbusd_epi32(p, xhi, yhi);
                // SAFETY: b + 1 < nb.
                let sc = unsafe { scales2(ws, x, b, accm) };
                *sum += hsum256(_mm256_mul_ps(sc, _mm256_cvtepi32_ps(p)));
            }
            b += 2;
        }
        std::array::from_fn(|i| {
            let mut s = sum[i] + hsum128(accm[i]);
            if b < nb {
                s += single(w, &xs[i], nb, b);
            }
            s
        })
    }
}
