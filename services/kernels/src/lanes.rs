//! Horizontal sums of SIMD lanes, in one order for every kernel: a row's
//! f32 result never depends on which kernel file summed its lanes.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m128, __m256, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm_add_ps, _mm_add_ss,
    _mm_cvtss_f32, _mm_movehdup_ps, _mm_movehl_ps,
};

/// Sum of the 8 lanes: the two halves added, then as [`hsum128`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn hsum256(v: __m256) -> f32 {
    hsum128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps(v, 1),
    ))
}

/// Sum of the 4 lanes: lanes 2, 3 added to 0, 1, then lane 1 to lane 0.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "sse3")]
pub(crate) fn hsum128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
