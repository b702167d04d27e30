/*!
Dot product of one Q4_1 weight row with one Q8_1 activation row, per [`Isa`].

Per block: `d_w * d_x * sumi + m_w * s_x`, `sumi` = the exact integer sum of
the 32 products of weight nibbles (0..=15; the low nibbles are values 0..16,
the high nibbles values 16..32) and signed activation bytes.
*/

use half::f16;

use crate::{Isa, Q4_1_BLOCK_BYTES, QK};

/// The dot product with the kernel for `isa`.
///
/// # Panics
/// If the three slices do not describe the same number of blocks, or `isa`
/// is not available on this CPU (callers check with [`Isa::available`]).
#[inline]
pub(crate) fn dot(isa: Isa, w: &[u8], qs: &[i8], ds: &[[f32; 2]]) -> f32 {
    let nb = ds.len();
    assert!(
        w.len() == nb * Q4_1_BLOCK_BYTES && qs.len() == nb * QK,
        "block counts"
    );
    match isa {
        Isa::Scalar => dot_scalar(w, qs, ds),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(
                isa.available(),
                "AVX2 kernel on a CPU without AVX2/FMA/F16C"
            );
            // SAFETY: the CPU supports avx2, fma and f16c (checked above, cached by std),
            // and the slice lengths match `nb` blocks (asserted above).
            unsafe { x86::dot_avx2(w, qs, ds) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(
                isa.available(),
                "AVX-512 kernel on a CPU without AVX-512 VNNI"
            );
            // SAFETY: the CPU supports avx512f/bw/vl/vnni, avx2, fma and f16c (checked
            // above), and the slice lengths match `nb` blocks (asserted above).
            unsafe { x86::dot_avx512(w, qs, ds) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => dot_scalar(w, qs, ds),
    }
}

/// The portable reference, ggml's `ggml_vec_dot_q4_1_q8_1` generic code.
pub(crate) fn dot_scalar(w: &[u8], qs: &[i8], ds: &[[f32; 2]]) -> f32 {
    let mut sumf = 0f32;
    for ((blk, q), &[dy, sy]) in w
        .chunks_exact(Q4_1_BLOCK_BYTES)
        .zip(qs.chunks_exact(QK))
        .zip(ds)
    {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let v0 = i32::from(blk[4 + j] & 0x0F);
            let v1 = i32::from(blk[4 + j] >> 4);
            sumi += v0 * i32::from(q[j]) + v1 * i32::from(q[j + QK / 2]);
        }
        sumf += sumi as f32 * d * dy + m * sy;
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::{Q4_1_BLOCK_BYTES, QK};

    /// `d` and `m` of the block at `blk` as f32.
    ///
    /// Safety: `blk` points at 4 readable bytes; f16c is available.
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn scales(blk: *const u8) -> (f32, f32) {
        // SAFETY: the caller guarantees 4 readable bytes at `blk` (unaligned read).
        let dm = unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned())) };
        (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
    }

    /// The 32 nibbles of the block at `blk` as bytes: low nibbles (values 0..16)
    /// in the low 128 bits, high nibbles (values 16..32) in the high 128 bits.
    ///
    /// Safety: `blk` points at a whole 20-byte block; avx2 is available.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(blk: *const u8) -> __m256i {
        // SAFETY: bytes 4..20 of the block are readable (caller); unaligned load.
        let t = unsafe { _mm_loadu_si128(blk.add(4) as *const __m128i) };
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// AVX2 dot product: `maddubs` (u8 x i8 pairs to i16, at most 2 * 15 * 128,
    /// no saturation) then `madd` with ones to i32, one block per step.
    ///
    /// Safety: avx2, fma, f16c available; `w`, `qs` hold `ds.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(w: &[u8], qs: &[i8], ds: &[[f32; 2]]) -> f32 {
        let wp = w.as_ptr();
        let qp = qs.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (b, &[dy, sy]) in ds.iter().enumerate() {
            // SAFETY: block `b < ds.len()` lies inside `w` and its quants inside `qs`
            // (caller); loads are unaligned.
            let (blk, qy) = unsafe {
                let blk = wp.add(b * Q4_1_BLOCK_BYTES);
                (blk, _mm256_loadu_si256(qp.add(b * QK) as *const __m256i))
            };
            // SAFETY: `blk` is a whole block inside `w`; f16c/avx2 enabled here.
            let ((dx, mx), qx) = unsafe { (scales(blk), nibbles(blk)) };
            summs += mx * sy;
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy), _mm256_cvtepi32_ps(p), acc);
        }
        hsum256(acc) + summs
    }

    /// AVX-512 VNNI dot product: `vpdpbusd` (u8 x i8 quads to i32) over two
    /// blocks per 512-bit step; an odd last block uses the 256-bit form.
    ///
    /// Safety: avx512f/bw/vl/vnni, avx2, fma, f16c available; `w`, `qs` hold
    /// `ds.len()` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx512(w: &[u8], qs: &[i8], ds: &[[f32; 2]]) -> f32 {
        let nb = ds.len();
        let wp = w.as_ptr();
        let qp = qs.as_ptr();
        let mut acc = _mm512_setzero_ps();
        let mut summs = 0f32;
        let mut b = 0;
        while b + 2 <= nb {
            let [dy0, sy0] = ds[b];
            let [dy1, sy1] = ds[b + 1];
            // SAFETY: blocks `b` and `b + 1` (< nb) lie inside `w`, their 64 quant
            // bytes inside `qs` (caller); loads are unaligned.
            let (blk0, blk1, qy) = unsafe {
                let blk0 = wp.add(b * Q4_1_BLOCK_BYTES);
                (
                    blk0,
                    blk0.add(Q4_1_BLOCK_BYTES),
                    _mm512_loadu_si512(qp.add(b * QK) as *const __m512i),
                )
            };
            // SAFETY: both are whole blocks inside `w`; the features are enabled here.
            let ((dx0, mx0), (dx1, mx1), lo, hi) =
                unsafe { (scales(blk0), scales(blk1), nibbles(blk0), nibbles(blk1)) };
            summs += mx0 * sy0 + mx1 * sy1;
            let qx = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qx, qy);
            let scale =
                _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(dx0 * dy0), _mm512_set1_ps(dx1 * dy1));
            acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc);
            b += 2;
        }
        let mut sum = _mm512_reduce_add_ps(acc);
        if b < nb {
            let [dy, sy] = ds[b];
            // SAFETY: block `b < nb` lies inside `w`, its quants inside `qs`.
            let (blk, qy) = unsafe {
                let blk = wp.add(b * Q4_1_BLOCK_BYTES);
                (blk, _mm256_loadu_si256(qp.add(b * QK) as *const __m256i))
            };
            // SAFETY: a whole block inside `w`; the features are enabled here.
            let ((dx, mx), qx) = unsafe { (scales(blk), nibbles(blk)) };
            let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, qy);
            sum += hsum256(_mm256_mul_ps(
                _mm256_set1_ps(dx * dy),
                _mm256_cvtepi32_ps(p),
            ));
            summs += mx * sy;
        }
        sum + summs
    }
}
