/*!
Activations quantized to Q8_1, ggml's `quantize_row_q8_1_ref`: per block of
32, `d = amax / 127` (stored as f16), `q = round(x / d)` (half away from
zero), `s = f16(d * sum(q))`; `d` and `s` are kept as the f32 values of
those f16s.

Layout: the quants of a row are stored in groups of 4 blocks (then one group
of 2, then one single block for what is left), and inside a group the first
halves (values 0..16) of its blocks come first, then the second halves
(16..32). A weight block's 16 nibble bytes hold its values 0..16 in the low
nibbles and 16..32 in the high ones, so one load of a group's weight bytes
masked (low nibbles) or shifted (high nibbles) lines up lane for lane with
one load of each half here.
*/

use half::f16;

use crate::{round, QK};

/// Rows of activations quantized to Q8_1, in the grouped layout.
#[derive(Clone, Debug)]
pub struct Q8Rows {
    rows: usize,
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    /// The exact `sum(q)` of each block.
    isum: Vec<i32>,
}

/// Byte offsets, inside a row of `nb` blocks, of the first and second half of block `b`.
#[inline]
pub(crate) fn half_offsets(nb: usize, b: usize) -> (usize, usize) {
    let full4 = nb / 4 * 4;
    if b < full4 {
        let (g, j) = (b / 4, b % 4);
        (g * 128 + j * 16, g * 128 + 64 + j * 16)
    } else if nb - full4 >= 2 && b < full4 + 2 {
        let j = b - full4;
        (full4 * 32 + j * 16, full4 * 32 + 32 + j * 16)
    } else {
        (b * 32, b * 32 + 16)
    }
}

impl Q8Rows {
    /// Quantizes `m` rows of `k` values (`xs.len() == m * k`, `k % 32 == 0`).
    ///
    /// # Panics
    /// If the lengths do not fit.
    pub fn quantize(xs: &[f32], m: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(QK) && xs.len() == m * k, "Q8_1 shape");
        let nb = k / QK;
        let mut qs = vec![0i8; m * k];
        let mut d = Vec::with_capacity(m * nb);
        let mut s = Vec::with_capacity(m * nb);
        let mut isum = Vec::with_capacity(m * nb);
        for (r, row) in xs.chunks_exact(k.max(1)).enumerate() {
            let out = &mut qs[r * k..(r + 1) * k];
            for (b, x) in row.chunks_exact(QK).enumerate() {
                let amax = abs_max(x);
                let db = amax / 127.0;
                let id = if db != 0.0 { 1.0 / db } else { 0.0 };
                let (lo, hi) = half_offsets(nb, b);
                let (first, second) = x.split_at(QK / 2);
                let mut sum = 0i32;
                for (at, half) in [(lo, first), (hi, second)] {
                    for (q, &xj) in out[at..at + QK / 2].iter_mut().zip(half) {
                        // |xj * id| <= 127 up to rounding; NaN becomes 0.
                        *q = round::half_away(xj * id) as i8;
                        sum += i32::from(*q);
                    }
                }
                d.push(f16::from_f32(db).to_f32());
                s.push(f16::from_f32(sum as f32 * db).to_f32());
                isum.push(sum);
            }
        }
        Self {
            rows: m,
            k,
            qs,
            d,
            s,
            isum,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The quants of row `r` (`k` bytes, grouped layout).
    pub fn row_qs(&self, r: usize) -> &[i8] {
        &self.qs[r * self.k..(r + 1) * self.k]
    }

    /// The 32 quants of block `b` of row `r`, in natural order.
    pub fn block(&self, r: usize, b: usize) -> [i8; QK] {
        let (lo, hi) = half_offsets(self.k / QK, b);
        let row = self.row_qs(r);
        let mut out = [0i8; QK];
        out[..QK / 2].copy_from_slice(&row[lo..lo + QK / 2]);
        out[QK / 2..].copy_from_slice(&row[hi..hi + QK / 2]);
        out
    }

    /// The scale `d` of each block of row `r`.
    pub fn row_d(&self, r: usize) -> &[f32] {
        let nb = self.k / QK;
        &self.d[r * nb..(r + 1) * nb]
    }

    /// The exact integer `sum(q)` of each block of row `r`.
    pub fn row_isum(&self, r: usize) -> &[i32] {
        let nb = self.k / QK;
        &self.isum[r * nb..(r + 1) * nb]
    }

    /// The `s = d * sum(q)` of each block of row `r`.
    pub fn row_s(&self, r: usize) -> &[f32] {
        let nb = self.k / QK;
        &self.s[r * nb..(r + 1) * nb]
    }
}

/// The largest `|v|` of `x` (0 for none; NaNs ignored), taken in eight
/// lanes so that it vectorizes: `max` gives the same value in any order.
#[inline]
pub(crate) fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v.abs());
        }
    }
    let lanes = lanes.iter().fold(0f32, |a, &l| a.max(l));
    rest.iter().fold(lanes, |a, v| a.max(v.abs()))
}
