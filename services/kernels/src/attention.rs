/*!
One head of causal attention for one row, [`attend`]: the scores of `q`
against the cached keys, their softmax, and the weighted sum of the cached
values.

The arithmetic is fixed: a score is a dot product taken in eight lanes
(lane `l` sums the products of elements `l`, `l + 8`, ..., the lanes are
then added in order from 0 to 7, then the elements past the last multiple
of 8 one by one), and each output element sums `weight * value` over the
positions in order. The AVX version ([`Isa::Avx2`] and up) does exactly
these f32 operations (separate multiplies and adds, no FMA), eight lanes at
a time, and keeps up to 64 output values in registers over all positions,
so it gives the portable version's results bit for bit: a row's attention
does not depend on the CPU's instruction set either.
*/

use crate::Isa;

/// One head of causal attention for one row: `q` (`head_dim`) against the
/// first `len` positions of a cache whose rows are `stride` values apart,
/// starting at `offset` inside each row; the weighted values go to `out`
/// (`head_dim`). `scores` is scratch space.
///
/// # Panics
/// If `out` is not as long as `q`, or the cache holds fewer than `len`
/// rows of `offset + head_dim` values.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    assert_eq!(out.len(), hd, "output length");
    if len > 0 {
        let end = (len - 1) * stride + offset + hd;
        assert!(
            keys.len() >= end && values.len() >= end,
            "the cache holds fewer than {len} positions"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.available() {
        // SAFETY: AVX is available (part of `Isa::Avx2`); the cache holds
        // `len` rows of `offset + hd` values and `out` holds `hd` (asserted).
        unsafe { x86::attend(q, keys, values, stride, offset, len, scores, out) };
        return;
    }
    attend_scalar(q, keys, values, stride, offset, len, scores, out);
}

/// `sum(a[i] * b[i])` in the fixed order of the module documentation (eight
/// lanes, the lanes in order, then the tail): the same sum whatever the row's
/// neighbours, which the engine's batch invariance rests on.
#[inline]
pub fn ordered_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// The scores of `len` positions (scaled by `1 / sqrt(head_dim)`) turned
/// into softmax numerators `e^(s - max)`; returns their total.
#[inline]
fn softmax_numerators(scores: &mut [f32]) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    total
}

/// The portable version.
#[allow(clippy::too_many_arguments)]
fn attend_scalar(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    let scale = 1.0 / (hd as f32).sqrt();
    scores.clear();
    for p in 0..len {
        let at = p * stride + offset;
        scores.push(ordered_dot(q, &keys[at..at + hd]) * scale);
    }
    let total = softmax_numerators(scores);
    out.fill(0.0);
    for (p, &s) in scores.iter().enumerate() {
        let at = p * stride + offset;
        let w = s / total;
        for (o, &v) in out.iter_mut().zip(&values[at..at + hd]) {
            *o += w * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::softmax_numerators;

    /// [`super::ordered_dot`] with the eight lanes in one register.
    ///
    /// Safety: AVX available; `b` at least as long as `a`.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let chunks = a.len() / 8;
        let mut acc = _mm256_setzero_ps();
        for c in 0..chunks {
            // SAFETY: 8 floats at c * 8 < a.len() <= b.len(); unaligned loads.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(c * 8)),
                    _mm256_loadu_ps(b.as_ptr().add(c * 8)),
                )
            };
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats; unaligned store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut sum = lanes.iter().sum::<f32>();
        for i in chunks * 8..a.len() {
            sum += a[i] * b[i];
        }
        sum
    }

    /// [`super::attend_scalar`], eight lanes at a time; the output in
    /// groups of up to 64 values kept in registers over every position.
    ///
    /// Safety: AVX available; `out.len() == q.len()`; `keys` and `values`
    /// hold `len` rows of `offset + q.len()` values, `stride` apart.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn attend(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        stride: usize,
        offset: usize,
        len: usize,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let hd = q.len();
        let scale = 1.0 / (hd as f32).sqrt();
        scores.clear();
        for p in 0..len {
            let at = p * stride + offset;
            // SAFETY: AVX available; the key row holds `hd` values (caller).
            scores.push(unsafe { dot(q, &keys[at..at + hd]) } * scale);
        }
        let total = softmax_numerators(scores);
        let chunks = hd / 8;
        let mut c = 0;
        while c < chunks {
            let group = (chunks - c).min(8);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (p, &s) in scores.iter().enumerate() {
                let w = _mm256_set1_ps(s / total);
                let row = values[p * stride + offset + c * 8..].as_ptr();
                for (g, acc) in acc.iter_mut().enumerate().take(group) {
                    // SAFETY: values `c * 8 + g * 8 .. + 8` of the row are below
                    // `hd` (g < group <= chunks - c); unaligned load.
                    let v = unsafe { _mm256_loadu_ps(row.add(g * 8)) };
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, v));
                }
            }
            for (g, acc) in acc.iter().enumerate().take(group) {
                // SAFETY: `out` holds `hd` values, and `(c + g) * 8 + 8 <= hd`;
                // unaligned store.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((c + g) * 8), *acc) };
            }
            c += group;
        }
        let tail = &mut out[chunks * 8..];
        tail.fill(0.0);
        for (p, &s) in scores.iter().enumerate() {
            let w = s / total;
            let at = p * stride + offset + chunks * 8;
            for (o, &v) in tail.iter_mut().zip(&values[at..at + hd - chunks * 8]) {
                *o += w * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let q = [1.0, 2.0, 3.0, 4.0];
        let keys = [0.5, 0.5, 0.5, 0.5];
        let values = [9.0, 8.0, 7.0, 6.0];
        let mut out = [0.0; 4];
        attend(&q, &keys, &values, 4, 0, 1, &mut Vec::new(), &mut out);
        assert_eq!(out, values);
    }

    #[test]
    fn attention_weights_follow_the_scores() {
        // Two positions, the second's key aligned with q: it gets most weight.
        let q = [4.0, 0.0];
        let keys = [0.0, 1.0, 1.0, 0.0];
        let values = [0.0, 10.0, 10.0, 0.0];
        let mut out = [0.0; 2];
        attend(&q, &keys, &values, 2, 0, 2, &mut Vec::new(), &mut out);
        let w = 1.0 / (1.0 + (-4.0f32 / 2f32.sqrt()).exp());
        assert!((out[0] - 10.0 * w).abs() < 1e-5, "{out:?}");
        assert!((out[1] - 10.0 * (1.0 - w)).abs() < 1e-5, "{out:?}");
    }

    /// The SIMD version gives the portable one's bits, for head sizes with
    /// and without a remainder past the groups of 64 and of 8 values, and
    /// for a head inside a wider cache row.
    #[test]
    fn simd_attention_gives_the_portable_bits() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        for (hd, len) in [(64, 37), (256, 5), (80, 1), (13, 9), (128, 200)] {
            let (stride, offset) = (3 * hd + 5, hd + 3);
            let q: Vec<f32> = (0..hd).map(|_| next()).collect();
            let keys: Vec<f32> = (0..len * stride).map(|_| next()).collect();
            let values: Vec<f32> = (0..len * stride).map(|_| next()).collect();
            let (mut want, mut got) = (vec![0f32; hd], vec![0f32; hd]);
            attend_scalar(
                &q,
                &keys,
                &values,
                stride,
                offset,
                len,
                &mut Vec::new(),
                &mut want,
            );
            attend(
                &q,
                &keys,
                &values,
                stride,
                offset,
                len,
                &mut Vec::new(),
                &mut got,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "head size {hd}, {len} positions");
        }
    }
}
